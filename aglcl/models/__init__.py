"""Build model + tokenizer: hub id, local path, packaged offline model (``packaged://<name>``), or
the tiny random Llama used by tests.

Importing this package is cheap: torch and transformers load only when a function is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["build_tiny", "build_tiny_tokenizer", "load_causal_lm", "resolve_packaged"]

_EXPORTS = {
    "load_causal_lm": "aglcl.models.load",
    "build_tiny": "aglcl.models.tiny",
    "build_tiny_tokenizer": "aglcl.models.tiny",
    "resolve_packaged": "aglcl.models.packaged",
}

if TYPE_CHECKING:  # pragma: no cover
    from aglcl.models.load import load_causal_lm
    from aglcl.models.packaged import resolve_packaged
    from aglcl.models.tiny import build_tiny, build_tiny_tokenizer


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aglcl.models' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(__all__))
