"""Task specs (``conf/task/*.yaml``) and the sequence they form (``conf/sequence/*.yaml``).

A task spec names a data ``source`` (anything with ``load(split) -> [{"prompt", "answer", ...}]``), a
prompt ``template`` with ``{prompt}`` (and any other field the source gives, e.g. ``{options}``), an
optional ``chat_template``, the ``scoring`` strategy and ``metric``, split sizes, and optionally the
expected ``labels``.

A sequence lists its ``tasks`` and an ``order``: a list of task names, or the name of one of its
``orders`` presets. ``aglcl train sequence=standard_cl order=order2`` picks a preset from the top level.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from aglcl.errors import AglclError, choices

_SAFE_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*")
SPEC_KEYS = {
    "source", "template", "chat_template", "answer_prefix", "metric", "scoring", "train_size", "eval_size",
    "eval_split", "labels",
}

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

    @property
    def labels(self) -> list[str]:
        """The label set: ``labels`` of the spec or the source (labels.json), else the train split's answers."""
        if self.expected_labels:
            return list(self.expected_labels)
        return sorted({ex["answer"] for ex in self.train})


def render(template: str, example: dict, key: str) -> str:
    try:
        return template.format(**example)
    except (KeyError, IndexError, ValueError) as exc:
        fields = choices(k for k in example if k not in ("references", "source"))
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


def _check_template(template: str, key: str) -> None:
    """Refuse templates that would leak the answer into the prompt or cannot be parsed."""
    import string

    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise AglclError(f"{key}.template {template!r} is malformed ({exc}); use {{{{ }}}} for literal braces") from None
    if any(f.split(".")[0].split("[")[0] == "answer" for f in fields):
        raise AglclError(f"{key}.template uses {{answer}}, which would copy the answer into the prompt; "
                         f"use {{prompt}} (the answer is appended after answer_prefix)")


def _check_labels(name: str, split: str, examples: list[dict], labels: list[str]) -> None:
    allowed = set(labels)
    for i, ex in enumerate(examples):
        if ex["answer"] not in allowed:
            shown = ", ".join(repr(x) for x in labels[:12]) + (", ..." if len(labels) > 12 else "")
            raise AglclError(f"task '{name}' {split} example {i + 1} has answer {ex['answer']!r}, which is not in "
                             f"its label set ({shown}); fix the data or sequence.tasks.{name}.labels")


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


def _templated(examples: list[dict], template: str, chat_template: str | None, key: str) -> list[dict]:
    out = []
    for ex in examples:
        row = {"prompt": apply_chat_template(chat_template, render(template, ex, key), key), "answer": ex["answer"],
               "source": ex["prompt"]}
        if ex.get("references"):
            row["references"] = list(ex["references"])
        out.append(row)
    return out


def load_sequence(sequence_cfg: Any, limit: Any = None, data_seed: int = 0) -> list[Task]:
    """Build the ordered tasks of ``sequence_cfg`` and load their data (errors before any training)."""
    from hydra.utils import instantiate

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
        _check_template(template, key)
        source = instantiate(spec.source)
        train = _subset(source.load("train"), train_size, cap_train, data_seed)
        test = _subset(source.load(spec.get("eval_split", "test")), eval_size, cap_eval, data_seed)
        scoring_labels = (spec.get("scoring") or {}).get("labels")
        labels = (spec.get("labels") or scoring_labels
                  or (source.labels() if callable(getattr(source, "labels", None)) else None))
        if labels:
            for split, examples in (("train", train), ("test", test)):
                _check_labels(name, split, examples, [str(x) for x in labels])
        tasks.append(
            Task(
                name=name,
                template=template,
                answer_prefix=spec.get("answer_prefix", ""),
                metric=spec.get("metric", "exact_match"),
                scoring=instantiate(spec.scoring),
                train=_templated(train, template, chat_template, key),
                test=_templated(test, template, chat_template, key),
                expected_labels=[str(x) for x in labels] if labels else None,
            )
        )
    return tasks


def check_task(name: str, spec: Any, load: bool = False) -> dict:
    """What ``aglcl data list`` / ``validate`` report for one task spec, without raising.

    Returns ``{"task", "source", "missing": [paths], "counts": {split: n}, "labels": n | None,
    "problems": [one-line strings]}``. ``load=False`` only checks that the files exist (and, when some
    are missing, records the loader's message saying where to get them).
    """
    from hydra.utils import instantiate

    row = {"task": name, "source": "", "missing": [], "counts": {}, "labels": None, "problems": []}
    try:
        source = instantiate(spec.source)
    except Exception as exc:  # a bad source spec: report it, keep going with the other tasks
        cause = exc.__cause__ if isinstance(exc.__cause__, AglclError) else exc
        row["problems"].append(str(cause).splitlines()[0] if str(cause) else type(cause).__name__)
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
    for split in ("train", spec.get("eval_split", "test")):
        try:
            examples = source.load(split)
        except AglclError as exc:
            row["problems"].append(str(exc))
            continue
        row["counts"][split] = len(examples)
        empty = sum(1 for ex in examples if not str(ex["prompt"]).strip() or not str(ex["answer"]).strip())
        if empty:
            row["problems"].append(f"{split}: {empty} examples with an empty prompt or answer")
        answers |= {ex["answer"] for ex in examples}
    expected = spec.get("labels")
    if not expected and hasattr(source, "labels"):
        try:
            expected = source.labels()
        except AglclError as exc:
            row["problems"].append(str(exc))
    if expected:
        row["labels"] = len(expected)
        unknown = sorted(answers - {str(x) for x in expected})
        if unknown:
            shown = ", ".join(repr(a[:30]) for a in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
            row["problems"].append(f"{len(unknown)} answers outside the label set {choices(expected)}: {shown}")
    return row
