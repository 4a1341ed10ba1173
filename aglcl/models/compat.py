"""Small capability checks over HF model classes (PEFT-wrapped or not)."""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=64)
def _forward_params(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def accepts(model, name: str) -> bool:
    """Whether the (base) model's ``forward`` takes keyword ``name`` (e.g. ``logits_to_keep``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # DDP / FSDP wrappers
    return name in _forward_params(type(base))
