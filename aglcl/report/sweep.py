"""Aggregate a Hydra multirun sweep: each metric's mean and 95% Student-t CI per override group, over its
repeats (seeds, orders, data seeds), and paired differences against a baseline row.

    rows = aggregate_sweep(sweep_dir)                  # one row per override group (finished jobs only)
    diffs = compare(rows, "method=seqft")              # every other row minus the baseline, repeat by repeat
    jobs = sweep_status(sweep_dir)                     # which jobs finished, failed or never ran

A partial sweep (a failed job stops Hydra's basic launcher; a killed sweep leaves jobs unstarted) is
reported as such: :func:`sweep_status` lists the failed and missing jobs, and rows whose ``n`` is below the
sweep's number of seeds carry ``"complete": False``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from aglcl.errors import AglclError

METRICS = ("op", "bwt", "fwt", "forgetting", "aia", "plasticity")
TIMINGS = ("wall_s", "peak_mem_mb")
# Overrides that repeat a configuration rather than change it: a row pools them, and a paired comparison
# pairs the runs that share them.
REPEATS = ("trainer.seed", "seed", "order", "data_seed")


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


def sweep_status(sweep_dir, group_ignore=REPEATS) -> dict:
    """``{"expected", "finished", "failed": [{num, overrides}], "missing": [...], "seeds"}`` of a sweep dir.

    A job is *finished* with a ``results.json``, *failed* with a job dir but none (it failed or was killed;
    ``aglcl train ... resume=true`` continues it), *missing* when ``multirun.yaml`` lists it but it has no
    dir (the launcher stopped before it). ``seeds`` is the number of distinct combinations of the
    ``group_ignore`` keys (the repeats) among the expected jobs (or the finished ones).
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


def aggregate_sweep(sweep_dir, group_ignore=REPEATS) -> list[dict]:
    """Group the jobs ``<sweep_dir>/<num>/`` by overrides minus ``group_ignore`` (the repeats); one row per group.

    Each row is ``{"overrides": "method=seqft ...", "n": jobs, "complete": bool, "runs": [...], "<metric>":
    t_interval}`` for the CL metrics, plus ``wall_s`` and ``peak_mem_mb`` when any job recorded them; a
    t_interval is ``{"mean", "lo", "hi", "sd", "n"}`` (:func:`aglcl.metrics.stats.t_interval`, None values
    skipped). ``runs`` holds each job's ``{"repeat": (its group_ignore overrides, sorted), "metrics": {...}}``
    for pairing (:func:`compare`) and plots. Groups keep the order of their first job; with the sweep's
    ``multirun.yaml``, a group none of whose jobs finished is a row with ``n`` 0. ``"complete"`` says whether
    a row has as many runs as the sweep has repeats.
    """
    from aglcl.metrics.stats import t_interval

    sweep_dir = Path(sweep_dir)
    found = sweep_dir.iterdir() if sweep_dir.is_dir() else []
    jobs = [p for p in found if p.is_dir() and p.name.isdigit() and (p / "results.json").is_file()]
    jobs.sort(key=lambda p: int(p.name))
    if not jobs:
        raise AglclError(f"no job dirs with results.json (<num>/results.json) under sweep dir {sweep_dir}")

    groups: dict[tuple, dict] = {}

    def group_of(overrides: list[str]) -> dict:
        kept = [o for o in overrides if _override_key(o) not in group_ignore]
        return groups.setdefault(tuple(sorted(kept)), {"overrides": " ".join(kept) or "(base)", "kept": kept,
                                                       "runs": []})

    for overrides in _expected_jobs(sweep_dir) or []:  # a group none of whose jobs finished still gets a row
        group_of(overrides)
    for job in jobs:
        overrides, results = _load_job(job)
        repeat = tuple(sorted(o.lstrip("+") for o in overrides if _override_key(o) in group_ignore))
        group_of(overrides)["runs"].append({"repeat": repeat, "job": int(job.name),
                                            "metrics": results.get("metrics") or {},
                                            "timings": results.get("timings") or {}})

    seeds = sweep_status(sweep_dir, group_ignore)["seeds"]
    rows = []
    for group in groups.values():
        runs = group["runs"]
        row = {"overrides": group["overrides"], "kept": group["kept"], "n": len(runs),
               "complete": len(runs) >= seeds, "runs": runs}
        for key in METRICS:
            row[key] = t_interval(r["metrics"].get(key) for r in runs)
        for key in TIMINGS:
            stats = t_interval(r["timings"].get(key) for r in runs)
            if stats["mean"] is not None:
                row[key] = stats
        rows.append(row)
    return rows


