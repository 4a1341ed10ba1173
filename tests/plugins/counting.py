"""A method that overrides every hook and counts its calls: the hook contract's probe (tests/test_hooks.py).

    aglcl train method._target_=plugins.counting.Counting +method.out=/tmp/counts   # PYTHONPATH=tests

After each task, rank r writes ``<out>/rank<r>.json``: ``{hook: calls}`` summed over the run so far.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from aglcl import dist
from aglcl.methods.base import HOOKS, Method


class Counting(Method):
    def __init__(self, out: str):
        self.out, self.calls = Path(out), Counter()

    def setup(self, model, num_tasks, first):
        self.calls["setup"] += 1
        return super().setup(model, num_tasks, first)

    def before_task(self, index, task, model):
        self.calls["before_task"] += 1

    def train_examples(self, index, task, examples):
        self.calls["train_examples"] += 1
        return examples

    def attach_optimizer(self, optimizer):
        self.calls["attach_optimizer"] += 1

    def loss(self, model, batch, outputs):
        self.calls["loss"] += 1
        return outputs.loss

    def after_backward(self, model):
        self.calls["after_backward"] += 1

    def before_step(self, model, optimizer):
        self.calls["before_step"] += 1

    def after_step(self, model, optimizer):
        self.calls["after_step"] += 1

    def after_task(self, index, task, model, data):
        self.calls["after_task"] += 1
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{dist.rank()}.json").write_text(json.dumps({h: self.calls[h] for h in HOOKS}))

    def set_importance(self, maps):
        self.calls["set_importance"] += 1
