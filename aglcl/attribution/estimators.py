"""Element-wise importance of selected weights, estimated after a task on its training examples.

    >>> est = GradXWeight(num_samples=32, batch_size=8)        # doctest: +SKIP
    >>> est.before_task(model)          # no-op except for IntegratedGradients
    >>> importance = est(model, encoded_train_examples, pad_id=tokenizer.pad_token_id)
    >>> importance["model.layers.0.self_attn.q_proj.weight"].shape   # float32, CPU, raw (not normalised)

One pass, the same for every estimator:

1. Shuffle the examples with ``random.Random(seed)``, keep the first ``num_samples`` and collate them in
   micro-batches of ``batch_size`` (:func:`aglcl.data.collate.collate`). A *sample* below is one micro-batch:
   ``batch_size=1`` gives true per-example values.
2. Forward (``model(...)``, so an accelerate-prepared model runs under its training autocast), keeping only the
   positions t that predict an answer token (``labels[:, t+1] != -100``) through ``logits_to_keep``.
3. The scalar target of a micro-batch is the mean over its counted examples of a per-example sum over answer
   positions: ``predicted_logit`` ``Σ_t z_t[argmax z_t]`` or ``gold_logprob`` ``Σ_t log softmax(z_t)[y_t]``.
   With ``correct_only`` an example counts only if ``argmax z_t = y_t`` at every answer position (teacher
   forcing); the others get weight 0, and a micro-batch with no counted example is skipped. If no example in
   the whole set is correct, all examples count instead and a warning says so.
4. Backward, then a per-parameter contribution ``c`` from ``p.grad`` and ``p`` (the subclass's formula),
   ``transform``: ``none`` or ``log1p`` (``log(1 + c)``), and a streaming ``reduction`` over micro-batches:
   ``mean`` (running sum), ``max`` (running max) or ``topk_mean`` (mean of the ``topk`` largest values per
   element; a ``[topk, *shape]`` float32 buffer per parameter on its device, i.e. topk x the selected weights,
   kept sorted in descending order by inserting each new value with elementwise max/min, in place; with fewer
   than ``topk`` samples it is the mean of all of them).

Several processes (``conf/distributed``): with replicated weights (one process, DDP) the micro-batches are
dealt round-robin over the ranks, run through the unwrapped module (no gradient all-reduce), and the reducer
states are all-reduced (``mean``: sum and count, accumulated in float64 so that the result does not depend on
how samples are split; ``max``; ``topk_mean``: all-gather, then the top k again), so every rank ends with the
same map, equal to the one-process map. With sharded weights (FSDP2 DTensors) every rank runs every
micro-batch (a micro-batch's gradient only ever exists as reduce-scattered shards) and scores its local shard:
the result holds rank-local pieces (:func:`aglcl.dist.local_slices` says where they sit).

The model comes back as it went in: gradients are ``None`` (before and after), ``requires_grad`` and each
module's ``training`` flag are restored (the pass runs in eval mode, with only the selected weights requiring
grad; frozen LoRA base weights are attributed too), and IntegratedGradients restores the weights bit-exactly.
The result is ``{name: float32 CPU tensor shaped like the parameter}``, non-negative and not normalised.
"""

from __future__ import annotations

import contextlib
import random
import warnings

import torch

from aglcl import dist
from aglcl.attribution.lrp import lrp_rules
from aglcl.attribution.params import check_groups, select_params
from aglcl.data.collate import IGNORE, collate
from aglcl.errors import AglclError, choices
from aglcl.models.forward import answer_logits

TARGETS = ("predicted_logit", "gold_logprob")
TRANSFORMS = ("none", "log1p")
REDUCTIONS = ("mean", "max", "topk_mean")


def _choice(key: str, value, options) -> None:
    if value not in options:
        raise AglclError(f"attribution.estimator.{key}={value!r} is not valid; choose from {choices(options)}")


