"""Task specs (``conf/task/*.yaml``) and the sequence they form (``conf/sequence/*.yaml``).

A task spec names a data ``source`` (anything with ``load(split) -> [{"prompt", "answer"}]``), a
prompt ``template`` with ``{prompt}``, the ``scoring`` strategy and ``metric``, and split sizes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from aglcl.errors import AglclError, choices

SPEC_KEYS = {"source", "template", "answer_prefix", "metric", "scoring", "train_size", "eval_size", "eval_split"}


@dataclass
class Task:
    """One task of a sequence, with its data loaded and templated."""

    name: str
    template: str
    answer_prefix: str
    metric: str
    scoring: Any
    train: list[dict] = field(default_factory=list)  # {"prompt": templated text, "answer": str}
    test: list[dict] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """Distinct answers of the training split (the label set of classification tasks)."""
        return sorted({ex["answer"] for ex in self.train})


def render(template: str, example: dict, key: str) -> str:
    try:
        return template.format(**example)
    except (KeyError, IndexError, ValueError) as exc:
        raise AglclError(
            f"{key}.template cannot be filled ({exc!r}); use {{prompt}} (and {{{{ }}}} for literal braces)"
        ) from None


def _subset(examples: list[dict], size: int | None, cap: int | None, seed: int) -> list[dict]:
    n = min(x for x in (size, cap, len(examples)) if x is not None)
    if n >= len(examples):
        return list(examples)
    return random.Random(seed).sample(examples, n)


def load_sequence(sequence_cfg: Any, limit: Any = None, data_seed: int = 0) -> list[Task]:
    """Build the ordered tasks of ``sequence_cfg`` and load their data (errors before any training)."""
    from hydra.utils import instantiate

    tasks_cfg = sequence_cfg.get("tasks") or {}
    order = list(sequence_cfg.get("order") or [])
    if not order:
        raise AglclError(f"sequence.order is empty; list at least one of: {choices(tasks_cfg)}")
    for name in order:
        if name not in tasks_cfg:
            raise AglclError(f"sequence.order names unknown task '{name}'; choose from: {choices(tasks_cfg)}")
    if len(set(order)) != len(order):
        raise AglclError(f"sequence.order repeats a task: {order}")
    cap_train = limit.get("train") if limit else None
    cap_eval = limit.get("eval") if limit else None
    tasks = []
    for name in order:
        spec = tasks_cfg[name]
        key = f"sequence.tasks.{name}"
        unknown = set(spec) - SPEC_KEYS
        if unknown:
            raise AglclError(f"{key} has unknown keys {sorted(unknown)}; valid keys: {sorted(SPEC_KEYS)}")
        source = instantiate(spec.source)
        train = _subset(source.load("train"), spec.get("train_size"), cap_train, data_seed)
        test = _subset(source.load(spec.get("eval_split", "test")), spec.get("eval_size"), cap_eval, data_seed)
        template = spec.get("template", "{prompt}")
        templated = [
            [{"prompt": render(template, ex, key), "answer": ex["answer"]} for ex in split] for split in (train, test)
        ]
        tasks.append(
            Task(
                name=name,
                template=template,
                answer_prefix=spec.get("answer_prefix", ""),
                metric=spec.get("metric", "exact_match"),
                scoring=instantiate(spec.scoring),
                train=templated[0],
                test=templated[1],
            )
        )
    return tasks
