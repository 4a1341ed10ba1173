"""The hook vocabulary every continual-learning method implements.

The runner calls ``model = setup(model, num_tasks, first)`` once, after building (and PEFT-wrapping) the
model and before a resume restores its weights (``first`` is the task index training starts at). Then,
for each task ``t`` of the sequence::

    before_task(t, task, model)                 # e.g. snapshot weights, build masks
    train_examples(t, task, examples)           # e.g. mix in a replay buffer, or the union of tasks so far
    attach_optimizer(optimizer)                 # the task's optimizer, once built (e.g. DeepSpeed hooks)
    for each optimizer step:
        loss(model, batch, outputs)   (per micro-batch)   # add penalties / distillation terms
        after_backward(model)         (once per step, after accumulation and sync, before clipping)
        before_step(model, optimizer) (once per step, after clipping, right before optimizer.step)
        after_step(model, optimizer)  (once per step, after optimizer.step, before the lr schedule moves)
    after_task(t, task, model, data)            # e.g. estimate Fisher, fill buffers
    set_importance(maps)                        # the combined importance map, when attribution is on

``Method`` is the one concrete base: every hook is a no-op, which is plain sequential fine-tuning.
Methods keep their tensors in ``state_dict()`` so a run dir can persist and restore them.
"""

from __future__ import annotations

from typing import Any

# The hooks, in the order a run calls them (docs/design.md, "Hook contract").
HOOKS = ("setup", "before_task", "train_examples", "attach_optimizer", "loss", "after_backward", "before_step",
         "after_step", "after_task", "set_importance")

# Capability flags the runner and the engines read, and how Compose combines its methods' values.
FLAGS = {
    "needs_importance": any,  # set_importance needs maps: an attribution estimator is required
    "diagonal_only": any,  # each stage is a separate model (method=single): only R's diagonal is meaningful
    "supports_sharded": all,  # False: whole-tensor state; refused under distributed=fsdp2 and ZeRO-3
    "supports_zero3": all,  # False: reads the weights outside the forward (ZeRO-3 empties them there)
    "reads_grads": any,  # after_backward reads or edits .grad: refused under DeepSpeed (grads live in its partitions)
}


class Method:
    """No-op hooks (sequential fine-tuning). Subclass and override what your method needs."""

    num_tasks: int | None = None  # set by setup()
    needs_importance = False
    diagonal_only = False
    supports_sharded = True
    supports_zero3 = True
    reads_grads = False

    def overrides(self, hook: str) -> bool:
        """Whether this method does something in ``hook`` (a name of :data:`HOOKS`)."""
        return getattr(type(self), hook) is not getattr(Method, hook)

    def setup(self, model: Any, num_tasks: int, first: int) -> Any:
        """Called once before training; returns the model to train (e.g. with adapters added).

        ``num_tasks`` is the sequence length, ``first`` the task index training starts at (> 0 when
        resuming: re-create any structure tasks ``0 .. first-1`` added, so the checkpoint loads into it).
        """
        self.num_tasks = num_tasks
        return model

    def before_task(self, index: int, task: Any, model: Any) -> None:
        """Called before training task ``index`` (0-based)."""

    def train_examples(self, index: int, task: Any, examples: list[dict]) -> list[dict]:
        """The encoded examples task ``index`` trains on; default: the task's own."""
        return examples

    def attach_optimizer(self, optimizer: Any) -> None:
        """Called once per task with the (prepared) optimizer, before the first step (e.g. DeepSpeed hooks)."""

    def loss(self, model: Any, batch: dict, outputs: Any):
        """The loss to back-propagate for one micro-batch; default: the LM loss on answer tokens."""
        return outputs.loss

    def after_backward(self, model: Any) -> None:
        """Called once per optimizer step, after gradients are accumulated and synchronised."""

    def before_step(self, model: Any, optimizer: Any) -> None:
        """Called once per optimizer step, after clipping, right before ``optimizer.step()``."""

    def after_step(self, model: Any, optimizer: Any) -> None:
        """Called once per optimizer step, right after ``optimizer.step()``."""

    def after_task(self, index: int, task: Any, model: Any, data: Any) -> None:
        """Called after training task ``index``; ``data`` is that task's encoded training set."""

    def set_importance(self, maps: dict) -> None:
        """Receive the combined importance map ``{param_name: tensor in [0, 1]}`` after a task."""

    def state_dict(self) -> dict:
        """Tensors and values to persist in the run dir."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
