"""AttnLRP rules for Llama- and GPT-2-style transformers, as a context manager that patches a model.

LRP is computed in "modified gradient x input" form: inside ``with lrp_rules(model):`` every forward value is
unchanged, but backward follows the rules of AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise
Relevance Propagation for Transformers", ICML 2024). The relevance of any tensor x is ``R(x) = x ⊙ g̃(x)``, of a
weight ``R(W) = W ⊙ g̃(W)``, where g̃ is the gradient of the explained scalar under the rules:

- **Linear / Conv1D**: plain gradient. For a bias-free layer z = W x this is LRP-ε in the limit ε → 0:
  ``R(x_j) = Σ_i x_j W_ij R(z_i) / z_i = x_j · g̃(x_j)`` and ``Σ_ij W_ij g̃(W_ij) = Σ_i z_i g̃(z_i) = Σ R(z)``.
- **RMSNorm / LayerNorm**: the normalising denominator is detached (stop-gradient), so the layer is linear in x:
  ``y = w ⊙ x · rsqrt(mean(x²) + ε)`` (Llama-style, in float32) and ``y = (x − mean x) / std(x) · w + b``.
- **Element-wise activations** (SiLU, GELU, ...): identity rule ``R(x) = R(act(x))``, i.e. the gradient
  through act is ``act(x) / x``. Where ``|x| < epsilon`` the ratio is act'(0), from a central difference
  (0.5 for SiLU and GELU), so no division by ~0 happens.
- **Bilinear products** ``a · b`` (the gated MLP ``act(gate(x)) * up(x)``, ``Q·Kᵀ`` and ``A·V``): uniform rule,
  each operand gets half the gradient, ``R(a) = R(b) = R(ab) / 2``.
- **Softmax**: plain gradient. AttnLRP's softmax rule ``R(x_i) = x_i (R(s_i) − s_i Σ_j R(s_j))`` is exactly
  gradient x input at the softmax input; the non-conserved part is absorbed as bias.

A bias-free block of linear maps, detached norms, identity-rule activations and uniform products (e.g. RMSNorm +
gated MLP + residual) conserves relevance exactly: ``Σ x ⊙ g̃(x) = output``. Softmax, biases and the additive
attention mask do not.

Every patched operation keeps its forward value bit-exact: it returns ``value.detach() + (s − s.detach())``
where ``s`` is a surrogate with the rule's gradient (``_half(t)`` is ``t/2 + (t/2).detach()``).

Attention goes through transformers' ``AttentionInterface``. The uniform rule on ``Q·Kᵀ`` and ``A·V`` with the
plain gradient through softmax is linear in the upstream gradient, so it equals the plain gradient scaled per
operand: ``g̃(Q) = g(Q)/4``, ``g̃(K) = g(K)/4`` (half at ``Q·Kᵀ``, and half of ``A``'s gradient at ``A·V``),
``g̃(V) = g(V)/2``. So for a model on a fused kernel (``sdpa``, flash, flex) we register ``"aglcl_lrp_<impl>"``,
that kernel with those gradient scales on its inputs (forward bit-exact, and as fast as training's forward),
with the kernel's own mask builder under the same name in ``AttentionMaskInterface``. A model on ``eager`` (or
an implementation the registry lacks) gets ``"aglcl_lrp"``: an eager attention with the uniform rule written
out (GQA heads repeated, softmax in float32) and the eager additive mask. The registrations stay (they are
inert); ``config._attn_implementation`` is switched on every config of the model (``LlamaAttention`` and
``GPT2Attention`` in transformers 5.24 read ``self.config._attn_implementation`` at each call) and restored on
exit. Patched module forwards are instance attributes, removed on exit, even on exceptions. Supported: Llama-family RMSNorm (checked against the original forward on first use; a
different formula such as Gemma's ``1 + weight`` raises), ``torch.nn.LayerNorm``, gated MLPs with
``gate_proj/up_proj/down_proj/act_fn``, activation modules from ``transformers.activations`` and ``torch.nn``.

We do not use lxt (the AttnLRP reference implementation): lxt 2.1 does not import under transformers 5.x
(docs/design.md, "The gate under AdamW": it imports the removed ``transformers.modeling_attn_mask_utils``; its ``zennit`` dependency
pulls torchvision, which replaces torch).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from aglcl.errors import AglclError

ATTN_NAME = "aglcl_lrp"
_ACTIVATIONS = (nn.SiLU, nn.GELU, nn.ReLU, nn.LeakyReLU, nn.Mish, nn.Tanh, nn.ELU, nn.SELU)
_MISSING = object()


def _half(t: torch.Tensor) -> torch.Tensor:
    """Forward ``t`` (exactly), backward half the gradient: the uniform rule for one operand of a product."""
    h = t * 0.5
    return h + h.detach()


def _surrogate(value: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Forward ``value`` (exactly), backward the gradient of ``s``."""
    return value.detach() + (s - s.detach())


def _identity_rule(act, x: torch.Tensor, epsilon: float, slope0: float) -> torch.Tensor:
    """``act(x)`` with gradient ``act(x) / x`` (act'(0) where |x| < epsilon): relevance passes unchanged."""
    with torch.no_grad():
        y = act(x)
        ratio = torch.where(x.abs() < epsilon, torch.full_like(y, slope0), y / x)
    return _surrogate(y, x * ratio)


def _slope_at_zero(act) -> float:
    """act'(0) by central difference (= lim act(x)/x for act(0) = 0); 0.5 if act cannot run on a CPU tensor."""
    h = 1e-3
    try:
        with torch.no_grad():
            y = act(torch.tensor([h, -h]))
        return float((y[0] - y[1]) / (2 * h))
    except Exception:  # e.g. a parametrised activation living on another device
        return 0.5


