"""Loaders for the formats the continual-learning benchmarks are distributed in, all under ``paths.data_root``.

Each is a task source (``load(split) -> [{"prompt", "answer", ...}]``, ``describe()``) with ``missing()``,
the files it needs that are not there. Extra fields of an example (``options``, ``definition``,
``references`` ...) are there for the task's prompt template and scorer. Missing data raises one
:class:`~aglcl.errors.AglclError` line naming the files expected, where, and where to get them: nothing
is ever downloaded, and nothing falls back to other data.

==================== ======================================================================================
:class:`TraceTask`   TRACE: ``<root>/<task>/{train,eval,test}.json``, JSON lists of ``{"prompt", "answer"}``
:class:`CLBenchTask` O-LoRA's CL_Benchmark: ``<root>/<type>/<task>/{train,dev,test}.json`` (JSON lists of
                     ``{"sentence", "label"}``) and ``labels.json``; instructions from ``instruction_config.json``
:class:`SuperNITask` SuperNI task JSON (``Definition``, ``Positive Examples``, ``Instances`` with ``input``
                     and a list ``output``), one file per split: ``<root>/<task>/{train,dev,test}.json`` (SAPT)
:class:`Concept1KTask` Concept-1K: ``<root>/concept_1k_task<N>/continual_data.json``, or the released
                     ``<root>/concept_1k/dataset.txt`` split by ``<root>/concept_1k_task<N>/continual_config.json``
==================== ======================================================================================
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any

from aglcl.data.sources import check_split, read_json_list, read_text, to_examples
from aglcl.errors import AglclError, choices

KEY = "task.source"
WHERE = {
    "TRACE": "the TRACE release (LLM-CL-Benchmark_5000, linked from https://github.com/BeyonderXX/TRACE)",
    "CL_Benchmark": "the CL_Benchmark folder of https://github.com/cmnfriend/O-LoRA",
    "SuperNI": "CL_Benchmark/SuperNI of https://github.com/circle-hit/SAPT (task files: "
    "https://github.com/allenai/natural-instructions)",
    "Concept-1K": "dataset/concept_1k and dataset/concept_1k_task10 of "
    "https://github.com/zzz47zzz/codebase-for-incremental-learning-with-llm",
}

# O-LoRA's published zero-shot instructions (configs/instruction_config.json), by task type.
CLBENCH_INSTRUCTIONS = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the option.\n',
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? Choose one from the option.\n',
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? "
    "Choose one from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
    "Choose one from the option.\n",
    "COPA": "",  # O-LoRA gives COPA no instruction: the sentence already asks the question
}


def missing_error(suite: str, what: str, folder: Path, files: list[str]) -> AglclError:
    """The one-line error for absent benchmark data: which files, where, and where to get them."""
    names = ", ".join(files)
    return AglclError(
        f"{suite} data for {what} not found: expected {names} in {folder} "
        f"(paths.data_root, or the AGLCL_DATA_ROOT variable, sets the root); get them from {WHERE[suite]}"
    )


def _needed(always: tuple[str, ...], file: Path) -> list[str]:
    """The files to name in a missing-data error: those always needed, and ``file`` if it is another."""
    return list(always) + ([file.name] if file.name not in always else [])


def load_json(file: Path) -> Any:
    """Parse a JSON file; AglclError with file:line:col on a syntax error or unreadable file."""
    text = read_text(file)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AglclError(f"{file}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None


def _text(value: Any, where: str, field: str) -> str:
    """A field as text: a string, or a number written out; AglclError at ``where`` otherwise (NaN included)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):  # json reads NaN and Infinity as floats
        what = "NaN (a missing value)" if math.isnan(value) else f"{value} (not a finite number)"
        raise AglclError(f"{where}: field {field!r} is {what}; expected a string")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise AglclError(f"{where}: field {field!r} is {'null' if value is None else 'a ' + type(value).__name__}; "
                     "expected a string")


# ---------------------------------------------------------------------------------------------- TRACE
class TraceTask:
    """One TRACE task: ``<root>/<name>/{train,eval,test}.json``, each a JSON list of prompt/answer objects."""

    FILES = {"train": "train.json", "eval": "eval.json", "test": "test.json"}

    def __init__(self, root: str | os.PathLike, name: str, prompt_field: str = "prompt", answer_field: str = "answer"):
        self.root, self.name = Path(root).expanduser(), name
        self.dir = self.root / name
        self.prompt_field, self.answer_field = prompt_field, answer_field

    def missing(self) -> list[Path]:
        return [self.dir / f for f in ("train.json", "test.json") if not (self.dir / f).is_file()]

    def load(self, split: str) -> list[dict]:
        file = self.dir / self.FILES[check_split(split)]
        if not file.is_file():
            raise missing_error("TRACE", f"task {self.name!r}", self.dir, _needed(("train.json", "test.json"), file))
        empty = f"split {split!r} of TRACE task {self.name!r} ({file}) is empty"
        return to_examples(read_json_list(file), self.prompt_field, self.answer_field, empty)

    def describe(self) -> str:
        return f"TRACE task {self.name} in {self.dir}"


