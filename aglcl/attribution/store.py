"""Importance maps on disk: safetensors only (never pickle), written atomically.

Layout (docs/design.md, "Run-dir contract")::

    <run>/importance/task_<k>_<name>.safetensors    per-task map, k = 1..T
    <run>/importance/combined.safetensors           the running map R̄

Tensor names are the parameter names as-is. Every file carries string metadata: ``estimator``,
``normalize``, ``scope``, ``task`` (empty when the caller did not give them), ``names_hash``, ``dtype`` and
``sha256`` (a digest of the stored tensors, so that :func:`load_map` refuses a flipped byte; all three
always computed here, overriding anything passed), plus any other key the caller passes.

Storage dtypes:

- ``float32``: exact.
- ``bfloat16``: stored as bf16 (8 bits of mantissa, float32's exponent range), loaded back as float32.
- ``uint8``: only for maps already in [0, 1]; stores ``q = round(255·x)`` with metadata ``scale = 1/255``
  and loads ``q / 255`` as float32, so ``|x - x̂| ≤ 1/510``. Values outside [0, 1] are refused.

float16 is deliberately not offered: raw importances are heavy-tailed and their small values underflow
to 0 in fp16 (docs/design.md, "The gate under AdamW").

Sharded maps (FSDP2, large models): every rank writes the piece of each tensor it holds to
``<stem>.rank<r>-of-<W>.safetensors`` (same dtypes and metadata) and rank 0 writes ``<file>.index.json``::

    {"format": "aglcl-sharded-map", "dtype": ..., "metadata": {...},
     "tensors": {name: {"shape": [...], "shards": [{"file": ..., "offset": [...], "shape": [...]}]}}}

:func:`read_map` reads either layout, and only the slice each rank asks for
(``safe_open(...).get_slice``): no rank ever loads a whole map it does not need.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor

from aglcl.attribution.normalize import check_finite
from aglcl.errors import AglclError, choices
from aglcl.rundir import atomic_write

DTYPES = ("float32", "bfloat16", "uint8")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "uint8": torch.uint8}
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


def content_digest(tensors: dict[str, Tensor]) -> str:
    """sha256 (first 32 hex chars) over the sorted names, dtypes, shapes and bytes of ``tensors``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def task_map_path(run_dir, k: int, name: str) -> Path:
    """``<run>/importance/task_<k>_<name>.safetensors`` with ``k`` 1-based."""
    if int(k) < 1:
        raise ValueError(f"task index k={k} must be >= 1")
    return Path(run_dir) / IMPORTANCE / f"task_{int(k)}_{name}.safetensors"


def combined_path(run_dir) -> Path:
    """``<run>/importance/combined.safetensors``."""
    return Path(run_dir) / IMPORTANCE / COMBINED


def _encode(maps: dict[str, Tensor], dtype: str) -> dict[str, Tensor]:
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
    return tensors


def _metadata(tensors: dict[str, Tensor], dtype: str, metadata: dict | None) -> dict[str, str]:
    meta = {"estimator": "", "normalize": "", "scope": "", "task": ""}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    meta.update(names_hash=names_hash(tensors), dtype=dtype, sha256=content_digest(tensors))
    if dtype == "uint8":
        meta["scale"] = repr(1.0 / UINT8_LEVELS)
    else:
        meta.pop("scale", None)
    return meta


def save_map(path, maps: dict[str, Tensor], *, dtype: str = "float32", metadata: dict[str, str]) -> None:
    """Write ``maps`` to ``path`` in ``dtype`` (see the module docstring), atomically."""
    tensors = _encode(maps, dtype)
    atomic_write(Path(path), safetensors.torch.save(tensors, metadata=_metadata(tensors, dtype, metadata)))
    index_path(path).unlink(missing_ok=True)  # a sharded map of the same name is now stale


def index_path(path) -> Path:
    """``<file>.index.json``: the index of a sharded map (``combined.safetensors.index.json``)."""
    return Path(f"{path}.index.json")


