"""Multi-task (joint) training: each task trains on the union of every task seen so far (the upper bound).

    aglcl train method=multitask
    aglcl train method=multitask trainer.max_steps=null trainer.epochs=1   # steps grow with the union

Task t trains on ``D_1 ∪ … ∪ D_t`` (the encoded training splits, concatenated; the loader shuffles them).
With a fixed ``trainer.max_steps`` each task gets the same number of steps over a growing set; with
``max_steps: null`` an epoch over the union. Every earlier task's encoded training split is kept in memory
and persisted as flat int64 tensors (:func:`aglcl.methods.replay.pack_examples`), so a resumed run trains on
the same union.
"""

from __future__ import annotations

from aglcl.methods.base import Method
from aglcl.methods.replay import pack_examples, unpack_examples


class MultiTask(Method):
    """Train on the concatenation of all earlier tasks' examples plus the current task's."""


    def __init__(self):
        self.seen: list[dict] = []

    def train_examples(self, index, task, examples):
        return self.seen + list(examples)

    def after_task(self, index, task, model, data) -> None:
        self.seen.extend(data)

    def state_dict(self) -> dict:
        return pack_examples(self.seen, prefix="seen.")

    def load_state_dict(self, state: dict) -> None:
        self.seen = unpack_examples(state, prefix="seen.")
