"""AGFT: attribution-guided fine-tuning.

    aglcl train method=agft attribution=grad_x_weight                 # update mode (default)
    aglcl train method=agft attribution=lrp method.mode=grad          # the paper's gradient gate
    aglcl train method=agft method.lam=0.9 method.threshold=0.99      # hard-freeze the top weights

After each task the attribution pipeline hands over the combined importance map R̄ in [0, 1]
(:meth:`set_importance`). While later tasks train, every selected weight gets the gate

    s = 1 − λ·R̄          (and s = 0 where R̄ ≥ threshold)

applied once per optimizer step, in one of two modes:

* ``grad``: g ← s ⊙ g after accumulation, before clipping (the paper's (1 − R̄) ⊙ ∇L). Under Adam a
  constant per-element factor cancels in m/√v, so only exact zeros survive: this mode barely acts.
* ``update``: the optimizer's whole step, decoupled weight decay included, is scaled:
  θ ← θ_old + s ⊙ (θ_new − θ_old), i.e. a per-element learning rate. For Adam/AdamW the step
  θ_old − θ_new is recomputed from the optimizer state (up to float rounding; no copy of the
  weights is kept); other optimizers snapshot the gated weights before the step.

The gate is kept in ``gate_dtype`` (bf16 by default: half a copy of the gated weights; its
rounding error, ≤ 2⁻⁹ relative, is far below any meaningful difference in protection).
"""

from __future__ import annotations

import math

import torch

from aglcl.errors import AglclError, choices
from aglcl.methods.base import Method
from aglcl.methods.lora_gate import install_gate, lora_layers, merge_and_reset

MODES = ("grad", "update")
CONTROLS = (None, "permuted", "uniform")


class AGFT(Method):
    """Scale the updates of weights that mattered for earlier tasks by ``s = 1 − λ·R̄``."""

    name = "agft"
    needs_importance = True

    def __init__(self, lam: float = 1.0, mode: str = "update", threshold: float | None = None,
                 gate_dtype: str = "bfloat16", control: str | None = None, seed: int = 0):
        if not 0.0 <= lam <= 1.0:
            raise AglclError(f"method.lam={lam} is invalid: must be in [0, 1]")
        if mode not in MODES:
            raise AglclError(f"method.mode={mode!r} is invalid; choose from: {choices(MODES)}")
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise AglclError(f"method.threshold={threshold} is invalid: must be in (0, 1] or null")
        if control not in CONTROLS:
            raise AglclError(f"method.control={control!r} is invalid; choose from: null, 'permuted', 'uniform'")
        if gate_dtype not in ("bfloat16", "float32"):
            raise AglclError(f"method.gate_dtype={gate_dtype!r} is invalid; choose from: 'bfloat16', 'float32'")
        self.lam, self.mode, self.threshold, self.control, self.seed = lam, mode, threshold, control, seed
        self.gate_dtype = getattr(torch, gate_dtype)
        self.importance: dict[str, torch.Tensor] | None = None
        self._gates: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self._snapshots: list[torch.Tensor] | None = None

    # -- hooks --------------------------------------------------------------------------------------
    def set_importance(self, maps: dict[str, torch.Tensor]) -> None:
        """Receive the combined map R̄ (values in [0, 1]) after a task; gates are built at the next task.

        Controls for claims about the estimator (DESIGN.md §7): ``permuted`` shuffles R̄ within each
        tensor (same gate distribution, wrong weights); ``uniform`` replaces R̄ by its per-tensor mean
        (the same average shrinkage of the step, i.e. seqft with lr × mean gate, per tensor and task).
        """
        if self.control == "permuted":
            gen = torch.Generator().manual_seed(self.seed + len(maps))
            maps = {n: t.flatten()[torch.randperm(t.numel(), generator=gen)].view_as(t) for n, t in maps.items()}
        elif self.control == "uniform":
            maps = {n: torch.full_like(t, float(t.float().mean())) for n, t in maps.items()}
        self.importance = maps

    def before_task(self, index, task, model) -> None:
        self._gates = []
        if not self.importance:
            return
        params = dict(model.named_parameters())
        lora = lora_layers(model)
        for name, rbar in self.importance.items():
            param = params[name] if name in params else params.get(_unwrapped(name, params))
            if param is None:
                raise AglclError(f"importance map names parameter '{name}', which the model does not have")
            if tuple(param.shape) != tuple(rbar.shape):
                raise AglclError(f"importance map for '{name}' has shape {tuple(rbar.shape)}, "
                                 f"the parameter {tuple(param.shape)}")
            gate = self.gate(rbar)
            if param.requires_grad:
                # grad mode multiplies g by s; update mode removes (1 − s) of the step
                factor = gate if self.mode == "grad" else 1.0 - gate
                self._gates.append((param, factor.to(param.device, self.gate_dtype)))
            elif name in lora:  # a frozen base weight under LoRA: gate its delta (aglcl.methods.lora_gate)
                merge_and_reset(lora[name])
                install_gate(lora[name], gate.to(param.device, self.gate_dtype))

    def after_backward(self, model) -> None:
        if self.mode == "grad":
            for param, gate in self._gates:
                if param.grad is not None:
                    param.grad.mul_(gate)

    def before_step(self, model, optimizer) -> None:
        if self.mode == "update" and self._gates and _adam_groups(optimizer) is None:
            self._snapshots = [param.detach().clone() for param, _ in self._gates]

    @torch.no_grad()
    def after_step(self, model, optimizer) -> None:
        """θ ← θ_new − (1 − s) ⊙ (θ_new − θ_old): the step shrunk element-wise, weight decay included."""
        if self.mode != "update" or not self._gates:
            return
        if self._snapshots is not None:  # generic optimizer: θ_old was copied in before_step
            for (param, held), old in zip(self._gates, self._snapshots):
                param.add_(old.sub_(param).mul_(held))
            self._snapshots = None
            return
        groups, state = _adam_groups(optimizer), optimizer_state(optimizer)
        for param, held in self._gates:
            param.addcmul_(_adam_step(param, groups[param], state[param]), held)

    # -- helpers ------------------------------------------------------------------------------------
    def gate(self, rbar: torch.Tensor) -> torch.Tensor:
        """``s = 1 − λ·R̄``, zero where ``R̄ ≥ threshold``."""
        s = 1.0 - self.lam * rbar.float().clamp(0.0, 1.0)
        if self.threshold is not None:
            s = torch.where(rbar >= self.threshold, torch.zeros_like(s), s)
        return s

    def mean_gate(self) -> float | None:
        """Average gate s over the gated weights."""
        if not self._gates:
            return None
        total = sum(float(g.float().sum()) for _, g in self._gates)
        mean = total / sum(g.numel() for _, g in self._gates)
        return mean if self.mode == "grad" else 1.0 - mean


