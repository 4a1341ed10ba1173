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

Under FSDP2 (``distributed=fsdp2``) F and θ* are kept as each rank's shard of the weight, and each rank adds
the penalty of its shard: FSDP2 averages the task gradients over the ranks, and the penalty's gradient lands
on the shard it belongs to, as under DDP. The logged loss holds rank 0's shard of the penalty. Checkpoints
gather them whole (``state_dict`` is a collective there). Not under ZeRO-3, whose weights are empty outside
the forward.
"""

from __future__ import annotations

import re

import torch

from aglcl import dist
from aglcl.attribution.estimators import Fisher
from aglcl.errors import AglclError, choices
from aglcl.methods.base import Method

MODES = ("separate", "online")


class EWC(Method):
    """Quadratic penalty anchoring Fisher-important weights to their values after earlier tasks."""

    supports_zero3 = False  # the penalty reads the weights outside the forward

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
        self._params: dict[str, torch.nn.Parameter] = {}  # the live parameters F and θ* belong to

    def before_task(self, index, task, model) -> None:
        """Bind each stored (F, θ*) to its live parameter, as the piece of it this rank holds (the whole
        tensor unless FSDP2 shards it), moved to the parameter's device once."""
        params = dict(dist.unwrap(model).named_parameters())
        self._terms = []
        for fisher, star in self.anchors:
            for name in fisher:
                if name not in params:
                    raise AglclError(f"EWC state names parameter '{name}', which the model does not have")
                p = params[name]
                self._params[name] = p
                device = dist.local(p).device
                fisher[name] = dist.local_view(fisher[name], p).to(device)
                star[name] = dist.local_view(star[name], p).to(device)
                if p.requires_grad:
                    self._terms.append((p, fisher[name], star[name]))

    def loss(self, model, batch, outputs):
        return outputs.loss + self.penalty() if self._terms else outputs.loss

    def penalty(self) -> torch.Tensor:
        """(λ/2) Σ_k Σ_i F_k,i (θ_i − θ*_k,i)² over the bound parameters."""
        total = sum((f * (dist.local(p).float() - s.float()).pow(2)).sum() for p, f, s in self._terms)
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
        params = dict(dist.unwrap(model).named_parameters())
        self._params.update({n: params[n] for n in fisher})
        fisher = {n: f.to(dist.local(params[n]).device) for n, f in fisher.items()}  # FSDP2: local pieces
        star = {n: dist.local(params[n].detach()).clone() for n in fisher}
        if self.mode == "online" and self.anchors:
            old, _ = self.anchors[0]
            fisher = {n: old[n].to(f.device).mul(self.gamma).add_(f) for n, f in fisher.items()}
            self.anchors = []
        self.anchors.append((fisher, star))
        self._terms = []

    def state_dict(self) -> dict:
        """``fisher.<k>.<param>`` and ``star.<k>.<param>`` for each stored pair k, whole (under FSDP2 a
        collective: every rank calls it and gets the gathered tensors)."""
        out = {}
        for k, (fisher, star) in enumerate(self.anchors):
            for kind, tensors in (("fisher", fisher), ("star", star)):
                out.update({f"{kind}.{k}.{n}": self._whole(n, t) for n, t in tensors.items()})
        return out

    def _whole(self, name: str, piece: torch.Tensor) -> torch.Tensor:
        param = self._params.get(name)
        if param is None or not dist.is_dtensor(param) or tuple(piece.shape) == tuple(param.shape):
            return piece
        return dist.gather_full(piece, param).cpu()

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
