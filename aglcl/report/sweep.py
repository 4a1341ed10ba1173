"""Aggregate a Hydra multirun sweep: mean and std of each metric per override group, over seeds.

    rows = aggregate_sweep(sweep_dir)      # one row per override group (finished jobs only)
    jobs = sweep_status(sweep_dir)         # which jobs finished, failed or never ran

A partial sweep (a failed job stops Hydra's basic launcher; a killed sweep leaves jobs unstarted) is
reported as such: :func:`sweep_status` lists the failed and missing jobs, and rows whose ``n`` is below the
sweep's number of seeds carry ``"complete": False``.
"""

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
    try:
        results = json.loads((job / "results.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AglclError(f"{job / 'results.json'}: invalid JSON ({e})") from None
    if not isinstance(results, dict):
        raise AglclError(f"{job / 'results.json'}: expected a JSON object with 'metrics' and 'timings'")
    return _load_overrides(job), results


def _load_overrides(job: Path) -> list[str]:
    import yaml

    overrides_file = job / ".hydra" / "overrides.yaml"
    overrides = []
    if overrides_file.is_file():
        try:
            overrides = yaml.safe_load(overrides_file.read_text(encoding="utf-8")) or []
        except yaml.YAMLError as e:
            raise AglclError(f"{overrides_file}: invalid YAML ({e})") from None
    if not isinstance(overrides, list):
        raise AglclError(f"{overrides_file}: expected a YAML list of 'key=value' strings")
    return [str(o) for o in overrides]


def _mean_std(values) -> tuple[float | None, float | None]:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))  # population std (ddof=0): n=1 -> 0.0


def _expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """Each job's overrides from the sweep's ``multirun.yaml`` (Hydra's basic sweeper), or None."""
    from omegaconf import OmegaConf

    from aglcl.engine.preflight import sweep_jobs

    file = sweep_dir / "multirun.yaml"
    if not file.is_file():
        return None
    try:
        return sweep_jobs(OmegaConf.load(file))
    except Exception:  # an unreadable or foreign multirun.yaml: judge by the job dirs alone
        return None


def sweep_status(sweep_dir, group_ignore=("trainer.seed", "seed")) -> dict:
    """``{"expected", "finished", "failed": [{num, overrides}], "missing": [...], "seeds"}`` of a sweep dir.

    A job is *finished* with a ``results.json``, *failed* with a job dir but none (it failed or was killed;
    ``aglcl train ... resume=true`` continues it), *missing* when ``multirun.yaml`` lists it but it has no
    dir (the launcher stopped before it). ``seeds`` is the number of distinct values of the ``group_ignore``
    keys among the expected jobs (or the finished ones).
    """
    sweep_dir = Path(sweep_dir)
    expected = _expected_jobs(sweep_dir)
    dirs = {int(p.name): p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()} if sweep_dir.is_dir() else {}
    finished = sorted(n for n, p in dirs.items() if (p / "results.json").is_file())
    failed, missing = [], []
    for num in sorted(set(dirs) | set(range(len(expected or [])))):
        overrides = " ".join(expected[num]) if expected and num < len(expected) else ""
        if num not in dirs:
            missing.append({"num": num, "overrides": overrides})
        elif num not in finished:
            if not overrides and (dirs[num] / ".hydra" / "overrides.yaml").is_file():
                overrides = " ".join(_load_overrides(dirs[num]))
            failed.append({"num": num, "overrides": overrides})
    jobs = expected if expected is not None else [_load_overrides(dirs[n]) for n in finished]
    seeds = {tuple(o for o in job if _override_key(o) in group_ignore) for job in jobs}
    return {"expected": len(expected) if expected is not None else None, "finished": len(finished),
            "failed": failed, "missing": missing, "seeds": len(seeds)}


def aggregate_sweep(sweep_dir, group_ignore=("trainer.seed", "seed")) -> list[dict]:
    """Group the jobs ``<sweep_dir>/<num>/`` by overrides minus ``group_ignore``; one row per group.

    Each row is ``{"overrides": "method=seqft ...", "n": jobs, "<metric>": (mean, std)}`` for the CL
    metrics, plus ``wall_s`` and ``peak_mem_mb`` when any job recorded them. None values are skipped;
    std is the population std (ddof=0). Groups keep the order of their first job; with the sweep's
    ``multirun.yaml``, a group none of whose jobs finished is a row with ``n`` 0. ``"complete"`` says whether
    a row has as many runs as the sweep has seeds.
    """
    sweep_dir = Path(sweep_dir)
    found = sweep_dir.iterdir() if sweep_dir.is_dir() else []
    jobs = [p for p in found if p.is_dir() and p.name.isdigit() and (p / "results.json").is_file()]
    jobs.sort(key=lambda p: int(p.name))
    if not jobs:
        raise AglclError(f"no job dirs with results.json (<num>/results.json) under sweep dir {sweep_dir}")

    groups: dict[tuple, dict] = {}

    def group_of(overrides: list[str]) -> dict:
        kept = [o for o in overrides if _override_key(o) not in group_ignore]
        return groups.setdefault(tuple(sorted(kept)), {"overrides": " ".join(kept) or "(base)", "results": []})

    for overrides in _expected_jobs(sweep_dir) or []:  # a group none of whose jobs finished still gets a row
        group_of(overrides)
    for job in jobs:
        overrides, results = _load_job(job)
        group_of(overrides)["results"].append(results)

    seeds = sweep_status(sweep_dir, group_ignore)["seeds"]
    rows = []
    for group in groups.values():
        results = group["results"]
        row = {"overrides": group["overrides"], "n": len(results), "complete": len(results) >= seeds}
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

    from aglcl.rundir import atomic_write

    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("overrides", "n", "complete")))
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
