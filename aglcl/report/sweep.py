"""Aggregate a Hydra multirun sweep: mean and std of each metric per override group, over seeds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from aglcl.errors import AglclError

METRICS = ("op", "bwt", "fwt", "forgetting", "aia", "plasticity")
TIMINGS = ("wall_s", "peak_mem_mb")


def _override_key(override: str) -> str:
    """``+trainer.seed=1`` -> ``trainer.seed``."""
    return override.split("=", 1)[0].lstrip("+~")


def _load_job(job: Path) -> tuple[list[str], dict]:
    import yaml

    try:
        results = json.loads((job / "results.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AglclError(f"{job / 'results.json'}: invalid JSON ({e})") from None
    if not isinstance(results, dict):
        raise AglclError(f"{job / 'results.json'}: expected a JSON object with 'metrics' and 'timings'")
    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = []
    if overrides_file.is_file():
        try:
            overrides = yaml.safe_load(overrides_file.read_text(encoding="utf-8")) or []
        except yaml.YAMLError as e:
            raise AglclError(f"{overrides_file}: invalid YAML ({e})") from None
    if not isinstance(overrides, list):
        raise AglclError(f"{overrides_file}: expected a YAML list of 'key=value' strings")
    return [str(o) for o in overrides], results


def _mean_std(values) -> tuple[float | None, float | None]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))  # population std (ddof=0): n=1 -> 0.0


def aggregate_sweep(sweep_dir, group_ignore=("trainer.seed", "seed")) -> list[dict]:
    """Group the jobs ``<sweep_dir>/<num>/`` by overrides minus ``group_ignore``; one row per group.

    Each row is ``{"overrides": "method=seqft ...", "n": jobs, "<metric>": (mean, std)}`` for the CL
    metrics, plus ``wall_s`` and ``peak_mem_mb`` when any job recorded them. None values are skipped;
    std is the population std (ddof=0). Groups keep the order of their first job.
    """
    sweep_dir = Path(sweep_dir)
    found = sweep_dir.iterdir() if sweep_dir.is_dir() else []
    jobs = [p for p in found if p.is_dir() and p.name.isdigit() and (p / "results.json").is_file()]
    jobs.sort(key=lambda p: int(p.name))
    if not jobs:
        raise AglclError(f"no job dirs with results.json (<num>/results.json) under sweep dir {sweep_dir}")

    groups: dict[tuple, dict] = {}
    for job in jobs:
        overrides, results = _load_job(job)
        kept = [o for o in overrides if _override_key(o) not in group_ignore]
        group = groups.setdefault(
            tuple(sorted(kept)), {"overrides": " ".join(kept) or "(base)", "results": []}
        )
        group["results"].append(results)

    rows = []
    for group in groups.values():
        results = group["results"]
        row = {"overrides": group["overrides"], "n": len(results)}
        for key in METRICS:
            row[key] = _mean_std((r.get("metrics") or {}).get(key) for r in results)
        for key in TIMINGS:
            stats = _mean_std((r.get("timings") or {}).get(key) for r in results)
            if stats[0] is not None:
                row[key] = stats
        rows.append(row)
    return rows


def write_sweep_csv(rows, path) -> Path:
    """Write ``overrides,n,<metric>_mean,<metric>_std,...`` (empty cells where unavailable)."""
    import io

    from aglcl.engine.rundir import atomic_write

    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("overrides", "n")))
    path = Path(path)
    with io.StringIO(newline="") as f:
        w = csv.writer(f)
        w.writerow(["overrides", "n", *(f"{k}_{s}" for k in keys for s in ("mean", "std"))])
        for r in rows:
            cells = []
            for k in keys:
                mean, std = r.get(k) or (None, None)
                cells += ["" if mean is None else f"{mean:.6g}", "" if std is None else f"{std:.6g}"]
            w.writerow([r["overrides"], r["n"], *cells])
        atomic_write(path, f.getvalue())
    return path
