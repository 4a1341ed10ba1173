"""What ``aglcl eval`` does: metrics of a run dir, of an accuracy matrix file, or of a sweep."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from aglcl import rundir
from aglcl.errors import AglclError
from aglcl.metrics.cl import available
from aglcl.metrics.scorers import get_scorer

SOURCES = ("run_dir", "matrix", "sweep_dir")
MATRIX_OPTIONS = ("tasks", "scale")  # how to read matrix= (aglcl/report/matrix.py)
SWEEP_OPTIONS = ("baseline",)  # sweep_dir= only: the row the others are compared with, pair by pair


def matrix_from_run(run_dir: Path) -> tuple[list[str], list[list[float | None]], list[float]]:
    """Rebuild ``(tasks, R, b)`` by re-scoring every stored prediction with its task's metric (None for the
    cells the run's ``evaluation`` setting left out)."""
    results_file = run_dir / rundir.RESULTS
    if not results_file.is_file():
        raise AglclError(f"{results_file} not found; run_dir must be a finished `aglcl train` run dir")
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
        tasks, metric = results["tasks"], results["metric"]
    except (ValueError, RecursionError, KeyError, TypeError) as exc:  # ValueError: bad JSON, not UTF-8
        reason = (f"{exc.msg} at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError)
                  else f"{type(exc).__name__}: {exc}")
        raise AglclError(f"{results_file} is not a valid results file ({reason}); it is corrupt or "
                         "truncated") from None
    if not (isinstance(tasks, list) and tasks and all(isinstance(t, str) for t in tasks)):
        raise AglclError(f"{results_file}: 'tasks' must be a non-empty list of task names")
    if not (isinstance(metric, dict) and all(isinstance(metric.get(t), str) for t in tasks)):
        raise AglclError(f"{results_file}: 'metric' must map every task of 'tasks' to a scorer name")
    stages = rundir.read_predictions(run_dir)
    expected = list(range(len(tasks) + 1))
    if sorted(stages) != expected:
        raise AglclError(f"{run_dir / rundir.PREDICTIONS} holds stages {sorted(stages)}; expected {expected}")
    schedule = _schedule(results_file, results.get("evaluation"))
    rows = []
    for stage in expected:
        row = []
        scored = range(len(tasks)) if stage == 0 else schedule.tasks_after(stage, len(tasks))
        for index, task in enumerate(tasks):
            if index not in scored:  # left out by the run's evaluation.tasks / evaluation.every
                row.append(None)
                continue
            records = stages[stage].get(task)
            if not records:
                raise AglclError(f"no predictions for task '{task}' at stage {stage} in {run_dir}")
            score = get_scorer(metric[task])
            for i, r in enumerate(records):
                if not (isinstance(r, dict) and isinstance(r.get("prediction"), str)
                        and isinstance(r.get("reference"), str)):
                    where = next((run_dir / rundir.PREDICTIONS).glob(f"after_{stage}_*/{task}.jsonl"),
                                 run_dir / rundir.PREDICTIONS)
                    raise AglclError(f"{where}: record {i + 1} needs string fields 'prediction' and "
                                     "'reference'; the file is corrupt")
            row.append(sum(score(r["prediction"], r["reference"]) for r in records) / len(records))
        rows.append(row)
    return tasks, rows[1:], rows[0]


def _schedule(results_file: Path, node):
    """The run's ``evaluation`` setting from results.json (runs made before it existed scored every cell)."""
    from aglcl.engine.validate import EvaluationConfig

    if node is None:
        return EvaluationConfig()
    try:
        schedule = EvaluationConfig(**node)
        schedule.check("evaluation")
        if schedule.tasks not in ("all", "seen", "past") or not isinstance(schedule.every, int):
            raise TypeError(node)
    except (TypeError, AglclError):
        raise AglclError(f"{results_file}: 'evaluation' must be {{\"tasks\": all|seen|past, \"every\": k >= 1}}, "
                         f"got {node!r}; the file is corrupt") from None
    return schedule


