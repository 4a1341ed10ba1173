"""Which weights get an importance map: named groups of ``model.named_parameters()`` names.

    >>> select_params(model, include=("attn", "mlp"))      # doctest: +SKIP
    {'model.layers.0.self_attn.q_proj.weight': Parameter(...), ...}

Groups (each a list of regexes, matched with ``re.search`` against the parameter name):

- ``attn``: the 2-D weight matrices of Llama-style ``q_proj k_proj v_proj o_proj`` and GPT-2-style
  ``attn.c_attn attn.c_proj``;
- ``mlp``: Llama-style ``gate_proj up_proj down_proj`` and GPT-2-style ``mlp.c_fc mlp.c_proj``;
- ``embed``: ``embed_tokens wte wpe lm_head``;
- ``norm``: RMSNorm / LayerNorm weights (``*norm``, GPT-2's ``ln_1 ln_2 ln_f``);
- ``lora``: PEFT LoRA factors ``lora_A lora_B`` (and their embedding variants).

Under PEFT LoRA a wrapped layer's frozen weight is ``...q_proj.base_layer.weight``. It *is* selected by
``attn``/``mlp``: importance lives in weight space (docs/design.md, "The gate under AdamW": B starts at 0, so |g ⊙ w| on the factors is
degenerate at task start). The factors themselves are selected only when ``include`` names ``lora``.
Biases are never selected.
"""

from __future__ import annotations

import re

import torch

from aglcl.errors import AglclError, choices

_BASE = r"(\.base_layer)?\.weight$"  # optional PEFT wrapper between the layer name and ``.weight``

GROUPS: dict[str, list[str]] = {
    "attn": [r"(^|\.)(q_proj|k_proj|v_proj|o_proj)" + _BASE, r"(^|\.)attn\.(c_attn|c_proj)" + _BASE],
    "mlp": [r"(^|\.)(gate_proj|up_proj|down_proj)" + _BASE, r"(^|\.)mlp\.(c_fc|c_proj)" + _BASE],
    "embed": [r"(^|\.)(embed_tokens|wte|wpe|lm_head)" + _BASE],
    "norm": [r"(^|\.)(\w*norm|ln_\d+|ln_f)\.weight$"],
    "lora": [r"\.lora_(A|B)\.[^.]+\.weight$", r"\.lora_embedding_(A|B)\.[^.]+$"],
}
_MATRICES = {"attn", "mlp", "lora"}  # groups restricted to 2-D tensors
_COMPILED = {group: [re.compile(p) for p in patterns] for group, patterns in GROUPS.items()}


def check_groups(include) -> tuple[str, ...]:
    """``include`` as a tuple of group names; :class:`AglclError` on an unknown name."""
    groups = (include,) if isinstance(include, str) else tuple(include)
    for group in groups:
        if group not in GROUPS:
            raise AglclError(f"unknown attribution.estimator.include group {group!r}; valid groups: {choices(GROUPS)}")
    if not groups:
        raise AglclError(f"attribution.estimator.include is empty; choose from {choices(GROUPS)}")
    return groups


def _in_group(group: str, name: str, param: torch.Tensor) -> bool:
    if group in _MATRICES and param.ndim != 2:
        return False
    return any(p.search(name) for p in _COMPILED[group])


def select_params(model, include=("attn", "mlp")) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``model`` in the groups ``include``, by ``named_parameters()`` name (model order).

    Selection ignores ``requires_grad``: frozen LoRA base weights are selected too.
    Raises :class:`AglclError` for an unknown group or when nothing matches.
    """
    groups = check_groups(include)
    selected = {
        name: param
        for name, param in model.named_parameters()
        if param.is_floating_point() and any(_in_group(g, name, param) for g in groups)
    }
    if not selected:
        raise AglclError(f"attribution.estimator.include={list(groups)} matches no parameter of {type(model).__name__}; "
                         f"the groups expect Llama-style (q_proj, gate_proj, ...) or GPT-2-style (c_attn, c_fc, ...) "
                         f"names")
    return selected