def shard_path(path, rank: int, world: int) -> Path:
    """``<stem>.rank<r>-of-<W>.safetensors``: rank ``r``'s piece of a sharded map."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank:05d}-of-{world:05d}{path.suffix}")


def map_exists(path) -> bool:
    return Path(path).is_file() or index_path(path).is_file()


def save_map_sharded(path, maps: dict[str, Tensor], *, layout: dict[str, tuple[tuple, tuple]],
                     dtype: str = "float32", metadata: dict[str, str] | None = None) -> None:
    """Write a map whose tensors are rank-local pieces (a collective: every rank calls it).

    ``layout`` maps a sharded tensor's name to ``(global shape, offset of this rank's piece)``; tensors
    not in it are whole (replicated) and written by rank 0 only. Rank 0 then writes the index.
    """
    from aglcl import dist

    rank, world = dist.rank(), dist.world_size()
    mine = {n: t for n, t in maps.items() if n in layout or rank == 0}
    tensors = _encode(mine, dtype)
    meta = _metadata(tensors, dtype, metadata)
    file = shard_path(path, rank, world)
    atomic_write(file, safetensors.torch.save(tensors, metadata=meta))
    entries = {n: {"file": file.name, "offset": list(layout[n][1]) if n in layout else [0] * t.ndim,
                   "shape": list(t.shape), "global": list(layout[n][0]) if n in layout else list(t.shape)}
               for n, t in tensors.items()}
    everyone = dist.all_gather_object(entries)
    if rank == 0:
        index: dict = {"format": "aglcl-sharded-map", "dtype": dtype, "world_size": world,
                       "metadata": {k: v for k, v in meta.items() if k != "names_hash"}, "tensors": {}}
        for part in everyone:
            for n, e in part.items():
                slot = index["tensors"].setdefault(n, {"shape": e.pop("global"), "shards": []})
                e.pop("global", None)
                slot["shards"].append(e)
        index["tensors"] = {n: index["tensors"][n] for n in maps}  # model order
        index["metadata"]["names_hash"] = names_hash({n: v["shape"] for n, v in index["tensors"].items()})
        atomic_write(index_path(path), json.dumps(index, indent=1) + "\n")
        Path(path).unlink(missing_ok=True)  # a single-file map of the same name is now stale
    dist.barrier()


def _decode(t: Tensor, levels: int) -> Tensor:
    return t.to(torch.float32) / levels if t.dtype == torch.uint8 else t.to(torch.float32)


def _levels(meta: dict, path=None) -> int:
    """The uint8 levels: metadata ``scale`` (when present) must be 1/255, the only scale :func:`save_map` writes."""
    scale = meta.get("scale", repr(1.0 / UINT8_LEVELS))
    try:
        ok = math.isclose(float(scale), 1.0 / UINT8_LEVELS, rel_tol=1e-9)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise AglclError(f"importance map {path}: metadata scale={scale!r} is not 1/{UINT8_LEVELS}, the only "
                         "uint8 scale; the file was altered")
    return UINT8_LEVELS


def map_shapes(path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """``({name: shape}, metadata)`` of a map on disk (single file or sharded), without reading tensors."""
    path = Path(path)
    try:
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                return {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}, dict(f.metadata() or {})
        index = json.loads(index_path(path).read_text())
        return {n: tuple(v["shape"]) for n, v in index["tensors"].items()}, dict(index.get("metadata", {}))
    except FileNotFoundError:
        raise AglclError(f"importance map not found: {path}") from None
    except Exception as exc:  # SafetensorError, bad JSON, missing keys
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AglclError(f"importance map {path} is corrupt or truncated: {msg}") from exc


def read_map(path, want: dict[str, tuple[slice, ...] | None] | None = None,
             device="cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read ``{name: region}`` of a map (single file or sharded) as float32: ``None`` or a missing name
    in ``want`` reads the whole tensor; ``want=None`` reads every tensor whole. Only the requested
    regions are read (``safe_open(...).get_slice``)."""
    shapes, meta = map_shapes(path)
    want = {n: None for n in shapes} if want is None else want
    for n in want:
        if n not in shapes:
            raise AglclError(f"importance map {path} has no tensor {n!r}")
    path = Path(path)
    levels = _levels(meta, path)
    out: dict[str, Tensor] = {}
    try:
        if path.is_file():
            raw: dict[str, Tensor] = {}
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for n, region in want.items():
                    if region is not None and any(r.stop <= r.start for r in region):  # an empty shard
                        out[n] = torch.zeros([max(r.stop - r.start, 0) for r in region], device=device)
                        continue
                    raw[n] = f.get_slice(n)[region] if region is not None else f.get_tensor(n)
            whole = set(raw) == set(shapes) and all(want[n] is None for n in raw)
            _verify(path, raw, meta, whole=whole)  # the digests need every tensor whole
            out = {n: out[n] if n in out else _decode(raw[n], levels) for n in want}
        else:
            index = json.loads(index_path(path).read_text())
            handles: dict[str, object] = {}
            try:
                for n, region in want.items():
                    out[n] = _read_region(n, index["tensors"][n], region, path.parent, handles, levels, device)
            finally:
                for h in handles.values():
                    h.__exit__(None, None, None)
    except AglclError:
        raise
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AglclError(f"importance map {path} is corrupt or truncated: {msg}") from exc
    for n, x in out.items():
        check_finite(n, x, where=f"importance map {path}")
    return out, meta


