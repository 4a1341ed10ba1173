"""Task specs (``conf/task/*.yaml``) and the sequence they form (``conf/sequence/*.yaml``).

A task spec names a data ``source`` (anything with ``load(split) -> [{"prompt", "answer", ...}]``), a
prompt ``template`` with ``{prompt}`` (and any other field the source gives, e.g. ``{options}``), an
optional ``chat_template``, the ``scoring`` strategy and ``metric``, split sizes, and optionally the
expected ``labels``.

A sequence lists its ``tasks`` and an ``order``: a list of task names, or the name of one of its
``orders`` presets. ``aglcl train sequence=standard_cl order=order2`` picks a preset from the top level.
"""

from __future__ import annotations

import logging
import random
import re
import string
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aglcl.errors import AglclError, choices

log = logging.getLogger(__name__)
_SAFE_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")
SPEC_KEYS = {
    "source", "template", "chat_template", "answer_prefix", "metric", "scoring", "train_size", "eval_size",
    "eval_split", "labels",
}
SPLITS = ("train", "eval", "test")
NOT_FIELDS = ("answer", "references", "source")  # example keys a template may not use (or that are no text)
_SOURCE_KEY = re.compile(r"\btask\.source\b")  # how sources name their options; load_sequence names the task
_SENTINEL = "\x00aglcl-prompt\x00"
_SCORERS = "aglcl.data.scoring.LabelLikelihood, aglcl.data.scoring.Generation or ...GreedyGeneration"

# Built-in chat templates (a user turn, then the assistant's turn opened); any Jinja chat template from a
# tokenizer_config.json works too. The tokenizer adds BOS itself, and the answer's EOS comes from training.
CHAT_TEMPLATES = {
    "chatml": "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
    "llama2": "[INST] {prompt} [/INST]",
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": "### Instruction:\n{prompt}\n\n### Response:\n",
}


@dataclass
class Task:
    """One task of a sequence, with its data loaded and templated."""

    name: str
    template: str
    answer_prefix: str
    metric: str
    scoring: Any
    train: list[dict] = field(default_factory=list)  # {"prompt": templated text, "answer": str, ...}
    test: list[dict] = field(default_factory=list)
    expected_labels: list[str] | None = None
    inferred_labels: list[str] | None = None  # the distinct answers of the whole train split (before subsetting)

    @property
    def labels(self) -> list[str]:
        """The label set: ``labels`` of the spec or the source (labels.json), else the train split's answers."""
        if self.expected_labels:
            return list(self.expected_labels)
        if self.inferred_labels:
            return list(self.inferred_labels)
        return sorted({ex["answer"] for ex in self.train})


def _shown(labels: Sequence[str], n: int = 12) -> str:
    return ", ".join(repr(x) for x in list(labels)[:n]) + (", ..." if len(labels) > n else "")


@contextmanager
def _keyed(key: str):
    """Re-raise a source's AglclError with its options under their full key (``sequence.tasks.<name>.source``)."""
    try:
        yield
    except AglclError as exc:
        raise AglclError(_SOURCE_KEY.sub(f"{key}.source", str(exc))) from None


