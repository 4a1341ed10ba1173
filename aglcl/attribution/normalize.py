"""Normalise raw importance maps into [0, 1] and fold them into one running map R̄.

Raw importance (``{param_name: tensor}``, non-negative, heavy-tailed) is mapped into [0, 1] per *group*,
then combined across tasks so that memory stays O(1) in the number of tasks. A method gates updates
with ``s = 1 - λ·R̄``. Normalisation decides whether that gate does anything (docs/design.md, "The gate under AdamW"): after
min-max normalisation of a heavy-tailed map almost every weight keeps ``s > 0.9``; rank normalisation
spreads the gate uniformly.

Normalisers, for a group ``x`` of ``n`` elements:

- ``minmax``: ``(x - min x) / (max x - min x)``; a constant group gives zeros.
- ``rank`` (quantile): ``rank(x_i) / (n - 1)`` with ``rank`` the 0-based *minimum* rank of ties
  ("competition" ranking: tied elements all get the position of the first of them). A block of exact
  zeros, common in raw maps (unused embedding rows, LoRA's ``B = 0``), therefore stays at 0 instead of
  receiving mid-range protection; a constant group gives zeros, as with ``minmax``; ``n = 1`` gives 0.
  The maximum is 1 exactly when the largest value is unique. Exactly (``attribution.exact_rank=true``): O(n log n),
  one ``torch.sort`` per tensor. By default, O(n) to within 1/1024 (:func:`_rank_fast`: counts over the
  floats' bits), finer than the uint8 store's 1/255.
- ``ztanh``: ``|tanh((x - mean x) / std x)|`` with the population std; ``std = 0`` gives zeros.
  Note this is not monotone in ``x``: values far *below* the mean also score high.

Scopes: ``tensor`` normalises each tensor alone. ``block`` normalises all tensors of one Transformer
block together (names containing ``.layers.<i>.`` or ``.h.<i>.``, e.g. ``model.layers.3.mlp.up_proj.weight``
or ``transformer.h.3.attn.c_attn.weight``); tensors outside a block normalise alone.

Combination rules, ``R̄_new = combine(R̄_prev, R_t)``:

- ``max``: ``max(R̄_prev, R_t)`` elementwise (the paper's ``[max_τ R_τ]₊``).
- ``ema``: ``decay·R̄_prev + (1 - decay)·R_t``.
- ``sum``: ``S = R̄_prev + R_t``, then ``S / max(S)`` *per tensor* (whatever the normalisation scope);
  a tensor whose sum is all zero stays zero.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from aglcl.errors import AglclError, choices

NORMALIZERS = ("minmax", "rank", "ztanh")
SCOPES = ("tensor", "block")
COMBINES = ("max", "ema", "sum")

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def block_key(name: str) -> str:
    """The group a parameter normalises with under ``scope=block``: the name up to the block index."""
    m = _BLOCK.search(name)
    return name[: m.end()] if m else name


def check_finite(name: str, t: Tensor, where: str = "importance map") -> None:
    """Raise :class:`AglclError` naming ``name`` if ``t`` holds NaN or inf."""
    if t.is_floating_point() and t.numel() and not all(map(math.isfinite, map(float, torch.aminmax(t)))):
        raise AglclError(f"{where}: parameter {name!r} contains NaN or inf values")


def _minmax(x: Tensor) -> Tensor:
    lo, hi = x.min(), x.max()
    if hi <= lo:
        return torch.zeros_like(x)
    return (x - lo).div_(hi - lo).clamp_(0.0, 1.0)


def _rank_rows(x: Tensor) -> Tensor:
    """Min-rank of every element within its row, / (n − 1); rows are sorted in parallel (2-D input)."""
    n = x.shape[1]
    if n <= 1:
        return torch.zeros_like(x)
    s, order = torch.sort(x, dim=1)
    new_run = torch.ones_like(s, dtype=torch.bool)
    new_run[:, 1:] = s[:, 1:] != s[:, :-1]
    del s
    # index of the first element of each run of ties = the min rank, carried along the run by cummax
    starts = torch.where(new_run, torch.arange(n, device=x.device).expand_as(order), 0)
    ranks = torch.cummax(starts, dim=1).values.to(torch.float32).div_(n - 1)
    del starts, new_run
    return torch.empty_like(x).scatter_(1, order, ranks)


def _rank(x: Tensor) -> Tensor:
    return _rank_rows(x.reshape(1, -1))[0].view_as(x)


FAST_MIN = 1 << 16  # tensors with fewer elements are ranked exactly (a sort is as cheap)
_HI = 18  # the first count: buckets of a float's top 18 bits (2^18 buckets, relative width 2^-9)
_HEAVY = 1024  # a bucket holding more than n / 1024 elements is resolved again, to single values


def _ordered_bits(flat: Tensor) -> Tensor:
    """float32 -> int32 with the same order (``-0.0`` counts as ``+0.0``): a positive float's bits are
    already ordered as integers; a negative one's low 31 bits are flipped so that larger magnitudes sort lower."""
    bits = (flat + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _min_ranks(keys: Tensor) -> Tensor:
    """The 0-based min-rank of every element of a 1-D tensor, as int64 (one sort)."""
    s, order = torch.sort(keys)
    new_run = torch.ones_like(s, dtype=torch.bool)
    new_run[1:] = s[1:] != s[:-1]
    starts = torch.where(new_run, torch.arange(s.numel(), device=s.device), 0)
    return torch.empty_like(starts).scatter_(0, order, torch.cummax(starts, 0).values)


def _rank_fast(x: Tensor) -> Tensor:
    """The min-rank ``rank(x_i) / (n − 1)`` to within 1/1024, in O(n) for spread-out values: no sampling.

    Every element's float bits, as an order-preserving integer key (:func:`_ordered_bits`), are counted in
    2^18 buckets of their top 18 bits; an element's rank is the number of elements in the buckets below its
    own. The elements of buckets that hold more than n/1024 of them are ranked again on their whole key (a
    second count over the remaining 14 bits, or a sort of just those elements when there are many such
    buckets), which is exact. So the rank is exact for ties, blocks of exact zeros (which stay at 0) and
    any value held by more than n/1024 elements, and short by fewer than n/1024 elements otherwise. Tested
    against the exact rank: max |error| < 1/1023, finer than the uint8 store's 1/255.
    """
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    if n < FAST_MIN:
        return _rank(flat).view_as(x)
    key = _ordered_bits(flat)
    low = 32 - _HI
    hi = (key >> low) + (1 << (_HI - 1))  # in [0, 2^18)
    counts = torch.bincount(hi, minlength=1 << _HI)
    before = torch.cumsum(counts, 0).sub_(counts)  # elements in lower buckets
    rank = before[hi]
    heavy = counts > n // _HEAVY
    num_heavy = int(heavy.sum())
    if num_heavy:
        members = heavy[hi].nonzero().squeeze(1)
        if num_heavy << low <= 4 * n:  # a second count: bucket slot x low bits
            slot = torch.cumsum(heavy, 0).sub_(1)
            fine = slot[hi[members]] * (1 << low) + (key[members] & ((1 << low) - 1))
            fine_counts = torch.bincount(fine, minlength=num_heavy << low).view(num_heavy, 1 << low)
            rank[members] += torch.cumsum(fine_counts, 1).sub_(fine_counts).view(-1)[fine]
        else:  # many heavy buckets: the exact rank among their elements, less those of lower heavy buckets
            sub = _min_ranks(key[members])
            heavy_counts = torch.where(heavy, counts, 0)
            below = torch.cumsum(heavy_counts, 0).sub_(heavy_counts)
            rank[members] += sub - below[hi[members]]
    return rank.to(torch.float32).div_(n - 1).view_as(x)


_ROWS = 1 << 24  # elements per stacked batch of same-shape tensors (bounds the sort's temporaries)


def _rank_per_tensor(maps: dict[str, Tensor], exact: bool = True) -> dict[str, Tensor]:
    """Per-tensor rank: :func:`_rank_fast` unless ``exact``; exactly, tensors of one shape are stacked so
    the sorts run in parallel (~2x on 2 cores)."""
    if not exact:
        return {n: _rank_fast(t.detach()).contiguous() for n, t in maps.items()}
    by_shape: dict[tuple, list[str]] = {}
    for name, t in maps.items():
        by_shape.setdefault((tuple(t.shape), t.device), []).append(name)
    out = {}
    for (shape, _), names in by_shape.items():
        numel = max(maps[names[0]].numel(), 1)
        step = max(1, _ROWS // numel)
        for i in range(0, len(names), step):
            chunk = names[i : i + step]
            rows = _rank_rows(torch.stack([maps[n].detach().reshape(-1).to(torch.float32) for n in chunk]))
            out.update({n: r.reshape(shape).contiguous() for n, r in zip(chunk, rows)})
    return out


def _ztanh(x: Tensor) -> Tensor:
    std, mean = torch.std_mean(x.to(torch.float64), correction=0)
    if not std > 0:
        return torch.zeros_like(x)
    return ((x - mean.float()) / std.float()).tanh_().abs_()


_FUNCS = {"minmax": _minmax, "rank": _rank, "ztanh": _ztanh}


def normalize(maps: dict[str, Tensor], method: str = "rank", scope: str = "tensor",
              exact: bool = True) -> dict[str, Tensor]:
    """Map each group of ``maps`` into [0, 1] (float32, same shapes, devices and keys). ``exact=False`` ranks
    in O(n) to within the uint8 store's resolution (:func:`_rank_fast`)."""
    if method not in _FUNCS:
        raise AglclError(f"attribution.normalize={method!r} is not one of {choices(NORMALIZERS)}")
    if scope not in SCOPES:
        raise AglclError(f"attribution.scope={scope!r} is not one of {choices(SCOPES)}")
    for name, t in maps.items():
        check_finite(name, t)
    if method == "rank" and scope == "tensor":
        ranked = _rank_per_tensor(maps, exact=exact)
        return {n: ranked[n] for n in maps}
    groups: dict[str, list[str]] = {}
    for name in maps:
        groups.setdefault(block_key(name) if scope == "block" else name, []).append(name)
    func = _rank_fast if method == "rank" and not exact else _FUNCS[method]
    out: dict[str, Tensor] = {}
    for names in groups.values():
        flats = [maps[n].detach().reshape(-1).to(torch.float32) for n in names]
        if len(flats) > 1:
            devices = {f.device for f in flats}
            if len(devices) > 1:  # a block split across devices (pipeline sharding): gather on the first
                flats = [f.to(flats[0].device) for f in flats]
        flat = torch.cat(flats) if len(flats) > 1 else flats[0]
        del flats
        res = func(flat) if flat.numel() else flat.clone()
        for n, piece in zip(names, torch.split(res, [maps[n].numel() for n in names]), strict=True):
            out[n] = piece.to(maps[n].device).reshape(maps[n].shape).contiguous()
    return {n: out[n] for n in maps}


def combine(previous: dict[str, Tensor] | None, new: dict[str, Tensor], how: str = "max",
            ema_decay: float = 0.5, count: int = 1) -> dict[str, Tensor]:
    """Fold the normalised map ``new`` into the running map ``previous`` (see the module docstring).

    ``previous is None`` (the first task) returns a float32 copy of ``new``. ``count`` is the number of
    task maps already folded into ``previous`` (≥ 1); it is validated but unused by ``max``/``ema``/``sum``,
    kept so that a count-dependent rule (a running mean) can be added without changing callers.
    The result has exactly the keys and shapes of ``new``; it lives on ``previous``'s devices.
    """
    if how not in COMBINES:
        raise AglclError(f"attribution.combine={how!r} is not one of {choices(COMBINES)}")
    if not 0.0 <= float(ema_decay) <= 1.0:
        raise AglclError(f"attribution.ema_decay={ema_decay!r} must lie in [0, 1]")
    if int(count) < 1:
        raise AglclError(f"combine: count={count!r} must be >= 1")
    for name, t in new.items():
        check_finite(name, t)
    if previous is None:
        return {n: t.detach().to(torch.float32, copy=True).contiguous() for n, t in new.items()}
    for name in sorted(set(previous) | set(new)):
        if name not in new:
            raise AglclError(f"combine: parameter {name!r} is in the running map but not in the new map")
        if name not in previous:
            raise AglclError(f"combine: parameter {name!r} is in the new map but not in the running map")
        if tuple(previous[name].shape) != tuple(new[name].shape):
            raise AglclError(f"combine: parameter {name!r} has shape {tuple(previous[name].shape)} in the "
                             f"running map but {tuple(new[name].shape)} in the new map")
    out: dict[str, Tensor] = {}
    for name, t in new.items():
        prev = previous[name].detach().to(torch.float32)
        cur = t.detach().to(prev.device, torch.float32)
        if how == "max":
            out[name] = torch.maximum(prev, cur)
        elif how == "ema":
            out[name] = prev * float(ema_decay) + cur * (1.0 - float(ema_decay))
        else:
            s = prev + cur
            top = s.max() if s.numel() else None
            out[name] = s.div_(top) if top is not None and top > 0 else s
    return out
