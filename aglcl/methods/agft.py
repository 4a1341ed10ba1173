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

Distributed (``conf/distributed``): under DDP every rank gates its replica identically, after the
gradients are all-reduced. Under FSDP2 each parameter, its gradient and AdamW's state are DTensors; the
gate is kept as the rank-local piece and applied to ``to_local()`` views, once per step. Under DeepSpeed
ZeRO the engine steps flat fp32 partitions: :meth:`attach_optimizer` (called once the task's engine is
built) lays the gate out on each partition and gates the client optimizer's own step through step hooks;
the stepper clips after the gate (:class:`aglcl.engine.steppers.DeepSpeedStepper`).
"""

from __future__ import annotations

import math

import torch

from aglcl import dist, zero
from aglcl.errors import AglclError, choices
from aglcl.methods.base import Method
from aglcl.methods.lora_gate import install_gate, lora_layers, merge_and_reset

MODES = ("grad", "update")
CONTROLS = (None, "permuted", "uniform")


class AGFT(Method):
    """Scale the updates of weights that mattered for earlier tasks by ``s = 1 − λ·R̄``."""

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
        self._flat: dict[int, torch.Tensor] = {}  # DeepSpeed: id(flat fp32 partition) -> its factor
        self._hooks: list = []

    # -- hooks --------------------------------------------------------------------------------------
    def set_importance(self, maps: dict[str, torch.Tensor]) -> None:
        """Receive the combined map R̄ (values in [0, 1]) after a task; gates are built at the next task.

        Controls for claims about the estimator (docs/design.md, "The gate under AdamW"): ``permuted`` shuffles R̄ within each
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
        self._gates, self._flat = [], {}
        self._detach_hooks()
        if not self.importance:
            return
        model = dist.unwrap(model)  # DDP / DeepSpeed wrappers; FSDP2 modules keep their names
        params = dict(model.named_parameters())
        lora = lora_layers(model)
        for name, rbar in self.importance.items():
            param = params[name] if name in params else params.get(_unwrapped(name, params))
            if param is None:
                raise AglclError(f"importance map names parameter '{name}', which the model does not have")
            shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 empties param.data; ds_shape is real
            if shape != tuple(rbar.shape) and not dist.is_dtensor(param):
                raise AglclError(f"importance map for '{name}' has shape {tuple(rbar.shape)}, "
                                 f"the parameter {shape}")
            whole = rbar
            try:  # FSDP2: the rank-local piece of a whole map (or the local map as is)
                rbar = dist.local_view(rbar, param)
            except AglclError as exc:
                raise AglclError(f"importance map for '{name}': {exc}") from None
            if param.requires_grad:
                gate = self.gate(rbar)
                # grad mode multiplies g by s; update mode removes (1 − s) of the step
                factor = gate if self.mode == "grad" else 1.0 - gate
                self._gates.append((param, factor.to(dist.local(param).device, self.gate_dtype)))
            elif name in lora:  # a frozen base weight under LoRA: gate its delta (aglcl.methods.lora_gate)
                if tuple(whole.shape) != tuple(param.shape):  # FSDP2 hands local pieces: the forward needs all
                    whole = dist.gather_full(whole, param).cpu()
                merge_and_reset(lora[name])
                install_gate(lora[name], self.gate(whole).to(dist.local(param).device, self.gate_dtype))

    def after_backward(self, model) -> None:
        if self.mode == "grad" and not self._hooks:
            for param, gate in self._gates:
                if param.grad is not None:
                    dist.local(param.grad).mul_(gate)  # FSDP2: this rank's shard of the reduced gradient

    def before_step(self, model, optimizer) -> None:
        if self.mode == "update" and self._gates and not self._hooks and _adam_groups(optimizer) is None:
            self._snapshots = [dist.local(param).detach().clone() for param, _ in self._gates]

    @torch.no_grad()
    def after_step(self, model, optimizer) -> None:
        """θ ← θ_new − (1 − s) ⊙ (θ_new − θ_old): the step shrunk element-wise, weight decay included."""
        if self.mode != "update" or not self._gates or self._hooks:
            return
        if self._snapshots is not None:  # generic optimizer: θ_old was copied in before_step
            for (param, held), old in zip(self._gates, self._snapshots):
                p = dist.local(param)
                p.add_(old.sub_(p).mul_(held))
            self._snapshots = None
            return
        groups, state = _adam_groups(optimizer), optimizer_state(optimizer)
        for param, held in self._gates:
            p = dist.local(param)
            p.addcmul_(_adam_step(p, groups[param], _local_state(state[param])), held)

    # -- DeepSpeed: gate the client optimizer's step on its flat partitions ---------------------------
    def attach_optimizer(self, optimizer) -> None:
        """Under DeepSpeed ZeRO, gate inside the engine's step (call once per task, after the engine is built).

        The engine calls the client optimizer's ``step()`` on one flat fp32 partition per parameter
        group (or ZeRO-3 sub-group); the per-parameter gates are laid out on those
        partitions (:func:`aglcl.dist.deepspeed_partitions`) and applied by step hooks:
        grad mode scales the partition's gradient before the step, update mode shrinks the step after
        it. Elsewhere a no-op: the regular hooks run.
        """
        engine_opt = zero.deepspeed_engine_optimizer(optimizer)
        self._detach_hooks()
        if engine_opt is None or not self._gates:
            return
        by_param = {id(p): g for p, g in self._gates}
        fill = 1.0 if self.mode == "grad" else 0.0  # ungated elements: s = 1 (held = 0)
        for flat, params, segments in zero.deepspeed_partitions(engine_opt):
            pieces = [by_param.get(id(p)) for p in params]
            if any(piece is not None for piece in pieces):
                self._flat[id(flat)] = zero.build_flat(segments, pieces, flat.numel(), fill, self.gate_dtype,
                                                       flat.device)
        client = engine_opt.optimizer
        self._hooks = [client.register_step_pre_hook(self._flat_pre), client.register_step_post_hook(self._flat_post)]

    def _detach_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._snapshots = [], None

    def _flat_params(self, optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in self._flat:
                    yield group, p, self._flat[id(p)]

    @torch.no_grad()
    def _flat_pre(self, optimizer, args, kwargs) -> None:
        if self.mode == "grad":
            for _, p, gate in self._flat_params(optimizer):
                if p.grad is not None:
                    p.grad.mul_(gate)
        elif _adam_groups(optimizer) is None:
            self._snapshots = [p.detach().clone() for _, p, _ in self._flat_params(optimizer)]

    @torch.no_grad()
    def _flat_post(self, optimizer, args, kwargs) -> None:
        if self.mode != "update":
            return
        if self._snapshots is not None:
            for (_, p, held), old in zip(self._flat_params(optimizer), self._snapshots):
                p.add_(old.sub_(p).mul_(held))
            self._snapshots = None
            return
        for group, p, held in self._flat_params(optimizer):
            if optimizer.state.get(p):
                p.addcmul_(_adam_step(p, group, optimizer.state[p]), held)

    @torch.no_grad()
    def after_task(self, index, task, model, data) -> None:
        """Under LoRA: merge each adapter's delta into its base weight with the gate it was trained under, and
        reset B. The model is then the same function with B = 0, so the task checkpoint holds everything a
        resumed run needs (no gate has to be remembered) and attribution sees the effective weights."""
        for layer in lora_layers(model).values():
            merge_and_reset(layer)

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


def _local_state(state: dict) -> dict:
    """AdamW's state with DTensors (FSDP2) replaced by their rank-local pieces."""
    return {k: dist.local(v) for k, v in state.items()}


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
    step = float(dist.local(state["step"]))
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    t = state["exp_avg_sq"].sqrt().div_(math.sqrt(bc2)).add_(eps)
    t = torch.div(state["exp_avg"], t, out=t).mul_(lr / bc1)
    wd = group["weight_decay"] if group.get("decoupled_weight_decay") else 0.0
    if wd:
        t.add_(param, alpha=lr * wd).div_(1 - lr * wd)
    return t
