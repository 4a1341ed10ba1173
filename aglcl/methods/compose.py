"""Several methods at once, composed by config: every hook runs each method in the order given.

    aglcl train method=agft_replay                               # AGFT's gate + a 10% replay buffer
    aglcl train method=agft_replay method.methods.replay.fraction=0.01
    aglcl train method=ewc_replay

Hooks: ``setup`` and ``train_examples`` chain (each sees the previous one's result); ``loss`` adds every
method's extra term, ``m.loss(...) - outputs.loss``, to the task loss; all other hooks run in order.
State is namespaced: ``<name>.<key>`` in ``checkpoint/method.safetensors``.
"""

from __future__ import annotations

from aglcl.errors import AglclError
from aglcl.methods.base import FLAGS, Method


class Compose(Method):
    """Run the hooks of ``methods`` (``{name: Method}``, instantiated by Hydra) in order."""


    def __init__(self, methods: dict):
        if not methods:
            raise AglclError("method.methods is empty; give at least one {name: {_target_: ...}} entry")
        for key, method in methods.items():
            if not isinstance(method, Method):
                raise AglclError(f"method.methods.{key} is not a method (got {type(method).__name__}); "
                                 f"give a _target_ from aglcl.methods")
        self.methods = dict(methods)
        for flag, combine in FLAGS.items():  # every capability flag, combined over the methods
            setattr(self, flag, combine(getattr(m, flag) for m in self.methods.values()))

    def overrides(self, hook: str) -> bool:
        return any(m.overrides(hook) for m in self.methods.values())

    def setup(self, model, num_tasks, first):
        model = super().setup(model, num_tasks, first)
        for method in self.methods.values():
            model = method.setup(model, num_tasks, first)
        return model

    def before_task(self, index, task, model) -> None:
        for method in self.methods.values():
            method.before_task(index, task, model)

    def train_examples(self, index, task, examples):
        for method in self.methods.values():
            examples = method.train_examples(index, task, examples)
        return examples

    def attach_optimizer(self, optimizer) -> None:
        for method in self.methods.values():
            method.attach_optimizer(optimizer)

    def loss(self, model, batch, outputs):
        base = outputs.loss
        total = base
        for method in self.methods.values():
            total = total + (method.loss(model, batch, outputs) - base)
        return total

    def after_backward(self, model) -> None:
        for method in self.methods.values():
            method.after_backward(model)

    def before_step(self, model, optimizer) -> None:
        for method in self.methods.values():
            method.before_step(model, optimizer)

    def after_step(self, model, optimizer) -> None:
        for method in self.methods.values():
            method.after_step(model, optimizer)

    def after_task(self, index, task, model, data) -> None:
        for method in self.methods.values():
            method.after_task(index, task, model, data)

    def set_importance(self, maps) -> None:
        for method in self.methods.values():
            method.set_importance(maps)

    def state_dict(self) -> dict:
        return {f"{key}.{k}": v for key, method in self.methods.items() for k, v in method.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        for key, method in self.methods.items():
            prefix = f"{key}."
            method.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
