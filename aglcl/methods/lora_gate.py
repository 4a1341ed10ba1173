"""AGFT under LoRA: the gate acts on the weight-space delta, ΔW_eff = S ⊙ (B·A)·scaling.

Importance lives in weight space (on the frozen ``base_layer.weight``), because at task start B = 0
makes any relevance on the factors A and B degenerate. For the new task each LoRA layer computes

    y = W x + (S ⊙ B A · scaling) x          (S = 1 − λ·R̄, the gate of W)

so gradients reach A and B only through the entries the map leaves plastic. At every task
boundary the delta learnt so far is merged into W with the gate it was trained under, and B is
reset to zero, so later changes of S never rewrite what earlier tasks learnt.

Under FSDP2 the forward sees whole (all-gathered) weights, so the gate ``S`` is kept whole on every
rank (``gate_dtype`` bytes per gated base weight); :func:`merge_and_reset`, which runs outside the
forward on sharded DTensors, gathers A and B (a collective: every rank merges the same layers in the
same order) and adds each rank's piece of the merged delta to its shard of W.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from aglcl import dist

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
            b, a = _whole(layer.lora_B[adapter].weight), _whole(layer.lora_A[adapter].weight)
            d = b @ a * layer.scaling[adapter]
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


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a sharded DTensor is gathered; inside an FSDP2 forward weights are already whole)."""
    return t.full_tensor() if dist.is_dtensor(t) else t


@torch.no_grad()
def merge_and_reset(layer) -> None:
    """W ← W + S ⊙ ΔW (S = the gate the delta was trained under, 1 if none); then B ← 0."""
    delta = _delta(layer)
    if delta is None:
        return
    gate = getattr(layer, "_aglcl_gate", None)
    if gate is not None:
        delta = gate.to(delta.dtype) * delta
    weight = layer.base_layer.weight
    dist.local(weight).add_(dist.local_view(delta, weight).to(weight.dtype))  # FSDP2: this rank's rows
    for adapter in layer.active_adapters:
        if adapter in layer.lora_B:
            dist.local(layer.lora_B[adapter].weight).zero_()


def install_gate(layer, gate: torch.Tensor) -> None:
    """Route the layer's LoRA path through ``S ⊙ ΔW``."""
    layer._aglcl_gate = gate
    layer.forward = types.MethodType(_gated_forward, layer)
