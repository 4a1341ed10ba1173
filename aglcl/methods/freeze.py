"""Freeze part of the model from a given task on (e.g. the lower blocks, or the embeddings).

    aglcl train method=freeze                                        # blocks 0-5 frozen from the second task on
    aglcl train method=freeze method.layers=[0,12] method.from_task=0
    aglcl train method=freeze method.layers=null method.patterns=[embed_tokens,lm_head]

A parameter is frozen (``requires_grad`` False, set in ``before_task`` before the optimizer is built from the
trainable parameters) from task index ``from_task`` on (0-based; the default 1 is the second task) when

* its name contains ``.layers.<i>.`` or ``.h.<i>.`` (Llama / GPT-2 blocks) with ``layers[0] <= i < layers[1]``
  (``layers: [0, 6]`` is the first six blocks), or
* one of the regexes in ``patterns`` matches it (``re.search``).

Each block in the range and each pattern must match at least one parameter, else :class:`AglclError`.
"""

from __future__ import annotations

import re

from aglcl.errors import AglclError
from aglcl.methods.base import Method

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


class Freeze(Method):
    """Set ``requires_grad`` False on chosen blocks / name patterns from task ``from_task`` on."""


    def __init__(self, layers=(0, 6), patterns=(), from_task: int = 1):
        layers = None if layers is None else list(layers)
        if layers is not None and (len(layers) != 2 or not 0 <= int(layers[0]) < int(layers[1])):
            raise AglclError(f"method.layers={layers} is invalid: give [start, end) with 0 <= start < end, or null")
        if not isinstance(from_task, int) or from_task < 0:
            raise AglclError(f"method.from_task={from_task!r} is invalid: must be an integer >= 0")
        try:
            self.patterns = [re.compile(p) for p in (patterns or ())]
        except re.error as exc:
            raise AglclError(f"method.patterns: invalid regex ({exc})") from None
        if layers is None and not self.patterns:
            raise AglclError("method.layers and method.patterns are both empty: nothing to freeze")
        self.layers = None if layers is None else range(int(layers[0]), int(layers[1]))
        self.from_task = from_task

    def frozen_names(self, model) -> list[str]:
        """The parameter names this method freezes; raises when a block or pattern matches nothing."""
        names = [n for n, _ in model.named_parameters()]
        chosen, blocks_seen = set(), set()
        if self.layers is not None:
            for name in names:
                match = _BLOCK.search(name)
                if match:
                    blocks_seen.add(int(match.group(1)))
                    if int(match.group(1)) in self.layers:
                        chosen.add(name)
            missing = [i for i in self.layers if i not in blocks_seen]
            if missing:
                raise AglclError(f"method.layers=[{self.layers.start}, {self.layers.stop}] names blocks {missing} "
                                 f"the model lacks (it has {len(blocks_seen)} blocks)")
        for pattern in self.patterns:
            hits = [n for n in names if pattern.search(n)]
            if not hits:
                raise AglclError(f"method.patterns: {pattern.pattern!r} matches no parameter of the model")
            chosen.update(hits)
        return [n for n in names if n in chosen]

    def before_task(self, index, task, model) -> None:
        frozen = set(self.frozen_names(model))  # checked at every task, so a typo fails before training
        if index >= self.from_task:
            for name, param in model.named_parameters():
                if name in frozen:
                    param.requires_grad_(False)
            if not any(p.requires_grad for p in model.parameters()):
                raise AglclError("method.layers / method.patterns freeze every parameter: nothing left to train")
