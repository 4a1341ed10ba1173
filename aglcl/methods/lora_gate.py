"""AGFT under LoRA: the gate acts on the weight-space delta, ΔW_eff = S ⊙ (B·A)·scaling.

Importance lives in weight space (on the frozen ``base_layer.weight``), because at task start B = 0
makes any relevance on the factors A and B degenerate. For the new task each LoRA layer computes

    y = W x + (S ⊙ B A · scaling) x          (S = 1 − λ·R̄, the gate of W)

so gradients reach A and B only through the entries the map leaves plastic. At every task
boundary the delta learnt so far is merged into W with the gate it was trained under, and B is
reset to zero, so later changes of S never rewrite what earlier tasks learnt.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

SUFFIX = ".base_layer.weight"


def lora_layers(model) -> dict[str, torch.nn.Module]:
    """``{base weight name: LoRA layer}`` for every PEFT LoRA Linear in ``model``."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "base_layer") and isinstance(module.base_layer,
                                                                                       torch.nn.Linear):
            out[f"{name}{SUFFIX}"] = module
    return out


def _delta(layer) -> torch.Tensor | None:
    """The layer's active LoRA delta ``B A · scaling`` (``d_out x d_in``), or None."""
    total = None
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            d = layer.lora_B[adapter].weight @ layer.lora_A[adapter].weight * layer.scaling[adapter]
            total = d if total is None else total + d
    return total


def _gated_forward(self, x, *args, **kwargs):
    result = self.base_layer(x, *args, **kwargs)
    delta = _delta(self)
    if delta is None:
        return result
    adapter = self.active_adapters[0]
    x = self.lora_dropout[adapter](x.to(delta.dtype))
    return result + F.linear(x, self._aglcl_gate.to(delta.dtype) * delta).to(result.dtype)


@torch.no_grad()
def merge_and_reset(layer) -> None:
    """W ← W + S ⊙ ΔW (S = the gate the delta was trained under, 1 if none); then B ← 0."""
    delta = _delta(layer)
    if delta is None:
        return
    gate = getattr(layer, "_aglcl_gate", None)
    if gate is not None:
        delta = gate.to(delta.dtype) * delta
    layer.base_layer.weight.add_(delta.to(layer.base_layer.weight.dtype))
    for adapter in layer.active_adapters:
        if adapter in layer.lora_B:
            layer.lora_B[adapter].weight.zero_()


def install_gate(layer, gate: torch.Tensor) -> None:
    """Route the layer's LoRA path through ``S ⊙ ΔW``."""
    layer._aglcl_gate = gate
    layer.forward = types.MethodType(_gated_forward, layer)
