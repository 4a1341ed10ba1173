"""Importance maps on disk: safetensors only (never pickle), written atomically.

Layout (DESIGN.md §5)::

    <run>/importance/task_<k>_<name>.safetensors    per-task map, k = 1..T
    <run>/importance/combined.safetensors           the running map R̄

Tensor names are the parameter names as-is. Every file carries string metadata: ``estimator``,
``normalize``, ``scope``, ``task`` (empty when the caller did not give them), ``names_hash`` and ``dtype``
(always computed here, overriding anything passed), plus any other key the caller passes.

Storage dtypes:

- ``float32``: exact.
- ``bfloat16``: stored as bf16 (8 bits of mantissa, float32's exponent range), loaded back as float32.
- ``uint8``: only for maps already in [0, 1]; stores ``q = round(255·x)`` with metadata ``scale = 1/255``
  and loads ``q / 255`` as float32, so ``|x - x̂| ≤ 1/510``. Values outside [0, 1] are refused.

float16 is deliberately not offered: raw importances are heavy-tailed and their small values underflow
to 0 in fp16 (DESIGN.md §7).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from aglcl.attribution.normalize import check_finite
from aglcl.engine.rundir import atomic_write
from aglcl.errors import AglclError, choices

DTYPES = ("float32", "bfloat16", "uint8")
IMPORTANCE = "importance"
COMBINED = "combined.safetensors"
UINT8_LEVELS = 255
_SAMPLE = 1_000_000  # elements subsampled for quantiles and thresholds
_SEED = 0


def _shape(v) -> tuple[int, ...]:
    return tuple(int(d) for d in (v.shape if isinstance(v, Tensor) else v))


def names_hash(maps_or_model_shapes: dict) -> str:
    """First 16 hex chars of sha256 over the sorted lines ``name:d0,d1,...`` joined by newlines.

    Values may be tensors or shapes (tuples, ``torch.Size``); a scalar's line is ``name:``.
    """
    lines = sorted(f"{n}:{','.join(map(str, _shape(v)))}" for n, v in maps_or_model_shapes.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def task_map_path(run_dir, k: int, name: str) -> Path:
    """``<run>/importance/task_<k>_<name>.safetensors`` with ``k`` 1-based."""
    if int(k) < 1:
        raise ValueError(f"task index k={k} must be >= 1")
    return Path(run_dir) / IMPORTANCE / f"task_{int(k)}_{name}.safetensors"


def combined_path(run_dir) -> Path:
    """``<run>/importance/combined.safetensors``."""
    return Path(run_dir) / IMPORTANCE / COMBINED


def save_map(path, maps: dict[str, Tensor], *, dtype: str = "float32", metadata: dict[str, str]) -> None:
    """Write ``maps`` to ``path`` in ``dtype`` (see the module docstring), atomically."""
    if dtype not in DTYPES:
        raise AglclError(f"importance dtype={dtype!r} is not one of {choices(DTYPES)}")
    tensors: dict[str, Tensor] = {}
    for name, t in maps.items():
        check_finite(name, t)
        x = t.detach().to("cpu", torch.float32, copy=True).contiguous()  # own storage: no tied tensors
        if dtype == "uint8":
            if x.numel() and (x.min() < 0 or x.max() > 1):
                raise AglclError(f"importance map: parameter {name!r} has values outside [0, 1] "
                                 f"(min {x.min().item():.4g}, max {x.max().item():.4g}); normalise first "
                                 "before storing as uint8")
            x = x.mul_(UINT8_LEVELS).round_().to(torch.uint8)
        elif dtype == "bfloat16":
            x = x.to(torch.bfloat16)
        tensors[name] = x
    meta = {"estimator": "", "normalize": "", "scope": "", "task": ""}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    meta.update(names_hash=names_hash(tensors), dtype=dtype)
    if dtype == "uint8":
        meta["scale"] = repr(1.0 / UINT8_LEVELS)
    else:
        meta.pop("scale", None)
    atomic_write(Path(path), safetensors.torch.save(tensors, metadata=meta))


def load_map(path, *, expect: dict[str, tuple] | None = None,
             device="cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a map written by :func:`save_map`: ``(float32 tensors on device, metadata)``.

    Checks: the file exists and parses; ``names_hash`` in the metadata matches the tensors read; with
    ``expect`` (``{name: shape or tensor}``, e.g. from the model) the names, every shape and the hash
    match it; no NaN or inf. Each failure is a one-line :class:`AglclError`.
    """
    path = Path(path)
    if not path.is_file():
        raise AglclError(f"importance map not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            raw = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, bad JSON header, ...
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AglclError(f"importance map {path} is corrupt or truncated: {msg}") from exc
    stored = meta.get("names_hash")
    if stored is not None and stored != names_hash(raw):
        raise AglclError(f"importance map {path}: names_hash {stored} in its metadata does not match its "
                         f"tensors ({names_hash(raw)}); the file was altered")
    if expect is not None:
        missing = [n for n in expect if n not in raw]
        extra = [n for n in raw if n not in expect]
        if missing or extra:
            example = f"missing {missing[0]!r}" if missing else f"extra {extra[0]!r}"
            raise AglclError(f"importance map {path} does not match the model: {len(missing)} parameter(s) "
                             f"missing, {len(extra)} extra (e.g. {example})")
        for n, v in expect.items():
            if tuple(raw[n].shape) != _shape(v):
                raise AglclError(f"importance map {path}: parameter {n!r} has shape {tuple(raw[n].shape)} "
                                 f"in the file but {_shape(v)} in the model")
        if stored is not None and stored != names_hash(expect):
            raise AglclError(f"importance map {path}: names_hash {stored} does not match the model's "
                             f"{names_hash(expect)}")
    scale = float(meta.get("scale", 1.0 / UINT8_LEVELS))
    levels = round(1.0 / scale)
    out: dict[str, Tensor] = {}
    for n, t in raw.items():
        x = t.to(torch.float32) / levels if t.dtype == torch.uint8 else t.to(torch.float32)
        check_finite(n, x, where=f"importance map {path}")
        out[n] = x
    return out, meta


def _subsample(t: Tensor, k: int, gen: torch.Generator) -> Tensor:
    flat = t.detach().reshape(-1)
    if flat.numel() <= k:
        return flat.to(torch.float32)
    idx = torch.randint(flat.numel(), (k,), generator=gen).to(flat.device)
    return flat[idx].to(torch.float32)


def summarize(maps: dict[str, Tensor]) -> list[dict]:
    """Per tensor: ``name, numel, mean, p50, p90, p99, frac_above_0.5`` (python floats).

    ``mean`` and ``frac_above_0.5`` (fraction of elements > 0.5) use every element; the quantiles use
    ``torch.quantile`` on a seeded random subsample of at most 1M elements (exact below that size).
    An empty tensor gets NaN statistics.
    """
    gen = torch.Generator().manual_seed(_SEED)
    rows = []
    for name, t in maps.items():
        row = {"name": name, "numel": t.numel()}
        if t.numel() == 0:
            row.update(dict.fromkeys(("mean", "p50", "p90", "p99", "frac_above_0.5"), math.nan))
        else:
            x = t.detach().to(torch.float32)
            q = torch.quantile(_subsample(x, _SAMPLE, gen), torch.tensor([0.5, 0.9, 0.99], device=x.device))
            row.update(mean=x.mean().item(), p50=q[0].item(), p90=q[1].item(), p99=q[2].item(),
                       **{"frac_above_0.5": (x > 0.5).float().mean().item()})
        rows.append(row)
    return rows


def _threshold(maps: dict[str, Tensor], names: list[str], p: float, gen: torch.Generator) -> float:
    """The value of the ``ceil(p·m)``-th largest of a ≤1M-element sample spread over ``names``."""
    total = sum(maps[n].numel() for n in names)
    share = min(1.0, _SAMPLE / total)
    parts = [_subsample(maps[n], max(1, math.ceil(maps[n].numel() * share)), gen).cpu()
             for n in names if maps[n].numel()]
    sample = torch.cat(parts)
    m = sample.numel()
    k = m - max(1, math.ceil(p * m)) + 1  # kthvalue is 1-based, smallest first
    return sample.kthvalue(k).values.item()


def top_overlap(a: dict[str, Tensor], b: dict[str, Tensor], p: float = 0.05) -> float:
    """``|top_p(a) ∩ top_p(b)| / |top_p(a)|`` over all elements of the tensors shared by ``a`` and ``b``.

    ``top_p(m) = {elements with m ≥ t_m}`` where ``t_m`` is one global threshold per map: the
    ``ceil(p·M)``-th largest value of a seeded sample of ``M ≤ 1M`` elements drawn proportionally from
    the shared tensors (exact when they hold ≤ 1M elements). Ties at the threshold enlarge the set, so
    compare normalised maps, not raw ones with many exact zeros. Identical maps give 1.0.
    Shared = same name and same shape; none shared, or ``p`` outside (0, 1], is an :class:`AglclError`.
    """
    if not 0.0 < p <= 1.0:
        raise AglclError(f"top_overlap: p={p!r} must lie in (0, 1]")
    names = [n for n in a if n in b and tuple(a[n].shape) == tuple(b[n].shape) and a[n].numel()]
    if not names:
        raise AglclError("top_overlap: the two maps share no parameter of the same name and shape")
    ta = _threshold(a, names, p, torch.Generator().manual_seed(_SEED))
    tb = _threshold(b, names, p, torch.Generator().manual_seed(_SEED))
    inter = top = 0
    for n in names:
        in_a = a[n].detach() >= ta
        top += int(in_a.sum())
        inter += int((in_a & (b[n].detach().to(in_a.device) >= tb)).sum())
    return inter / top if top else 0.0
