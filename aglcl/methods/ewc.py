"""EWC: elastic weight consolidation (Kirkpatrick et al., PNAS 2017).

    aglcl train method=ewc                                   # separate mode, λ = 400
    aglcl train method=ewc method.mode=online method.gamma=0.9 method.lam=1000

While task t trains, the loss of every micro-batch gets the quadratic penalty

    L = L_task + Σ_k (λ/2) Σ_i F_k,i (θ_i − θ*_k,i)²

over the weights :class:`aglcl.attribution.estimators.Fisher` selects (``include``, attn + mlp by default).
After each task, F is the empirical Fisher diagonal E[g²] of the gold log-likelihood on ``num_samples``
training examples (micro-batches of ``batch_size``; see the estimator's docstring for its scale) and θ* the
weights at that point. Only trainable weights are penalised: under LoRA the base weights are frozen, so use
``method.include=[lora]`` to anchor the adapter factors instead.

* ``separate``: one (F_k, θ*_k) pair per finished task. Memory: 2 float copies of the selected weights *per
  task*, on the model's device (and in ``checkpoint/method.safetensors``).
* ``online`` (online EWC / EWC++): a single pair, F ← γ·F + F_new and θ* ← θ; memory O(1) in the tasks.
"""

from __future__ import annotations

import re

import torch

from aglcl.attribution.estimators import Fisher
from aglcl.errors import AglclError, choices
from aglcl.methods.base import Method

MODES = ("separate", "online")


class EWC(Method):
    """Quadratic penalty anchoring Fisher-important weights to their values after earlier tasks."""

    name = "ewc"
    supports_sharded = False  # whole-tensor state or hooks (not shard-aware yet)

    def __init__(self, lam: float = 400.0, mode: str = "separate", gamma: float = 1.0, num_samples: int = 32,
                 batch_size: int = 8, correct_only: bool = False, include=("attn", "mlp"), seed: int = 0):
        if not lam >= 0:
            raise AglclError(f"method.lam={lam} is invalid: must be >= 0")
        if mode not in MODES:
            raise AglclError(f"method.mode={mode!r} is invalid; choose from: {choices(MODES)}")
        if not 0.0 <= gamma <= 1.0:
            raise AglclError(f"method.gamma={gamma} is invalid: must be in [0, 1]")
        try:
            self.fisher = Fisher(num_samples=num_samples, batch_size=batch_size, correct_only=correct_only,
                                 include=include, seed=seed)
        except AglclError as exc:
            raise _method_key(exc) from None
        self.lam, self.mode, self.gamma = float(lam), mode, float(gamma)
        self.anchors: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # [(F_k, θ*_k)]
        self._terms: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []

    def before_task(self, index, task, model) -> None:
        """Bind each stored (F, θ*) to its live parameter, moving it to the parameter's device once."""
        params = dict(model.named_parameters())
        self._terms = []
        for fisher, star in self.anchors:
            for name in fisher:
                if name not in params:
                    raise AglclError(f"EWC state names parameter '{name}', which the model does not have")
                p = params[name]
                fisher[name], star[name] = fisher[name].to(p.device), star[name].to(p.device)
                if p.requires_grad:
                    self._terms.append((p, fisher[name], star[name]))

    def loss(self, model, batch, outputs):
        return outputs.loss + self.penalty() if self._terms else outputs.loss

    def penalty(self) -> torch.Tensor:
        """(λ/2) Σ_k Σ_i F_k,i (θ_i − θ*_k,i)² over the bound parameters."""
        total = sum((f * (p.float() - s.float()).pow(2)).sum() for p, f, s in self._terms)
        return 0.5 * self.lam * total

    def after_task(self, index, task, model, data) -> None:
        """Estimate F on the task's training examples and record θ* (combined with the old pair if online).

        Skipped after the last task of the sequence: nothing trains after it.
        """
        if self.num_tasks is not None and index + 1 >= self.num_tasks:
            return
        try:
            fisher = self.fisher(model, data, _pad_id(model))
        except AglclError as exc:
            raise _method_key(exc) from None
        params = dict(model.named_parameters())
        fisher = {n: f.to(params[n].device) for n, f in fisher.items()}
        star = {n: params[n].detach().clone() for n in fisher}
        if self.mode == "online" and self.anchors:
            old, _ = self.anchors[0]
            fisher = {n: old[n].to(f.device).mul(self.gamma).add_(f) for n, f in fisher.items()}
            self.anchors = []
        self.anchors.append((fisher, star))
        self._terms = []

    def state_dict(self) -> dict:
        """``fisher.<k>.<param>`` and ``star.<k>.<param>`` for each stored pair k."""
        out = {}
        for k, (fisher, star) in enumerate(self.anchors):
            out.update({f"fisher.{k}.{n}": t for n, t in fisher.items()})
            out.update({f"star.{k}.{n}": t for n, t in star.items()})
        return out

    def load_state_dict(self, state: dict) -> None:
        pairs: dict[int, tuple[dict, dict]] = {}
        for key, tensor in state.items():
            kind, k, name = key.split(".", 2)
            if kind not in ("fisher", "star"):
                raise AglclError(f"EWC state has an unexpected tensor '{key}'")
            pairs.setdefault(int(k), ({}, {}))[kind == "star"][name] = tensor
        self.anchors = [pairs[k] for k in sorted(pairs)]
        self._terms = []


def _method_key(exc: AglclError) -> AglclError:
    """The estimator names its keys ``attribution.estimator.<key>``; for EWC they are ``method.<key>``."""
    return AglclError(re.sub(r"attribution\.(estimator\.)?", "method.", str(exc)))


def _pad_id(model) -> int:
    """The pad id the collate step uses for Fisher batches (padding is masked, so any id is fine)."""
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    return 0 if pad is None else int(pad)
