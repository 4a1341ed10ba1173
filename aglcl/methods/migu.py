"""MIGU: magnitude-based gradient updating (Du et al., "Unlocking Continual Learning Abilities in Language
Models", EMNLP Findings 2024; code: github.com/wenyudu/MIGU).

    aglcl train method=migu                                  # keep the top 30% output units of each layer
    aglcl train method=migu method.quantile=0.5 method.from_task=0

Every linear layer of the attention and MLP blocks (the ``attn`` + ``mlp`` groups of
:mod:`aglcl.attribution.params`: ``q k v o gate up down _proj`` or GPT-2's ``c_attn c_proj c_fc``) gets a forward
hook. Over the micro-batches of one optimizer step it accumulates, per output unit j, the L1 magnitude of the
layer's output over the (non-padding) tokens, a_j = Σ_tokens |y_j|. In ``after_backward`` (once per optimizer step,
after accumulation, before clipping) each layer keeps the gradient of unit j only when a_j >= the ``quantile``-th
quantile of that layer's a (``torch.quantile``, linear interpolation; ``>=`` as in the official code, so ties at the
threshold are kept); the other rows (Conv1D: columns) of the weight gradient and entries of the bias gradient are
zeroed. With quantile 0.7 about 30% of each layer's units are updated per step. The paper's "L1-normalised"
magnitude divides a by Σ_j a_j, which leaves the quantile mask unchanged, so it is skipped. The mask is active from
task ``from_task`` (0-based) on; the official scripts run the first task unmasked (``from_task: 1``).

Differences from the official code: padding tokens are left out of a (the official hook sums every position), the
bias of a masked unit is masked too (Llama has none), and the LM head is not masked (the official code hooks every
``nn.Linear``, the LM head included). Under PEFT LoRA the wrapped layer's combined output is measured and the rows
of ``lora_B`` (the adapter's output units) are masked, like the official LoRA variant with combined activations.
Under DDP the magnitudes are summed over ranks first, so every rank masks the same rows.

Memory: one float vector per layer (its output width). Compute: one |y| reduction per layer and micro-batch.
Nothing is persisted: the mask is recomputed at every step.
"""

from __future__ import annotations

import torch

from aglcl import dist
from aglcl.attribution.params import select_params
from aglcl.errors import AglclError
from aglcl.methods.base import Method


def unit_mask(magnitude: torch.Tensor, quantile: float) -> torch.Tensor:
    """The output units to update: ``magnitude >= torch.quantile(magnitude, quantile)`` (bool, like ``magnitude``)."""
    magnitude = magnitude.float()
    return magnitude >= torch.quantile(magnitude, quantile)


def mask_units(grad: torch.Tensor, keep: torch.Tensor, dim: int) -> None:
    """Zero, in place, the slices of ``grad`` along ``dim`` (output units) where ``keep`` is False."""
    shape = [1] * grad.ndim
    shape[dim] = -1
    grad.mul_(keep.to(device=grad.device, dtype=grad.dtype).view(shape))


def _output_dim(module) -> int:
    """The weight dimension indexing output units: 0 for ``nn.Linear`` (out, in), 1 for GPT-2's Conv1D (in, out)."""
    return 1 if type(module).__name__ == "Conv1D" else 0


def _targets(model) -> list[tuple[str, torch.nn.Module, list[tuple[torch.nn.Parameter, int]]]]:
    """``(name, module whose output is measured, [(trainable tensor, output dim), ...])`` for each attn/mlp layer."""
    targets = []
    for weight_name in select_params(model, include=("attn", "mlp")):
        name = weight_name.rsplit(".", 1)[0]
        layer = model.get_submodule(name)
        tensors = [(p, _output_dim(layer) if p.ndim == 2 else 0) for p in (layer.weight, getattr(layer, "bias", None))
                   if p is not None and p.requires_grad]
        hooked = layer
        if name.endswith(".base_layer"):  # PEFT LoRA: measure the wrapper's output, mask the adapters' output rows
            hooked = model.get_submodule(name.rsplit(".", 1)[0])
            for b in getattr(hooked, "lora_B", {}).values():
                tensors += [(p, 0) for p in (b.weight, getattr(b, "bias", None)) if p is not None and p.requires_grad]
        if tensors:
            targets.append((name, hooked, tensors))
    return targets


class MIGU(Method):
    """Update only the output units of each linear layer whose output magnitude is in the top (1 − quantile)."""

    supports_sharded = False  # whole-tensor state or hooks (not shard-aware yet)
    reads_grads = True  # masks gradient rows in after_backward

    def __init__(self, quantile: float = 0.7, from_task: int = 1):
        if not 0.0 < quantile < 1.0:
            raise AglclError(f"method.quantile={quantile} is invalid: must be in (0, 1) (0.7 updates the top 30%)")
        if not (isinstance(from_task, int) and from_task >= 0):
            raise AglclError(f"method.from_task={from_task!r} is invalid: must be an integer >= 0 (0-based task index)")
        self.quantile, self.from_task = float(quantile), from_task
        self.magnitude: dict[str, torch.Tensor] = {}
        self._targets: list = []
        self._handles: list = []
        self._token_mask: torch.Tensor | None = None

    def before_task(self, index, task, model) -> None:
        self._remove_hooks()
        if index < self.from_task:
            return
        base = dist.unwrap(model)
        try:
            self._targets = _targets(base)
        except AglclError as exc:
            raise AglclError(f"MIGU: {exc}") from None
        self._handles.append(base.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
        for name, module, _ in self._targets:
            self._handles.append(module.register_forward_hook(self._accumulate(name)))

    def _capture_mask(self, module, args, kwargs) -> None:
        """Keep the batch's attention mask: padding positions do not count towards the magnitudes."""
        self._token_mask = kwargs.get("attention_mask")

    def _accumulate(self, name: str):
        def hook(module, args, output) -> None:
            if not torch.is_grad_enabled():  # evaluation and other no-grad passes do not train
                return
            out = output[0] if isinstance(output, tuple) else output
            out = out.detach().abs().float()
            mask = self._token_mask
            if mask is not None and tuple(mask.shape) == tuple(out.shape[:-1]):
                out = out * mask.to(device=out.device, dtype=out.dtype).unsqueeze(-1)
            total = out.reshape(-1, out.shape[-1]).sum(0)
            if name in self.magnitude:
                self.magnitude[name] += total
            else:
                self.magnitude[name] = total

        return hook

    def after_backward(self, model) -> None:
        if not self.magnitude:
            return
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        for name, _, tensors in self._targets:
            magnitude = self.magnitude.get(name)
            if magnitude is None:
                continue
            if distributed:
                dist.all_reduce(magnitude, op=dist.ReduceOp.SUM)
            keep = unit_mask(magnitude, self.quantile)
            for param, dim in tensors:
                if param.grad is not None:
                    mask_units(param.grad, keep, dim)
        self.magnitude = {}

    def after_task(self, index, task, model, data) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._targets, self.magnitude, self._token_mask = [], [], {}, None