# ---------------------------------------------------------------------------------------- CL_Benchmark
class CLBenchTask:
    """One task of O-LoRA's CL_Benchmark: ``<root>/<task_type>/<name>/{train,dev,test}.json`` + ``labels.json``.

    Examples carry ``options`` (the label set, comma-joined, as O-LoRA's prompt lists it) and
    ``instruction`` (from ``instruction_file`` when given, else O-LoRA's published instruction).
    """

    FILES = {"train": "train.json", "eval": "dev.json", "test": "test.json"}
    TYPES = tuple(CLBENCH_INSTRUCTIONS)

    def __init__(self, root: str | os.PathLike, task_type: str, name: str, instruction_file: str | None = None):
        if task_type not in self.TYPES:
            raise AglclError(f"unknown {KEY}.task_type {task_type!r}; choose one of {choices(self.TYPES)}")
        self.root, self.task_type, self.name = Path(root).expanduser(), task_type, name
        self.dir = self.root / task_type / name
        self.instruction_file = Path(instruction_file).expanduser() if instruction_file else None

    def missing(self) -> list[Path]:
        need = [self.dir / "train.json", self.dir / "test.json", self.dir / "labels.json"]
        if self.instruction_file is not None:
            need.append(self.instruction_file)
        return [f for f in need if not f.is_file()]

    def labels(self) -> list[str]:
        file = self.dir / "labels.json"
        if not file.is_file():
            raise missing_error("CL_Benchmark", f"task {self.name!r}", self.dir, ["labels.json"])
        labels = load_json(file)
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise AglclError(f"{file}: expected a non-empty JSON list of label strings")
        return labels

    def instruction(self) -> str:
        if self.instruction_file is None:
            return CLBENCH_INSTRUCTIONS[self.task_type]
        config = load_json(self.instruction_file)
        entries = config.get(self.task_type) if isinstance(config, dict) else None
        for entry in entries or []:
            if isinstance(entry, dict) and entry.get("instruction_type") == "zero-shot":
                return _text(entry.get("instruction"), f"{self.instruction_file}: {self.task_type}", "instruction")
        if self.task_type == "COPA":
            return ""
        raise AglclError(f"{self.instruction_file}: no zero-shot instruction for task type {self.task_type!r}")

    def load(self, split: str) -> list[dict]:
        file = self.dir / self.FILES[check_split(split)]
        if not file.is_file():
            raise missing_error("CL_Benchmark", f"task {self.task_type}/{self.name}", self.dir,
                                _needed(("train.json", "test.json", "labels.json"), file))
        options, instruction = ", ".join(self.labels()), self.instruction()
        out = []
        for where, record in read_json_list(file):
            if not isinstance(record, dict) or "sentence" not in record or "label" not in record:
                present = choices(record) if isinstance(record, dict) else f"a {type(record).__name__}"
                raise AglclError(f"{where}: expected an object with 'sentence' and 'label' (got {present or 'none'})")
            out.append({"prompt": _text(record["sentence"], where, "sentence"),
                        "answer": _text(record["label"], where, "label"), "options": options,
                        "instruction": instruction})
        if not out:
            raise AglclError(f"split {split!r} of CL_Benchmark task {self.name!r} ({file}) is empty")
        return out

    def describe(self) -> str:
        return f"CL_Benchmark task {self.task_type}/{self.name} in {self.dir}"


