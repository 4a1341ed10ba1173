"""The attribution step the runner runs after each task (``conf/attribution/*.yaml``).

    aglcl train method=agft attribution=grad_x_weight attribution.normalize=rank attribution.combine=max

estimate (raw importance) → normalise per tensor or block into [0, 1] → combine with the running map
(``max`` is the paper's R̄ = [max_τ R_τ]₊) → store ``importance/task_<k>_<name>.safetensors`` and
``importance/combined.safetensors``. Only one combined map is kept, so memory is O(1) in the tasks.

Several processes: with replicated weights the estimator already returns the same whole map on every
rank and rank 0 alone writes it. With sharded weights (FSDP2) it returns rank-local pieces; each tensor
(or block, ``scope=block``) is then gathered whole, one at a time, normalised identically on every rank
and cut back to the local piece, so the maps stay sharded like the weights (memory O(params / ranks)
plus one tensor) and are written as per-rank shards plus an index (:func:`store.save_map_sharded`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aglcl import dist
from aglcl.attribution import normalize as norm
from aglcl.attribution import store
from aglcl.errors import AglclError


def as_stored(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """``t`` rounded as the store keeps it (uint8: k/255; bf16), so a resumed run sees the same map."""
    if dtype == "uint8":
        return (t * 255).round_() / 255
    return t.bfloat16().float() if dtype == "bfloat16" else t


class Attribution:
    """Runs an estimator after each task and keeps the combined importance map."""

    def __init__(self, estimator, normalize: str = "rank", scope: str = "tensor", combine: str = "max",
                 ema_decay: float = 0.5, dtype: str = "uint8", after_last: bool = False, exact_rank: bool = False):
        for key, value, options in (("normalize", normalize, norm.NORMALIZERS), ("scope", scope, norm.SCOPES),
                                    ("combine", combine, norm.COMBINES), ("dtype", dtype, store.DTYPES)):
            if value not in options:
                raise AglclError(f"attribution.{key}={value!r} is invalid; choose from: {', '.join(options)}")
        if not 0.0 <= ema_decay < 1.0:
            raise AglclError(f"attribution.ema_decay={ema_decay} is invalid: must be in [0, 1)")
        self.estimator = estimator
        self.normalize, self.scope, self.combine, self.ema_decay, self.dtype = normalize, scope, combine, ema_decay, dtype
        self.after_last = after_last  # also attribute the last task (only useful for reports)
        self.exact_rank = exact_rank  # False: O(n) ranks within 1/255 of the exact ones (normalize._rank_fast)
        self.combined: dict[str, torch.Tensor] | None = None
        self.count = 0
        self._layout: dict[str, tuple[tuple, tuple]] = {}  # sharded tensors: (global shape, local offset)

    def before_task(self, model) -> None:
        self.estimator.before_task(model)

    def after_task(self, k: int, name: str, model, examples: list[dict], pad_id: int, run_dir: Path) -> dict:
        """Estimate task ``k`` (1-based), update and store the maps; returns the combined map."""
        raw = self.estimator(model, examples, pad_id)
        sharded = _sharded_params(model, raw)
        self._layout = _layout(sharded)
        if sharded:
            task_map, raw_mean = _normalize_sharded(raw, sharded, self.normalize, self.scope, self.exact_rank)
        else:
            task_map = norm.normalize(raw, method=self.normalize, scope=self.scope, exact=self.exact_rank)
            raw_mean = {n: float(t.float().mean()) for n, t in raw.items()}
        self.count += 1
        combined = norm.combine(self.combined, task_map, how=self.combine, ema_decay=self.ema_decay,
                                count=self.count)
        self.combined = {n: as_stored(t, self.dtype) for n, t in combined.items()}  # = what a resume reads
        meta = {"estimator": type(self.estimator).__name__, "normalize": self.normalize, "scope": self.scope,
                "combine": self.combine, "task": name, "k": str(k),
                # raw magnitude per tensor: rank-normalised maps are uniform, these tell layers apart
                "raw_mean": json.dumps(raw_mean)}
        self._save(store.task_map_path(run_dir, k, name), task_map, meta)
        self._save(store.combined_path(run_dir), self.combined, {**meta, "task": "combined", "tasks": str(self.count)})
        return self.combined

    def _save(self, path: Path, maps: dict, meta: dict) -> None:
        """Rank 0 writes a whole map; a sharded one is written by every rank (shards + index)."""
        if self._layout:
            store.save_map_sharded(path, maps, layout=self._layout, dtype=self.dtype, metadata=meta)
        else:
            if dist.is_main_process():
                store.save_map(path, maps, dtype=self.dtype, metadata=meta)
            dist.barrier()  # the file exists for every rank once this returns

    def save_checkpoint(self, path: Path) -> None:
        """Write the combined map as it stands now into a checkpoint (``path``); nothing if there is none."""
        if self.combined is not None:
            self._save(Path(path), self.combined, {"task": "combined", "tasks": str(self.count)})

    def restore(self, run_dir: Path, model, completed: int, path: Path | None = None) -> dict | None:
        """Read the combined map back (resume) from ``path`` (default: ``importance/combined.safetensors``);
        refuses maps that do not match the model."""
        path = Path(path) if path is not None else store.combined_path(run_dir)
        if completed == 0 or not store.map_exists(path):
            return None
        params = dict(dist.unwrap(model).named_parameters())
        stored, meta = store.map_shapes(path)  # the map covers a subset of the parameters: check that subset
        for name, shape in stored.items():
            if name not in params:
                raise AglclError(f"{path} names parameter '{name}', which the model lacks")
            if tuple(shape) != tuple(params[name].shape):
                raise AglclError(f"{path}: '{name}' has shape {tuple(shape)}, the model's {tuple(params[name].shape)}")
        # each rank reads only its own piece of a sharded weight's map (safetensors get_slice)
        maps, meta = store.read_map(path, {n: dist.local_slices(params[n]) for n in stored})
        self._layout = _layout({n: params[n] for n in stored if dist.is_dtensor(params[n])})
        tasks = meta.get("tasks", str(completed))
        if not (isinstance(tasks, str) and tasks.isdecimal() and int(tasks) >= 1):
            raise AglclError(f"{path}: metadata tasks={tasks!r} is not a task count (an integer >= 1); "
                             "the file was altered")
        self.combined, self.count = maps, int(tasks)
        return maps


def _sharded_params(model, maps: dict) -> dict:
    """``{name: param}`` for the map's tensors whose parameter is a DTensor (FSDP2)."""
    params = dict(dist.unwrap(model).named_parameters())
    return {n: params[n] for n in maps if n in params and dist.is_dtensor(params[n])}


def _layout(sharded: dict) -> dict[str, tuple[tuple, tuple]]:
    return {n: (tuple(p.shape), tuple(s.start for s in dist.local_slices(p))) for n, p in sharded.items()}


def _normalize_sharded(raw: dict, sharded: dict, method: str, scope: str, exact: bool = True) -> tuple[dict, dict]:
    """Normalise a map holding rank-local pieces: each group (a tensor, or a block) is gathered whole,
    normalised exactly as in one process, and cut back to this rank's piece. Collective: the groups
    follow the map's order, the same on every rank. Returns ``(pieces, raw mean per tensor)``."""
    groups: dict[str, list[str]] = {}
    for name in raw:
        groups.setdefault(norm.block_key(name) if scope == "block" else name, []).append(name)
    out, means = {}, {}
    for names in groups.values():
        whole = {n: dist.gather_full(raw[n], sharded[n]).cpu() if n in sharded else raw[n] for n in names}
        means.update({n: float(t.float().mean()) for n, t in whole.items()})
        normed = norm.normalize(whole, method=method, scope=scope, exact=exact)
        for n in names:
            out[n] = dist.local_view(normed[n], sharded[n]).clone() if n in sharded else normed[n]
        del whole, normed
    return {n: out[n] for n in raw}, means
