"""Single-task fine-tuning: every task starts again from the initial weights (the plasticity reference).

    aglcl train method=single

At the first ``before_task`` a CPU copy of the trainable parameters (all of them under full fine-tuning; only
the adapter factors under LoRA) is taken; every later ``before_task`` copies it back, so task t's model has
seen task t only. Memory: one CPU copy of the trainable weights, persisted in ``checkpoint/method.safetensors``
(as ``init.<param>``) so a resumed run restarts from the same weights.

Only the diagonal R[t][t] of its accuracy matrix is meaningful (each row is a different single-task model);
forgetting, BWT and OP computed from the off-diagonal cells say nothing about continual learning.
"""

from __future__ import annotations

import torch

from aglcl.errors import AglclError
from aglcl.methods.base import Method


class Single(Method):
    """Restore the initial trainable weights before each task."""

    supports_sharded = False  # whole-tensor state or hooks (not shard-aware yet)
    diagonal_only = True  # the runner reports only plasticity (mean of R's diagonal) for it

    def __init__(self):
        self.initial: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def before_task(self, index, task, model) -> None:
        params = dict(model.named_parameters())
        if not self.initial:
            self.initial = {n: p.detach().to("cpu", copy=True) for n, p in params.items() if p.requires_grad}
            return
        for name, value in self.initial.items():
            if name not in params or params[name].shape != value.shape:
                raise AglclError(f"single: the saved initial weight '{name}' does not match the model")
            params[name].copy_(value)

    def state_dict(self) -> dict:
        return {f"init.{n}": t for n, t in self.initial.items()}

    def load_state_dict(self, state: dict) -> None:
        self.initial = {k.removeprefix("init."): t for k, t in state.items() if k.startswith("init.")}