def _is_activation(m: nn.Module) -> bool:
    return isinstance(m, _ACTIVATIONS) or type(m).__module__ == "transformers.activations"


def _activation_forward(m: nn.Module, epsilon: float):
    act, slope0 = m.forward, _slope_at_zero(m)
    return lambda x: _identity_rule(act, x, epsilon, slope0)


def _rmsnorm_forward(m: nn.Module):
    """``w ⊙ x · rsqrt(mean(x²) + ε)`` as in ``LlamaRMSNorm`` (float32), with the rsqrt factor detached."""
    original, eps, checked = m.forward, getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)), []

    def forward(x):
        dtype, h = x.dtype, x.to(torch.float32)
        scale = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps).detach()
        y = m.weight * (h * scale).to(dtype)
        if not checked:  # once per context: refuse RMSNorm variants whose formula differs (e.g. 1 + weight)
            with torch.no_grad():
                if not torch.allclose(y.float(), original(x).float(), rtol=1e-3, atol=1e-5):
                    raise AglclError(f"LRP: {type(m).__name__} does not compute weight * x / rms(x); "
                                     f"only Llama-style RMSNorm is supported")
            checked.append(True)
        return y

    return forward


def _layernorm_forward(m: nn.LayerNorm):
    """``(x − mean) / std.detach() · w + b``; the forward value is ``F.layer_norm``'s own."""
    dims = tuple(range(-len(m.normalized_shape), 0))

    def forward(x):
        with torch.no_grad():
            y = F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
        mean, var = x.mean(dims, keepdim=True), x.var(dims, keepdim=True, unbiased=False)
        s = (x - mean) * torch.rsqrt(var + m.eps).detach()
        s = s * m.weight if m.weight is not None else s
        s = s + m.bias if m.bias is not None else s
        return _surrogate(y, s)

    return forward


def _gated_mlp_forward(m: nn.Module, patched: set, epsilon: float):
    """``down(act(gate(x)) * up(x))`` with the uniform rule on the product (and the identity rule on act)."""
    def forward(x):
        gate, act = m.gate_proj(x), m.act_fn
        a = act(gate) if id(act) in patched else _identity_rule(act, gate, epsilon, 0.5)
        return m.down_proj(_half(a) * _half(m.up_proj(x)))

    return forward


def lrp_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with the uniform rule on ``Q·Kᵀ`` and ``A·V`` and plain gradient through softmax.

    Shapes as transformers' attention functions: q ``[b, h, q, d]``, k/v ``[b, h_kv, k, d]``; returns
    ``(out [b, q, h, d], probs)``. GQA: k/v heads are repeated (head i uses kv head ``i // (h / h_kv)``).
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(_half(query), _half(key).transpose(2, 3)) * scaling
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    elif getattr(module, "is_causal", False) and scores.shape[-2] > 1:  # no mask was built: apply causality
        q, k = scores.shape[-2:]
        causal = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(k - q)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(_half(probs), _half(value))
    return out.transpose(1, 2).contiguous(), probs


def _fused(attention):
    """``attention`` (a registered kernel) with the uniform rule as gradient scales: 1/4 on q and k, 1/2 on v."""
    def forward(module, query, key, value, attention_mask, **kwargs):
        return attention(module, _half(_half(query)), _half(_half(key)), _half(value), attention_mask, **kwargs)

    return forward


def _register(impl) -> str:
    """The attention name to switch a config on from ``impl`` (its current implementation), registered once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fused = isinstance(impl, str) and impl in ALL_ATTENTION_FUNCTIONS and impl in ALL_MASK_ATTENTION_FUNCTIONS
    name = f"{ATTN_NAME}_{impl}" if fused else ATTN_NAME
    if name not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _fused(ALL_ATTENTION_FUNCTIONS[impl]) if fused else lrp_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl] if fused else eager_mask)
    return name


def _configs(model: nn.Module) -> list:
    """Every transformers config reachable from the model's modules (and their sub-configs), once each."""
    found, stack = {}, [getattr(m, "config", None) for m in model.modules()]
    while stack:
        c = stack.pop()
        if hasattr(c, "_attn_implementation_internal") and id(c) not in found:
            found[id(c)] = c
            stack += [getattr(c, key, None) for key in getattr(c, "sub_configs", {}) or {}]
    return list(found.values())


@contextlib.contextmanager
def lrp_rules(model: nn.Module, *, epsilon: float = 1e-6):
    """Patch ``model`` so that backward computes AttnLRP modified gradients; restore everything on exit.

    ``epsilon`` is the zero guard of the identity rule (``|x| < epsilon`` uses act'(0)). Yields ``model``.
    """
    forwards, configs = [], []
    try:
        patched = {id(m) for m in model.modules() if _is_activation(m)}
        for m in model.modules():
            if id(m) in patched:
                new = _activation_forward(m, epsilon)
            elif type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor):
                new = _rmsnorm_forward(m)
            elif isinstance(m, nn.LayerNorm):
                new = _layernorm_forward(m)
            elif all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                new = _gated_mlp_forward(m, patched, epsilon)
            else:
                continue
            forwards.append((m, m.__dict__.get("forward", _MISSING)))
            m.forward = new
        for c in _configs(model):
            configs.append((c, c._attn_implementation_internal))
            c._attn_implementation_internal = _register(c._attn_implementation_internal)
        yield model
    finally:
        for c, old in reversed(configs):
            c._attn_implementation_internal = old
        for m, old in reversed(forwards):
            if old is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old