def _read_region(name: str, entry: dict, region, folder: Path, handles: dict, levels: int, device) -> Tensor:
    """The region ``[a:b, ...]`` of a sharded tensor, assembled from the shards that overlap it."""
    shape = tuple(entry["shape"])
    region = region or tuple(slice(0, d) for d in shape)
    region = tuple(slice(*r.indices(d)[:2]) for r, d in zip(region, shape)) + tuple(
        slice(0, d) for d in shape[len(region):])
    out = torch.zeros(tuple(r.stop - r.start for r in region), dtype=torch.float32, device=device)
    for shard in entry["shards"]:
        src, dst = [], []
        for r, o, s in zip(region, shard["offset"], shard["shape"]):
            lo, hi = max(r.start, o), min(r.stop, o + s)
            if lo >= hi:
                break
            src.append(slice(lo - o, hi - o))
            dst.append(slice(lo - r.start, hi - r.start))
        else:
            if shard["file"] not in handles:
                h = safe_open(str(folder / shard["file"]), framework="pt", device=str(device))
                handles[shard["file"]] = h.__enter__()
            out[tuple(dst)] = _decode(handles[shard["file"]].get_slice(name)[tuple(src)], levels)
    return out


def load_map(path, *, expect: dict[str, tuple] | None = None,
             device="cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a map written by :func:`save_map`: ``(float32 tensors on device, metadata)``.

    Checks: the file exists and parses; ``names_hash`` and ``sha256`` in the metadata match the tensors
    read; every tensor is stored in the ``dtype`` of the metadata (one of :data:`DTYPES`); with ``expect``
    (``{name: shape or tensor}``, e.g. from the model) the names, every shape and the hash match it; no
    NaN or inf. Each failure is a one-line :class:`AglclError` naming the file.
    """
    path = Path(path)
    if not path.is_file() and index_path(path).is_file():  # a sharded map: assemble it whole
        shapes, _ = map_shapes(path)
        if expect is not None and (set(shapes) != set(expect)
                                   or any(shapes[n] != _shape(v) for n, v in expect.items())):
            raise AglclError(f"importance map {path} does not match the model (names or shapes differ)")
        return read_map(path, device=device)
    if not path.is_file():
        raise AglclError(f"importance map not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = dict(f.metadata() or {})
            raw = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, bad JSON header, ...
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AglclError(f"importance map {path} is corrupt or truncated: {msg}") from exc
    _verify(path, raw, meta)
    levels = _levels(meta, path)
    stored = meta.get("names_hash")
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
    out: dict[str, Tensor] = {}
    for n, t in raw.items():
        x = _decode(t, levels)
        check_finite(n, x, where=f"importance map {path}")
        out[n] = x
    return out, meta


def _verify(path: Path, raw: dict[str, Tensor], meta: dict[str, str], whole: bool = True) -> None:
    """Storage dtypes match the metadata; with every tensor read ``whole``, so do ``sha256``/``names_hash``."""
    _check_dtypes(path, raw, meta)
    if not whole:
        return
    digest = meta.get("sha256")
    if digest is not None and digest != content_digest(raw):
        raise AglclError(f"importance map {path}: its tensors do not match the sha256 {digest} in its "
                         "metadata; the file is corrupt (re-run the attribution or restore the file)")
    stored = meta.get("names_hash")
    if stored is not None and stored != names_hash(raw):
        raise AglclError(f"importance map {path}: names_hash {stored} in its metadata does not match its "
                         f"tensors ({names_hash(raw)}); the file was altered")


def _check_dtypes(path: Path, raw: dict[str, Tensor], meta: dict[str, str]) -> None:
    """Every tensor is stored in a dtype of :data:`DTYPES`: the one ``meta['dtype']`` names, if any."""
    declared = meta.get("dtype")
    if declared is not None and declared not in DTYPES:
        raise AglclError(f"importance map {path}: metadata dtype={declared!r} is not one of {choices(DTYPES)}")
    allowed = {declared} if declared is not None else set(DTYPES)
    for n, t in raw.items():
        stored = next((k for k, v in _TORCH_DTYPES.items() if v == t.dtype), str(t.dtype).removeprefix("torch."))
        if stored not in allowed:
            raise AglclError(f"importance map {path}: parameter {n!r} is stored as {stored}, expected "
                             f"{choices(allowed)}" + (f" (its metadata says dtype={declared!r})" if declared else ""))


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