# --------------------------------------------------------------------------------------------- SuperNI
class SuperNITask:
    """A SuperNI task split into ``<root>/<name>/{train,dev,test}.json``, each a SuperNI task file.

    Examples carry ``definition`` (the first definition), ``examples`` (the first ``num_pos_examples``
    positive examples, formatted as SuperNI's ``Positive Example k -`` blocks), ``references`` (every
    output of the instance); ``answer`` is the first output.
    """

    FILES = {"train": "train.json", "eval": "dev.json", "test": "test.json"}

    def __init__(self, root: str | os.PathLike, name: str, num_pos_examples: int = 0):
        self.root, self.name = Path(root).expanduser(), name
        self.dir = self.root / name
        self.num_pos_examples = int(num_pos_examples)

    def missing(self) -> list[Path]:
        return [self.dir / f for f in ("train.json", "test.json") if not (self.dir / f).is_file()]

    def load(self, split: str) -> list[dict]:
        file = self.dir / self.FILES[check_split(split)]
        if not file.is_file():
            raise missing_error("SuperNI", f"task {self.name!r}", self.dir, _needed(("train.json", "test.json"), file))
        data = load_json(file)
        if not isinstance(data, dict):
            raise AglclError(f"{file}: expected a SuperNI task object, got a {type(data).__name__}")
        for field in ("Definition", "Instances"):
            if field not in data:
                raise AglclError(f"{file}: missing field {field!r} (fields present: {choices(data) or 'none'})")
        definition = data["Definition"]
        definition = definition[0] if isinstance(definition, list) and definition else definition
        definition = _text(definition, str(file), "Definition").strip()
        shots = []
        for k, pos in enumerate((data.get("Positive Examples") or [])[: self.num_pos_examples], 1):
            where = f"{file}: Positive Examples item {k - 1}"
            if not isinstance(pos, dict):
                raise AglclError(f"{where}: expected an object with 'input' and 'output'")
            shots.append(f"Positive Example {k} -\nInput: {_text(pos.get('input'), where, 'input').strip()}\n"
                         f"Output: {_text(pos.get('output'), where, 'output').strip()}\n")
        instances = data["Instances"]
        if not isinstance(instances, list):
            raise AglclError(f"{file}: field 'Instances' is a {type(instances).__name__}; expected a list")
        out = []
        for i, inst in enumerate(instances):
            where = f"{file}: Instances item {i}"
            if not isinstance(inst, dict):
                raise AglclError(f"{where}: expected an object with 'input' and 'output'")
            for field in ("input", "output"):
                if field not in inst:
                    raise AglclError(f"{where}: missing field {field!r} (fields present: {choices(inst) or 'none'})")
            outputs = inst["output"] if isinstance(inst["output"], list) else [inst["output"]]
            outputs = [_text(o, where, "output") for o in outputs]
            if not outputs:
                raise AglclError(f"{where}: field 'output' is an empty list")
            out.append({"prompt": _text(inst["input"], where, "input"), "answer": outputs[0],
                        "references": outputs, "definition": definition, "examples": "".join(shots)})
        if not out:
            raise AglclError(f"split {split!r} of SuperNI task {self.name!r} ({file}) has no instances")
        return out

    def describe(self) -> str:
        return f"SuperNI task {self.name} in {self.dir}"


# ------------------------------------------------------------------------------------------ Concept-1K
def parse_concept1k(file: Path) -> tuple[list[dict], int]:
    """Instances of the released ``dataset.txt``: ``(concept, relation, target)`` lines, each followed by
    ``Q1:``/``A1:``/``Q2:`` and a second answer (labelled ``Q2:`` in the release too).

    Returns ``([{"concept", "q1", "a1", "q2", "a2"}], skipped)``. As in the codebase's preprocessing, an
    instance whose two answers differ is skipped; a line that is none of these raises file:line.
    """
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise AglclError(f"cannot read {file}: {e.strerror or e}") from None
    instances, skipped, cur, qa, start = [], 0, None, [], 0

    def close():
        nonlocal skipped
        if cur is None:
            return
        if len(qa) != 4:
            raise AglclError(f"{file}:{start}: the triplet has {len(qa)} question/answer lines; expected 4 "
                             "(Q1, A1, Q2, A2)")
        if qa[1].strip() != qa[3].strip():
            skipped += 1
            return
        instances.append({"concept": cur, "q1": qa[0], "a1": qa[1], "q2": qa[2], "a2": qa[3]})

    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("(") and line.endswith(")"):
            close()
            parts = line[1:-1].split(",")
            if len(parts) < 3 or not parts[0].strip():
                raise AglclError(f"{file}:{lineno}: malformed triplet {line[:60]!r}; expected (concept, relation, target)")
            cur, qa, start = parts[0].strip(), [], lineno
        elif line[:2] in ("Q1", "A1", "Q2", "A2") and line[2:4] == ": ":
            if cur is None:
                raise AglclError(f"{file}:{lineno}: a question/answer line before any (concept, relation, target) line")
            qa.append(line[4:].strip())
        else:
            raise AglclError(f"{file}:{lineno}: unrecognised line {line[:60]!r}; expected a triplet or Q1:/A1:/Q2: line")
    close()
    return instances, skipped