def _build(node: Any, key: str, example: str) -> Any:
    """``instantiate(node)``; a missing node or a target that cannot be built is one AglclError naming ``key``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if node is None:
        raise AglclError(f"{key} is missing; give one, e.g. {example}")
    with _keyed(key.rsplit(".", 1)[0]):
        try:
            return instantiate(node)
        except InstantiationException as exc:
            if isinstance(exc.__cause__, AglclError):
                raise exc.__cause__ from None
            raise AglclError(f"{key} cannot be built: {exc}") from None


def render(template: str, example: dict, key: str) -> str:
    try:
        return template.format(**example)
    except (KeyError, IndexError, ValueError) as exc:
        fields = choices(k for k in example if k not in NOT_FIELDS)
        raise AglclError(
            f"{key}.template cannot be filled ({exc!r}); its fields are {fields} (and {{{{ }}}} for literal braces)"
        ) from None


def apply_chat_template(chat_template: str | None, prompt: str, key: str) -> str:
    """Wrap ``prompt`` as one user turn with the assistant's turn opened.

    ``chat_template`` is null (plain text), a built-in name (:data:`CHAT_TEMPLATES`) or a Jinja chat
    template (as in a model's ``tokenizer_config.json``), rendered with ``add_generation_prompt=True``.
    """
    if not chat_template:
        return prompt
    if chat_template in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[chat_template].replace("{prompt}", prompt)
    if "{{" in chat_template or "{%" in chat_template:
        import jinja2

        try:
            env = jinja2.Environment(undefined=jinja2.StrictUndefined)
            env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(jinja2.TemplateError(msg))
            return env.from_string(chat_template).render(
                messages=[{"role": "user", "content": prompt}], add_generation_prompt=True, bos_token="", eos_token=""
            )
        except jinja2.TemplateError as exc:
            raise AglclError(f"{key}.chat_template cannot be rendered: {exc}") from None
    raise AglclError(
        f"unknown {key}.chat_template {chat_template!r}; choose one of {choices(CHAT_TEMPLATES)}, null, "
        "or a Jinja chat template"
    )


def _size(value: Any, key: str) -> int | None:
    """A split size or cap: a positive integer, or null for all."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AglclError(f"{key}={value!r} is invalid: must be an integer >= 1, or null (all examples)")
    return value


def _check_template(template: Any, key: str) -> set[str]:
    """The fields ``template`` uses; refuses a template that is malformed, would leak the answer into the
    prompt, or uses positional (``{}``), attribute (``{prompt.x}``) or index (``{prompt[0]}``) fields."""
    if not isinstance(template, str):
        raise AglclError(f"{key}.template must be a string using {{prompt}}, got {type(template).__name__} "
                         f"{template!r}")
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise AglclError(f"{key}.template {template!r} is malformed ({exc}); use {{{{ }}}} for literal braces") from None
    for f in sorted(fields):
        base = re.split(r"[.\[]", f, maxsplit=1)[0]
        if base == "answer":
            raise AglclError(f"{key}.template uses {{answer}}, which would copy the answer into the prompt; "
                             f"use {{prompt}} (the answer is appended after answer_prefix)")
        if not base or base.isdigit():
            raise AglclError(f"{key}.template has a positional field {{{f}}}; name a field, e.g. {{prompt}}")
        if f != base:
            raise AglclError(f"{key}.template field {{{f}}} uses attribute or index access; use plain fields "
                             f"such as {{{base}}}")
    return fields


def _check_fields(fields: set[str], example: dict, key: str) -> None:
    """Refuse a template without ``{prompt}`` or with a field the source's examples do not have."""
    available = choices(k for k in example if k not in NOT_FIELDS)
    if "prompt" not in fields:
        raise AglclError(f"{key}.template does not use {{prompt}}, so every example would get the same "
                         f"prompt; use {{prompt}} (fields it may use: {available})")
    unknown = sorted((fields - set(example)) | (fields & set(NOT_FIELDS)))
    if unknown:
        raise AglclError(f"{key}.template uses {{{unknown[0]}}}, which this task's source does not give; "
                         f"fields it may use: {available}")


def _check_chat_template(chat_template: Any, key: str) -> None:
    """Refuse a chat template that is not a string or never inserts the prompt (every prompt the same)."""
    if chat_template is None:
        return
    if not isinstance(chat_template, str):
        raise AglclError(f"{key}.chat_template must be null, one of {choices(CHAT_TEMPLATES)} or a Jinja chat "
                         f"template, got {type(chat_template).__name__}")
    if chat_template and _SENTINEL not in apply_chat_template(chat_template, _SENTINEL, key):
        raise AglclError(f"{key}.chat_template never inserts the prompt (messages[0]['content']), so every "
                         f"example would get the same prompt; choose one of {choices(CHAT_TEMPLATES)} or fix it")


def _label_list(value: Any, key: str) -> list[str] | None:
    """A declared label set as strings (null or [] for none); refuses a string, a mapping, null or nested entries."""
    if value is None:
        return None
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise AglclError(f"{key} must be a list of labels, e.g. [yes, no], or null (the train answers); got "
                         f"{type(value).__name__} {value!r}")
    for x in value:
        if isinstance(x, bool):
            raise AglclError(f"{key} holds {x!r}: YAML reads yes/no/on/off/true/false as booleans; quote "
                             f"the labels, e.g. ['yes', 'no']")
        if not isinstance(x, str | int | float):
            raise AglclError(f"{key} holds {x!r}; each label must be a string")
    return [str(x) for x in value] or None


def label_set_problem(name: str, labels: list[str] | None, train: list[dict], test: list[dict]) -> str | None:
    """Why :class:`~aglcl.data.scoring.LabelLikelihood` could not score task ``name``, or None.

    ``labels`` is the declared set (spec, ``scoring.labels`` or the source's), None when it is inferred
    from the ``train`` answers; refused are an empty label, a single label (always predicted), and an
    inferred set that lacks a ``test`` answer (which could then never be predicted) or looks like free text
    (over 100 labels, most train answers distinct: each would be scored for every example).
    """
    key = f"sequence.tasks.{name}"
    label_set = list(labels) if labels else sorted({ex["answer"] for ex in train})
    origin = "its label set" if labels else f"the label set inferred from its {len(train)} train answers"
    empty = [x for x in label_set if not x.strip()]
    if empty:
        return (f"task '{name}': {origin} holds an empty label {empty[0]!r}, which cannot be scored; fix the "
                f"data's answers (see {key}.source.answer_field) or declare {key}.labels=[...]")
    if len(set(label_set)) < 2:
        return (f"task '{name}': {origin} has the single label {label_set[0]!r}, which LabelLikelihood would "
                f"always predict; declare every label with {key}.labels=[...] or score it with Generation")
    if not labels and len(label_set) > 100 and len(label_set) > len(train) / 2:
        return (f"task '{name}': {len(label_set)} of its {len(train)} train answers are distinct, which looks like "
                f"free text rather than labels; score it with aglcl.data.scoring.Generation ({key}.scoring) or "
                f"declare {key}.labels=[...]")
    if not labels:
        missing = sorted({ex["answer"] for ex in test} - set(label_set))
        if missing:
            return (f"task '{name}': test answer {missing[0]!r} ({len(missing)} missing in all) is not in "
                    f"{origin} ({_shown(label_set)}), so it could never be predicted; declare the label set "
                    f"with {key}.labels=[...]")
    return None


def _check_labels(name: str, split: str, examples: list[dict], labels: list[str]) -> None:
    allowed = set(labels)
    for i, ex in enumerate(examples):
        if ex["answer"] not in allowed:
            raise AglclError(f"task '{name}' {split} example {i + 1} has answer {ex['answer']!r}, which is not in "
                             f"its label set ({_shown(labels)}); fix the data or sequence.tasks.{name}.labels")


def _check_answers(name: str, split: str, examples: list[dict]) -> None:
    """Refuse an empty split, or one whose every answer is empty (e.g. an answer field naming an empty column)."""
    if not examples:
        raise AglclError(f"the {split} split of task '{name}' is empty; check sequence.tasks.{name}.source")
    if not any(str(ex["answer"]).strip() for ex in examples):
        raise AglclError(f"every {split} answer of task '{name}' is empty; check "
                         f"sequence.tasks.{name}.source.answer_field (the field that holds the answer)")


def _subset(examples: list[dict], size: int | None, cap: int | None, seed: int) -> list[dict]:
    n = min(x for x in (size, cap, len(examples)) if x is not None)
    if n >= len(examples):
        return list(examples)
    return random.Random(seed).sample(examples, n)


def _top_level_order(sequence_cfg: Any) -> Any:
    """The top-level ``order`` key of the config ``sequence_cfg`` belongs to (``aglcl train order=...``)."""
    get_root = getattr(sequence_cfg, "_get_root", None)
    if get_root is None:
        return None
    root = get_root()
    if root is sequence_cfg or "sequence" not in root:
        return None
    return root.get("order")


def resolve_order(sequence_cfg: Any) -> list[str]:
    """The task names of ``sequence_cfg`` in training order, with presets resolved and checked."""
    tasks_cfg = sequence_cfg.get("tasks") or {}
    presets = dict(sequence_cfg.get("orders") or {})
    name = sequence_cfg.get("name") or "sequence"
    order = sequence_cfg.get("order")
    top = _top_level_order(sequence_cfg)
    if top is not None:
        if isinstance(top, str) and not presets:
            raise AglclError(
                f"order={top}: sequence {name!r} has no order presets; give sequence.order=[task, ...] "
                f"with tasks from {choices(tasks_cfg)}"
            )
        order = top
    if isinstance(order, str):
        if order not in presets:
            hint = f"choose one of {choices(presets)}" if presets else "this sequence has no presets"
            raise AglclError(
                f"unknown order preset {order!r} for sequence {name!r}; {hint}, or give sequence.order=[task, ...]"
            )
        order = presets[order]
    order = [str(t) for t in (order or [])]
    if not order:
        raise AglclError(f"sequence.order is empty; list at least one of: {choices(tasks_cfg)}")
    for task in order:
        if task not in tasks_cfg:
            raise AglclError(f"sequence.order names unknown task '{task}'; choose from: {choices(tasks_cfg)}")
    if len(set(order)) != len(order):
        raise AglclError(f"sequence.order repeats a task: {order}")
    for task in order:  # task names become file names in the run dir: they must not escape it
        if not _SAFE_NAME.fullmatch(task):
            raise AglclError(f"task name {task!r} cannot be a file name; use letters, digits, '_', '-' and '.' "
                             f"(not first)")
    return order


def _templated(examples: list[dict], template: str, chat_template: str | None, key: str, split: str) -> list[dict]:
    out = []
    for i, ex in enumerate(examples):
        row = {"prompt": apply_chat_template(chat_template, render(template, ex, key), key), "answer": ex["answer"],
               "source": ex["prompt"]}
        if not row["prompt"].strip():  # nothing to condition on (and no token at all without a BOS)
            raise AglclError(f"task '{key.removeprefix('sequence.tasks.')}' {split} example {i + 1} has an empty "
                             f"prompt after {key}.template {template!r}; fix the data (see {key}.source.prompt_field) "
                             "or the template")
        if ex.get("references"):
            row["references"] = list(ex["references"])
        out.append(row)
    return out


def load_sequence(sequence_cfg: Any, limit: Any = None, data_seed: int = 0, split: str | None = None) -> list[Task]:
    """Build the ordered tasks of ``sequence_cfg`` and load their data (errors before any training).

    ``split`` (``evaluation.split``) scores that split of every task instead of each task's ``eval_split``:
    ``eval`` for tuning, so that choosing a setting never reads the test split.

    A :class:`~aglcl.data.scoring.LabelLikelihood` task without declared labels scores the distinct
    answers of its whole train split (caps and ``train_size`` do not shrink the set); that is logged once
    per task, and refused when the set cannot score the test answers (:func:`label_set_problem`).
    """
    from aglcl.data.scoring import LabelLikelihood
    from aglcl.metrics.scorers import get_scorer

    tasks_cfg = sequence_cfg.get("tasks") or {}
    order = resolve_order(sequence_cfg)
    cap_train = _size(limit.get("train") if limit else None, "limit.train")
    cap_eval = _size(limit.get("eval") if limit else None, "limit.eval")
    tasks = []
    for name in order:
        spec = tasks_cfg[name]
        key = f"sequence.tasks.{name}"
        unknown = set(spec) - SPEC_KEYS
        if unknown:
            raise AglclError(f"{key} has unknown keys {sorted(unknown)}; valid keys: {sorted(SPEC_KEYS)}")
        train_size, eval_size = _size(spec.get("train_size"), f"{key}.train_size"), _size(spec.get("eval_size"),
                                                                                          f"{key}.eval_size")
        template, chat_template = spec.get("template", "{prompt}"), spec.get("chat_template")
        fields = _check_template(template, key)
        _check_chat_template(chat_template, key)
        answer_prefix, metric = spec.get("answer_prefix", ""), spec.get("metric", "exact_match")
        if not isinstance(answer_prefix, str):
            raise AglclError(f"{key}.answer_prefix must be a string (e.g. ' ', or '' for none), got "
                             f"{type(answer_prefix).__name__} {answer_prefix!r}")
        if not isinstance(metric, str):
            raise AglclError(f"{key}.metric must be a scorer name, got {type(metric).__name__} {metric!r}")
        try:
            get_scorer(metric)
        except AglclError as exc:
            raise AglclError(f"{key}.metric: {exc}") from None
        eval_split = split or spec.get("eval_split", "test")
        if eval_split not in SPLITS:
            raise AglclError(f"{key}.eval_split={eval_split!r} is invalid; choose one of {choices(SPLITS)}")
        spec_labels = _label_list(spec.get("labels"), f"{key}.labels")
        scoring_labels = _label_list((spec.get("scoring") or {}).get("labels"), f"{key}.scoring.labels")
        if spec_labels and scoring_labels and set(spec_labels) != set(scoring_labels):
            raise AglclError(f"{key}.labels and {key}.scoring.labels differ; give the label set once")
        scoring = _build(spec.get("scoring"), f"{key}.scoring", f"{{_target_: {_SCORERS}}}")
        source = _build(spec.get("source"), f"{key}.source", "{_target_: aglcl.data.sources.LocalDir, path: ...}")
        with _keyed(key):
            full_train = source.load("train")
            test = _subset(source.load(eval_split), eval_size, cap_eval, data_seed)
            labels = (spec_labels or scoring_labels
                      or (source.labels() if callable(getattr(source, "labels", None)) else None))
        labels = [str(x) for x in labels] if labels else None
        train = _subset(full_train, train_size, cap_train, data_seed)
        for part, examples in (("train", train), ("test", test)):
            _check_answers(name, part, examples)
            if labels:
                _check_labels(name, part, examples, labels)
        _check_fields(fields, train[0], key)
        inferred = None
        if isinstance(scoring, LabelLikelihood):
            problem = label_set_problem(name, labels, full_train, test)
            if problem:
                raise AglclError(problem)
            if not labels:
                inferred = sorted({ex["answer"] for ex in full_train})
                log.warning("task '%s': no label set declared; LabelLikelihood scores the %d distinct train answers "
                            "(%s); declare them with %s.labels=[...]", name, len(inferred), _shown(inferred), key)
        tasks.append(
            Task(
                name=name,
                template=template,
                answer_prefix=answer_prefix,
                metric=metric,
                scoring=scoring,
                train=_templated(train, template, chat_template, key, "train"),
                test=_templated(test, template, chat_template, key, "test"),
                expected_labels=labels,
                inferred_labels=inferred,
            )
        )
    return tasks


def check_task(name: str, spec: Any, load: bool = False) -> dict:
    """What ``aglcl data list`` / ``validate`` report for one task spec, without raising.

    Returns ``{"task", "source", "missing": [paths], "counts": {split: n}, "labels": n | None,
    "problems": [one-line strings]}``. ``load=False`` only checks that the files exist (and, when some
    are missing, records the loader's message saying where to get them); ``load=True`` also checks the
    template against the examples' fields and, for LabelLikelihood, the label set (:func:`label_set_problem`).
    """
    from hydra.utils import instantiate

    row = {"task": name, "source": "", "missing": [], "counts": {}, "labels": None, "problems": []}
    key = f"sequence.tasks.{name}"
    try:
        source = instantiate(spec.source)
    except Exception as exc:  # a bad source spec: report it, keep going with the other tasks
        cause = exc.__cause__ if isinstance(exc.__cause__, AglclError) else exc
        text = " ".join(str(cause).split()) or type(cause).__name__
        row["problems"].append(_SOURCE_KEY.sub(f"{key}.source", text))
        return row
    row["source"] = source.describe() if hasattr(source, "describe") else type(source).__name__
    row["missing"] = [str(p) for p in source.missing()] if hasattr(source, "missing") else []
    if row["missing"]:  # the loader's own message says which files, where, and where to get them
        try:
            source.load("train")
        except AglclError as exc:
            row["problems"].append(str(exc))
        return row
    if not load:
        return row
    answers: set[str] = set()
    loaded = {}
    for split in ("train", spec.get("eval_split", "test")):
        try:
            with _keyed(key):
                examples = loaded[split] = source.load(split)
        except AglclError as exc:
            row["problems"].append(str(exc))
            continue
        row["counts"][split] = len(examples)
        empty = sum(1 for ex in examples if not str(ex["prompt"]).strip() or not str(ex["answer"]).strip())
        if empty:
            row["problems"].append(f"{split}: {empty} examples with an empty prompt or answer")
        answers |= {ex["answer"] for ex in examples}
    scoring = spec.get("scoring") or {}
    try:  # the checks load_sequence makes on the data, reported as problems of this row
        expected = (_label_list(spec.get("labels"), f"{key}.labels")
                    or _label_list(scoring.get("labels"), f"{key}.scoring.labels"))
        if not expected and hasattr(source, "labels"):
            with _keyed(key):
                expected = [str(x) for x in source.labels()]
        if expected:
            row["labels"] = len(expected)
            unknown = sorted(answers - set(expected))
            if unknown:
                shown = ", ".join(repr(a[:30]) for a in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
                row["problems"].append(f"{len(unknown)} answers outside the label set {choices(expected)}: {shown}")
        if loaded.get("train"):
            _check_fields(_check_template(spec.get("template", "{prompt}"), key), loaded["train"][0], key)
            _check_chat_template(spec.get("chat_template"), key)
            if str(scoring.get("_target_", "")).endswith("LabelLikelihood"):
                problem = label_set_problem(name, expected, loaded["train"], loaded.get(spec.get("eval_split", "test"), []))
                if problem:
                    row["problems"].append(problem)
    except AglclError as exc:
        row["problems"].append(str(exc))
    return row