def _unwrapped(name: str, params: dict) -> str:
    """Map a plain model name onto a PEFT-wrapped one (``base_model.model.`` prefix), if present."""
    for candidate in params:
        if candidate.endswith(name):
            return candidate
    return name


def optimizer_state(optimizer):
    return getattr(optimizer, "optimizer", optimizer).state


def _adam_groups(optimizer) -> dict | None:
    """``{param: group}`` when the optimizer is torch Adam/AdamW without amsgrad, else None."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if not isinstance(inner, torch.optim.Adam):  # AdamW subclasses Adam (decoupled_weight_decay=True)
        return None
    groups = {}
    for group in inner.param_groups:
        if group.get("amsgrad") or group.get("maximize") or "decoupled_weight_decay" not in group:
            return None
        for p in group["params"]:
            groups[p] = group
    return groups


def _adam_step(param, group, state) -> torch.Tensor:
    """θ_old − θ_new of the last Adam/AdamW step, recovered from θ_new and the optimizer state.

    AdamW: θ_new = θ_old(1 − lr·wd) − a, with a = (lr / bc1) · m / (√v / √bc2 + ε); hence
    θ_old − θ_new = (a + lr·wd·θ_new) / (1 − lr·wd). Adam's L2 decay lives inside m (no wd term here).
    One temporary of the parameter's size; no copy of the weights is kept between steps.
    """
    beta1, beta2 = group["betas"]
    lr, eps = float(group["lr"]), group["eps"]
    step = float(state["step"])
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    t = state["exp_avg_sq"].sqrt().div_(math.sqrt(bc2)).add_(eps)
    t = torch.div(state["exp_avg"], t, out=t).mul_(lr / bc1)
    wd = group["weight_decay"] if group.get("decoupled_weight_decay") else 0.0
    if wd:
        t.add_(param, alpha=lr * wd).div_(1 - lr * wd)
    return t