def _at_least(key: str, value, minimum, integer: bool = True) -> None:
    kinds = int if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or value < minimum:
        raise AglclError(f"attribution.estimator.{key}={value!r} must be {'an integer' if integer else 'a number'} "
                         f">= {minimum}")


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _attribution_mode(model, params: dict):
    """Eval mode, grads cleared, only ``params`` require grad; all of it undone on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    chosen = {id(p) for p in params.values()}
    try:
        for p, _ in flags:
            p.grad = None
            p.requires_grad_(id(p) in chosen)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.grad = None
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


class _Reducer:
    """Streaming mean / max / top-k mean of per-sample contributions, one state tensor per parameter.

    ``mean`` sums in float64: a sum of a few float32 values is then exact, whatever their order, so the
    map does not depend on how samples were split over ranks (and costs 8 bytes per weight while it runs).
    """

    def __init__(self, how: str, topk: int):
        self.how, self.topk, self.count, self.state = how, topk, 0, {}

    def start(self, shapes: dict[str, tuple[tuple, torch.device]]) -> None:
        """Zero states for every parameter (neutral for all three reductions, since contributions are
        >= 0): a rank that draws no micro-batch still takes part in :meth:`sync`."""
        for name, (shape, device) in shapes.items():
            if self.how == "topk_mean":
                self.state[name] = torch.zeros((self.topk, *shape), dtype=torch.float32, device=device)
            else:
                dtype = torch.float64 if self.how == "mean" else torch.float32
                self.state[name] = torch.zeros(shape, dtype=dtype, device=device)

    def add(self, name: str, c: torch.Tensor) -> None:
        """Fold one sample's contribution ``c`` (>= 0) in; ``c`` may be overwritten."""
        s = self.state.get(name)
        if self.how == "topk_mean":
            if s is None:
                s = self.state[name] = torch.zeros((self.topk, *c.shape), dtype=c.dtype, device=c.device)
            # rows s[0] >= s[1] >= ...: each row keeps the larger of (row, c) and passes the smaller one down
            # (zeros fill the rows at first, and c >= 0 displaces them)
            spare = torch.empty_like(c) if self.topk > 1 else None
            for row in s[:-1]:
                torch.minimum(row, c, out=spare)
                torch.maximum(row, c, out=row)
                c, spare = spare, c
            torch.maximum(s[-1], c, out=s[-1])
        elif s is None:
            self.state[name] = c.double() if self.how == "mean" else c.clone()
        elif self.how == "max":
            torch.maximum(s, c, out=s)
        else:
            s.add_(c)

    def sync(self) -> None:
        """Combine the states of all ranks (each reduced a different share of the micro-batches)."""
        count = torch.tensor([float(self.count)], dtype=torch.float64)
        self.count = int(dist.all_reduce_(count, "sum").item())
        for name in sorted(self.state):  # the same order on every rank
            s = self.state[name]
            if self.how == "topk_mean":
                everyone = dist.all_gather_stack(s).reshape(-1, *s.shape[1:])
                self.state[name] = everyone.topk(self.topk, dim=0).values
            else:
                dist.all_reduce_(s, "max" if self.how == "max" else "sum")

    def result(self) -> dict[str, torch.Tensor]:
        """The reduced map, float32 on CPU; call once (``mean`` divides its sums in place)."""
        n = max(self.count, 1)
        if self.how == "topk_mean":  # rows sorted, so the sum does not depend on the order samples came in
            out = {k: s.sum(0).div_(min(self.topk, n)) for k, s in self.state.items()}
        else:
            out = {k: s.div_(n) if self.how == "mean" else s for k, s in self.state.items()}  # in place: 8 B/weight
        return {k: v.float().cpu() for k, v in out.items()}


