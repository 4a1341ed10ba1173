"""The attribution step the runner runs after each task (``conf/attribution/*.yaml``).

    aglcl train method=agft attribution=grad_x_weight attribution.normalize=rank attribution.combine=max

estimate (raw importance) → normalise per tensor or block into [0, 1] → combine with the running map
(``max`` is the paper's R̄ = [max_τ R_τ]₊) → store ``importance/task_<k>_<name>.safetensors`` and
``importance/combined.safetensors``. Only one combined map is kept, so memory is O(1) in the tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
                 ema_decay: float = 0.5, dtype: str = "uint8", after_last: bool = False):
        for key, value, options in (("normalize", normalize, norm.NORMALIZERS), ("scope", scope, norm.SCOPES),
                                    ("combine", combine, norm.COMBINES), ("dtype", dtype, store.DTYPES)):
            if value not in options:
                raise AglclError(f"attribution.{key}={value!r} is invalid; choose from: {', '.join(options)}")
        if not 0.0 <= ema_decay < 1.0:
            raise AglclError(f"attribution.ema_decay={ema_decay} is invalid: must be in [0, 1)")
        self.estimator = estimator
        self.normalize, self.scope, self.combine, self.ema_decay, self.dtype = normalize, scope, combine, ema_decay, dtype
        self.after_last = after_last  # also attribute the last task (only useful for reports)
        self.combined: dict[str, torch.Tensor] | None = None
        self.count = 0

    def before_task(self, model) -> None:
        self.estimator.before_task(model)

    def after_task(self, k: int, name: str, model, examples: list[dict], pad_id: int, run_dir: Path) -> dict:
        """Estimate task ``k`` (1-based), update and store the maps; returns the combined map."""
        raw = self.estimator(model, examples, pad_id)
        task_map = norm.normalize(raw, method=self.normalize, scope=self.scope)
        self.count += 1
        combined = norm.combine(self.combined, task_map, how=self.combine, ema_decay=self.ema_decay,
                                count=self.count)
        self.combined = {n: as_stored(t, self.dtype) for n, t in combined.items()}  # = what a resume reads
        meta = {"estimator": type(self.estimator).__name__, "normalize": self.normalize, "scope": self.scope,
                "combine": self.combine, "task": name, "k": str(k),
                # raw magnitude per tensor: rank-normalised maps are uniform, these tell layers apart
                "raw_mean": json.dumps({n: float(t.float().mean()) for n, t in raw.items()})}
        store.save_map(store.task_map_path(run_dir, k, name), task_map, dtype=self.dtype, metadata=meta)
        store.save_map(store.combined_path(run_dir), self.combined, dtype=self.dtype,
                       metadata={**meta, "task": "combined", "tasks": str(self.count)})
        return self.combined

    def restore(self, run_dir: Path, model, completed: int) -> dict | None:
        """Read the combined map back (resume); refuses maps that do not match the model."""
        path = store.combined_path(run_dir)
        if completed == 0 or not path.is_file():
            return None
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        maps, meta = store.load_map(path)  # the map covers a subset of the parameters: check that subset
        for name, value in maps.items():
            if name not in shapes:
                raise AglclError(f"{path} names parameter '{name}', which the model lacks")
            if tuple(value.shape) != shapes[name]:
                raise AglclError(f"{path}: '{name}' has shape {tuple(value.shape)}, the model's {shapes[name]}")
        self.combined, self.count = maps, int(meta.get("tasks", completed))
        return maps