def _baseline_row(rows: list[dict], baseline: str) -> dict:
    """The row ``baseline`` (an override set such as ``method=seqft``) names: the one whose overrides contain
    all of it with the fewest others (overrides every job shares may be left out)."""
    want = {o.lstrip("+") for o in str(baseline).split()}
    found = [row for row in rows if want <= {o.lstrip("+") for o in row["kept"]}]
    fewest = min((len(row["kept"]) for row in found), default=0)
    found = [row for row in found if len(row["kept"]) == fewest]
    names = ", ".join(repr(row["overrides"]) for row in (found if len(found) > 1 else rows))
    if len(found) != 1:
        problem = "matches no row" if not found else "matches several rows equally"
        raise AglclError(f"baseline={baseline!r} {problem} of the sweep; name one of: {names}")
    return found[0]


def compare(rows: list[dict], baseline: str) -> dict[str, dict]:
    """Paired differences of every other row against the ``baseline`` row, repeat by repeat (the runs with
    the same seed / order / data seed): ``{row overrides: {metric: paired}}`` with
    :func:`aglcl.metrics.stats.paired` (mean difference row − baseline, t CI, paired t-test p, exact sign-flip
    p, n pairs). A run without a partner is left out (n counts the pairs)."""
    from aglcl.metrics.stats import paired

    base = _baseline_row(rows, baseline)
    by_repeat = {r["repeat"]: r["metrics"] for r in base["runs"]}
    out = {}
    for row in rows:
        if row is base:
            continue
        pairs = [(r["metrics"], by_repeat[r["repeat"]]) for r in row["runs"] if r["repeat"] in by_repeat]
        out[row["overrides"]] = {key: paired([a.get(key) for a, _ in pairs], [b.get(key) for _, b in pairs])
                                 for key in METRICS}
    return out


def write_sweep_csv(rows, path, diffs: dict | None = None) -> Path:
    """Write ``overrides,n,<metric>_mean,<metric>_lo,<metric>_hi,<metric>_sd,...`` (95% t CI over the repeats;
    empty cells where unavailable) and, with ``diffs`` (:func:`compare`), ``<metric>_diff,_diff_lo,_diff_hi,
    _p_t,_p_sign`` against the baseline (empty on the baseline's own row)."""
    import io

    from aglcl.rundir import atomic_write

    keys = [k for k in (*METRICS, *TIMINGS) if any(k in r for r in rows)]
    diff_cols = ("diff", "diff_lo", "diff_hi", "p_t", "p_sign")
    path = Path(path)

    def num(v):
        return "" if v is None else f"{v:.6g}"

    with io.StringIO(newline="") as f:
        w = csv.writer(f)
        header = ["overrides", "n", *(f"{k}_{s}" for k in keys for s in ("mean", "lo", "hi", "sd"))]
        if diffs is not None:
            header += [f"{k}_{c}" for k in METRICS for c in diff_cols]
        w.writerow(header)
        for r in rows:
            cells = []
            for k in keys:
                ci = r.get(k) or {}
                cells += [num(ci.get(s)) for s in ("mean", "lo", "hi", "sd")]
            if diffs is not None:
                d = diffs.get(r["overrides"], {})
                for k in METRICS:
                    p = d.get(k) or {}
                    cells += [num(p.get(c)) for c in ("mean", "lo", "hi", "p_t", "p_sign")]
            w.writerow([r["overrides"], r["n"], *cells])
        atomic_write(path, f.getvalue())
    return path