class Estimator:
    """Base class: the shared pass (module docstring); subclasses define :meth:`_score` (and may override
    :meth:`_objective`, :meth:`_contribution` or :meth:`_rules`)."""

    def __init__(self, num_samples: int = 32, batch_size: int = 8, correct_only: bool = True,
                 target: str = "predicted_logit", transform: str = "none", reduction: str = "mean",
                 topk: int = 4, include=("attn", "mlp"), seed: int = 0):
        _at_least("num_samples", num_samples, 1)
        _at_least("batch_size", batch_size, 1)
        _at_least("topk", topk, 1)
        _choice("target", target, TARGETS)
        _choice("transform", transform, TRANSFORMS)
        _choice("reduction", reduction, REDUCTIONS)
        self.num_samples, self.batch_size, self.topk, self.seed = int(num_samples), int(batch_size), int(topk), seed
        self.correct_only, self.target, self.transform, self.reduction = bool(correct_only), target, transform, reduction
        self.include = check_groups(include)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_samples={self.num_samples}, batch_size={self.batch_size}, "
                f"target={self.target!r}, transform={self.transform!r}, reduction={self.reduction!r})")

    def before_task(self, model) -> None:
        """Called before training a task; a no-op except for :class:`IntegratedGradients`."""

    def __call__(self, model, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        if not examples:
            raise AglclError("attribution got no examples; the task's training split is empty")
        model = dist.unwrap(model)  # DDP: no gradient all-reduce (ranks score different micro-batches)
        params = select_params(model, self.include)
        order = list(range(len(examples)))
        random.Random(self.seed).shuffle(order)
        chosen = [examples[i] for i in order[: self.num_samples]]
        batches = [collate(chosen[i: i + self.batch_size], pad_id) for i in range(0, len(chosen), self.batch_size)]
        # replicated weights: deal the micro-batches over the ranks; sharded (FSDP2): every rank runs all
        self._split = dist.is_distributed() and not any(dist.is_dtensor(p) for p in params.values())
        if self._split:
            batches = batches[dist.rank()::dist.world_size()]
        with _attribution_mode(model, params), self._rules(model):
            self._start(params)
            reducer = self._run(model, params, batches, self.correct_only)
            if reducer.count == 0 and self.correct_only:
                warnings.warn(f"{type(self).__name__}: no attribution sample is answered correctly; "
                              f"using all {len(chosen)} samples instead (attribution.correct_only)", stacklevel=2)
                reducer = self._run(model, params, batches, False)
        if reducer.count == 0:
            raise AglclError("attribution: no example has an answer token (all labels are -100)")
        return reducer.result()

    # -- the pass ------------------------------------------------------------------------------------------
    def _start(self, params: dict) -> None:
        """Checks before the pass (once per call, whatever the fallback)."""

    def _rules(self, model):
        """Context for the forward/backward passes (LRP patches the model here)."""
        return contextlib.nullcontext()

    def _run(self, model, params: dict, batches: list[dict], correct_only: bool) -> _Reducer:
        reducer, device = _Reducer(self.reduction, self.topk), _device(model)
        split = getattr(self, "_split", False)
        if split:
            reducer.start({n: (tuple(dist.local(p).shape), dist.local(p).device) for n, p in params.items()})
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            contribution = self._contribution(model, params, batch, correct_only)
            if contribution is None:
                continue
            for name, c in contribution.items():
                reducer.add(name, c.log1p_() if self.transform == "log1p" else c)
            reducer.count += 1
        if split:
            reducer.sync()
        return reducer

    def _contribution(self, model, params: dict, batch: dict, correct_only: bool):
        """``{name: contribution}`` for one micro-batch, or ``None`` if none of its examples counts."""
        logits, gold = self._logits(model, batch)
        tokens, weights = self._select(logits, gold, correct_only)
        if not weights.any():
            return None
        self._objective(logits, gold, tokens, weights).backward()
        return self._scores(params)

    def _scores(self, params: dict) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in params.items():
            w = dist.local(p.detach())  # FSDP2: this rank's shard of the weight and of the reduced gradient
            g = dist.local(p.grad).float() if p.grad is not None else torch.zeros(w.shape, device=w.device)
            out[name] = self._score(w.float(), g)
            p.grad = None
        return out

    def _score(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The non-negative contribution of one parameter (float32 ``w`` and its gradient ``g``), as a tensor
        the pass may modify. ``g`` is the pass's own (the parameter's ``.grad`` is dropped): it may be
        overwritten; ``w`` may be the weight itself: never."""
        raise NotImplementedError

    @staticmethod
    def _logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 logits ``[B, K, V]`` at the K positions that predict an answer token, and the gold ids
        ``[B, K]`` (``-100`` where a row has no answer token there)."""
        _, logits, gold = answer_logits(model, batch)
        return logits.float(), gold

    @staticmethod
    def _select(logits, gold, correct_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The argmax tokens ``[B, K]`` and per-example weights ``[B]`` (1 = counted)."""
        valid = gold != IGNORE
        tokens = logits.argmax(-1)
        has_answer = valid.any(1)
        correct = ((tokens == gold) | ~valid).all(1) & has_answer
        return tokens, (correct if correct_only else has_answer).float()

    def _objective(self, logits, gold, tokens, weights) -> torch.Tensor:
        """Mean over counted examples of ``Σ_t`` (predicted logit | gold log-probability)."""
        if self.target == "predicted_logit":
            per_position = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        else:
            per_position = logits.log_softmax(-1).gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        per_example = torch.where(gold != IGNORE, per_position, 0.0).sum(1)
        return (per_example * weights).sum() / weights.sum()


class GradXWeight(Estimator):
    """``|g ⊙ W|``: first-order Taylor estimate of the target's change if the weight were removed."""

    def _score(self, w, g):
        return g.mul_(w).abs_()


class Fisher(Estimator):
    """Empirical Fisher diagonal ``E[g²]`` with ``g = ∂ log p(y_gold | x) / ∂θ``: the target is forced to
    ``gold_logprob`` (any ``target`` argument is ignored). With ``batch_size > 1`` g is the gradient of the
    micro-batch mean, not per example."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.target = "gold_logprob"

    def _score(self, w, g):
        return g.square_()


class MAS(Estimator):
    """Memory Aware Synapses: ``|∂ ‖f(x)‖² / ∂θ|`` with f the logits at the answer-predicting positions; the
    target is ``Σ_t ‖z_t‖²`` per example, averaged over counted examples (``target`` is ignored)."""

    def _objective(self, logits, gold, tokens, weights):
        per_example = torch.where(gold != IGNORE, logits.pow(2).sum(-1), 0.0).sum(1)
        return (per_example * weights).sum() / weights.sum()

    def _score(self, w, g):
        return g.abs_()


class IntegratedGradients(Estimator):
    """Integrated gradients along the task's own weight path, ``θ_k = θ_pre + (k/steps) Δ`` with
    ``Δ = θ_post − θ_pre``: ``|Δ ⊙ (1/steps) Σ_{k=1..steps} ∇_θ target(θ_k)|`` (right Riemann sum, so
    ``steps=1`` is ``|Δ ⊙ g(θ_post)|``).

    :meth:`before_task` keeps a CPU copy of the selected weights (θ_pre). The predicted tokens and the
    ``correct_only`` weights are fixed at θ_post, so every step explains the same function. The weights are
    restored to θ_post bit-exactly. Under LoRA the base weights do not move (Δ = 0), so the map is zero.
    """

    def __init__(self, steps: int = 8, **kwargs):
        _at_least("steps", steps, 1)
        super().__init__(**kwargs)
        self.steps, self._pre, self._path = int(steps), None, None

    def before_task(self, model) -> None:
        self._pre = {n: dist.local(p.detach()).to("cpu", copy=True)
                     for n, p in select_params(dist.unwrap(model), self.include).items()}

    def _start(self, params):
        if self._pre is None:
            raise AglclError("IntegratedGradients needs the pre-task weights: call before_task(model) before "
                             "training the task")
        if set(self._pre) != set(params):
            raise AglclError("IntegratedGradients: the selected weights changed since before_task(model)")
        if all(torch.equal(dist.local(p.detach()).cpu(), self._pre[n]) for n, p in params.items()):
            warnings.warn("IntegratedGradients: the weights did not change during the task (frozen under LoRA?); "
                          "importance is 0", stacklevel=3)

    def _run(self, model, params, batches, correct_only):
        self._path = {n: (dist.local(p.detach()).clone(),
                          dist.local(p.detach()).float() - self._pre[n].to(dist.local(p).device).float())
                      for n, p in params.items()}
        try:
            return super()._run(model, params, batches, correct_only)
        finally:
            self._set(params, 1.0)
            self._path = None

    def _set(self, params, alpha: float) -> None:
        with torch.no_grad():
            for name, p in params.items():
                post, delta = self._path[name]
                dist.local(p).copy_(post if alpha == 1.0 else post.float() - (1.0 - alpha) * delta)

    def _contribution(self, model, params, batch, correct_only):
        total = {n: torch.zeros(dist.local(p).shape, device=dist.local(p).device) for n, p in params.items()}
        tokens = weights = None
        for k in [self.steps, *range(1, self.steps)]:  # θ_post first: it fixes the tokens and weights
            self._set(params, k / self.steps)
            logits, gold = self._logits(model, batch)
            if tokens is None:
                tokens, weights = self._select(logits, gold, correct_only)
                if not weights.any():
                    return None
            self._objective(logits, gold, tokens, weights).backward()
            for n, p in params.items():
                if p.grad is not None:
                    total[n] += dist.local(p.grad).float()
                p.grad = None
        self._set(params, 1.0)
        return {n: (self._path[n][1] * total[n] / self.steps).abs() for n in params}


class LRP(GradXWeight):
    """AttnLRP relevance of each weight, ``|W ⊙ g̃|``, with ``g̃`` the modified gradient of the target under
    :func:`aglcl.attribution.lrp.lrp_rules` (see that module for the rules). The paper uses ``transform=log1p``
    and ``reduction=topk_mean``; those are set in its YAML and any default here can be overridden."""

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        _at_least("epsilon", epsilon, 0, integer=False)
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def _rules(self, model):
        return lrp_rules(model, epsilon=self.epsilon)