def run_eval(cfg: DictConfig, out_dir: str | Path | None = None) -> dict:
    """Print the metrics table and write ``metrics.json`` (and ``sweep.csv``) into ``out_dir``."""
    from rich.console import Console

    from aglcl.report import tables

    valid = (*SOURCES, *MATRIX_OPTIONS, *SWEEP_OPTIONS, "paths", "hydra")
    for key in cfg:
        if key not in valid:
            raise AglclError(f"'{key}' is not a config key of aglcl eval, so nothing would read it; valid keys: "
                             f"{', '.join(repr(k) for k in valid[:-2])}")
    chosen = [key for key in SOURCES if cfg.get(key)]
    if len(chosen) != 1:
        raise AglclError(f"give exactly one of {', '.join(k + '=...' for k in SOURCES)} (got {len(chosen)})")
    if chosen[0] != "sweep_dir" and cfg.get("baseline"):
        raise AglclError(f"baseline= applies to sweep_dir= only (rows of a sweep, compared seed by seed); got "
                         f"{chosen[0]}=")
    if chosen[0] != "matrix" and (cfg.get("tasks") is not None or str(cfg.get("scale", "auto")) != "auto"):
        raise AglclError(f"tasks= and scale= apply to matrix= only; {chosen[0]}= takes its task names and "
                         "scores from the run's own files")
    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        out_dir = HydraConfig.get().runtime.output_dir
    out_dir = Path(out_dir)
    console = Console() if Console().is_terminal else Console(width=400)  # logs and CI: no truncated tables
    key, value = chosen[0], Path(cfg[chosen[0]])
    if key == "sweep_dir":
        from aglcl.report.plots import plot_stability_plasticity, plot_sweep_metrics
        from aglcl.report.sweep import (
            METRICS,
            TIMINGS,
            aggregate_sweep,
            compare,
            sweep_status,
            write_sweep_csv,
        )

        rows, jobs = aggregate_sweep(value), sweep_status(value)
        common = set.intersection(*(set(r["overrides"].split()) for r in rows)) if len(rows) > 1 else set()
        for r in rows:  # label rows by what differs between them
            r["overrides"] = " ".join(o for o in r["overrides"].split() if o not in common) or "(base)"
        diffs = compare(rows, cfg.baseline) if cfg.get("baseline") else None  # an unknown baseline: refused here
        keys = [k for k in (*METRICS, *TIMINGS) if any(k in r for r in rows)]
        tables.print_whole(console, tables.sweep_table(rows, keys, title=f"Sweep {value}", seeds=jobs["seeds"]))
        if diffs is not None:
            shown = [k for k in METRICS if any((d.get(k) or {}).get("mean") is not None for d in diffs.values())]
            tables.print_whole(console, tables.compare_table(diffs, shown, cfg.baseline))
        for line in tables.sweep_status_lines(jobs):
            console.print(line, markup=False)
        write_sweep_csv(rows, out_dir / "sweep.csv", diffs)
        plot_sweep_metrics(rows, METRICS, out_dir / "sweep_metrics.png")
        plot_stability_plasticity(rows, out_dir / "stability_plasticity.png")
        out = {"sweep_dir": str(value), "jobs": jobs, "rows": rows, "baseline": cfg.get("baseline"), "paired": diffs}
        rundir.write_json(out_dir / "metrics.json", out)
        console.print(f"wrote {out_dir / 'sweep.csv'}, sweep_metrics.png, stability_plasticity.png")
        return out
    if key == "run_dir":
        if not value.is_dir():
            raise AglclError(f"run_dir={value} is not a directory")
        tasks, R, b = matrix_from_run(value)
        diagonal_only = json.loads((value / rundir.RESULTS).read_text(encoding="utf-8")).get("diagonal_only") is True
    else:
        from aglcl.report.matrix import read_matrix

        matrix = read_matrix(value, tasks=cfg.get("tasks"), scale=cfg.get("scale", "auto"))
        tasks, R, b = matrix
        console.print(matrix.scale_note)
        diagonal_only = False
    metrics, unavailable = available(R, b, diagonal_only=diagonal_only)
    console.print(tables.matrix_table(tasks, R, b))
    console.print(tables.metrics_table(metrics))
    if diagonal_only:
        console.print("a single-task reference (method=single): only plasticity, R's diagonal, is meaningful.")
    for key, why in unavailable.items():
        console.print(f"{key} unavailable: {why}", markup=False)
    rundir.write_json(out_dir / "metrics.json", metrics)
    if key == "run_dir":
        from aglcl.report.importance import importance_report

        report = importance_report(value, out_dir)
        if report is not None:
            rundir.write_json(out_dir / "importance.json", report)
    return metrics