@functools.lru_cache(maxsize=2)
def _concept1k_tasks(data_file: str, txt_file: str, config_file: str, stamp: tuple) -> dict:
    """``{task_index: {"train": [...], "test": [...], "eval": [...]}}`` from either layout (cached per mtime)."""
    if data_file:
        data = load_json(Path(data_file))
        if not isinstance(data, dict):
            raise AglclError(f"{data_file}: expected an object keyed by task index")
        tasks = {}
        for key, splits in data.items():
            where = f"{data_file}: task {key}"
            if not isinstance(splits, dict):
                raise AglclError(f"{where}: expected an object with train/dev/test")
            if not str(key).isdigit():
                raise AglclError(f"{data_file}: task key {key!r} is not a task index (0, 1, ...)")
            tasks[int(key)] = {}
            for ours, theirs in (("train", "train"), ("eval", "dev"), ("test", "test")):
                part = splits.get(theirs) or {}
                if not isinstance(part, dict):
                    raise AglclError(f"{where}: split {theirs!r} must be an object with 'input' and 'target' lists")
                inputs, targets = part.get("input"), part.get("target")
                if not isinstance(inputs, list) or not isinstance(targets, list) or len(inputs) != len(targets):
                    raise AglclError(f"{where}: split {theirs!r} needs equally long 'input' and 'target' lists")
                tasks[int(key)][ours] = [
                    {"prompt": _text(x, f"{where} {theirs} item {i}", "input"),
                     "answer": _text(y, f"{where} {theirs} item {i}", "target")}
                    for i, (x, y) in enumerate(zip(inputs, targets))]
        return tasks
    config = load_json(Path(config_file))
    concept_list, cur_class = (config.get(k) if isinstance(config, dict) else None for k in ("CONCEPT_LIST", "CUR_CLASS"))
    if not isinstance(concept_list, list) or not isinstance(cur_class, list):
        raise AglclError(f"{config_file}: expected 'CONCEPT_LIST' and 'CUR_CLASS' lists (the codebase's continual_config.json)")
    task_of = {concept_list[c]: t for t, classes in enumerate(cur_class) for c in classes}
    instances, _ = parse_concept1k(Path(txt_file))
    tasks = {t: {"train": [], "eval": [], "test": []} for t in range(len(cur_class))}
    for inst in instances:
        if inst["concept"] not in task_of:
            raise AglclError(f"{txt_file}: concept {inst['concept']!r} is not in {config_file} CONCEPT_LIST")
        t = tasks[task_of[inst["concept"]]]
        t["train"].append({"prompt": inst["q1"], "answer": inst["a1"]})  # memorisation: Q1 -> A1
        t["eval"].append({"prompt": inst["q2"], "answer": inst["a2"]})  # generalisation: the paraphrase
        t["test"].append({"prompt": inst["q2"], "answer": inst["a2"]})
    return tasks


class Concept1KTask:
    """Task ``task`` (0-based) of Concept-1K split into ``num_tasks`` tasks (instance-incremental QA).

    Train pairs are the first question/answer of each (concept, relation) instance, test pairs its
    paraphrased second question, as in the codebase's ``concept_1k_task<N>`` preprocessing. Reads
    ``<root>/concept_1k_task<N>/continual_data.json`` when present, otherwise splits the released
    ``<root>/concept_1k/dataset.txt`` by ``<root>/concept_1k_task<N>/continual_config.json``.
    """

    def __init__(self, root: str | os.PathLike, task: int, num_tasks: int = 10):
        self.root, self.task, self.num_tasks = Path(root).expanduser(), int(task), int(num_tasks)
        self.split_dir = self.root / f"concept_1k_task{self.num_tasks}"
        self.data_file = self.split_dir / "continual_data.json"
        self.config_file = self.split_dir / "continual_config.json"
        self.txt_file = self.root / "concept_1k" / "dataset.txt"

    def missing(self) -> list[Path]:
        if self.data_file.is_file():
            return []
        return [f for f in (self.txt_file, self.config_file) if not f.is_file()]

    def load(self, split: str) -> list[dict]:
        check_split(split)
        if self.missing():
            raise missing_error("Concept-1K", f"concept_1k_task{self.num_tasks}", self.root,
                                ["concept_1k/dataset.txt", f"concept_1k_task{self.num_tasks}/continual_config.json",
                                 f"(or concept_1k_task{self.num_tasks}/continual_data.json)"])
        files = [self.data_file] if self.data_file.is_file() else [self.txt_file, self.config_file]
        stamp = tuple(f.stat().st_mtime_ns for f in files)
        tasks = _concept1k_tasks(str(self.data_file) if self.data_file.is_file() else "", str(self.txt_file),
                                 str(self.config_file), stamp)
        if self.task not in tasks:
            raise AglclError(f"Concept-1K has tasks {choices(tasks)}; {KEY}.task={self.task} is not one of them")
        examples = tasks[self.task][split]
        if not examples:
            raise AglclError(f"split {split!r} of Concept-1K task {self.task} is empty")
        return examples

    def describe(self) -> str:
        return f"Concept-1K task {self.task} of {self.num_tasks} in {self.root}"
