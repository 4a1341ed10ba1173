"""A finished run's report files and console tables: ``R.csv``, ``R_heatmap.png``, the R and metric tables.

    results = run_train(cfg, run_dir)
    write_run(results, run_dir)          # what `aglcl train` does after the run (rank 0 only)
"""

from __future__ import annotations

from pathlib import Path

from aglcl import dist, rundir
from aglcl.report.matrix import write_matrix_csv
from aglcl.report.plots import plot_heatmap
from aglcl.report.tables import matrix_table, metrics_table


def write_run(results: dict, run_dir: Path, console=None) -> None:
    """Write the report files of ``results`` (``run_train``'s) into ``run_dir`` and print its tables.
    Nothing for a run stopped early (``stop_after``) or on ranks > 0."""
    if "stopped_after" in results or not dist.is_main_process():
        return
    from rich.console import Console

    console = console or Console(stderr=True)
    names, R, b = results["tasks"], results["R"], results["b"]
    write_matrix_csv(Path(run_dir) / rundir.R_CSV, names, R)
    plot_heatmap(names, R, Path(run_dir) / rundir.HEATMAP,
                 title=f"R ({results.get('method')}, seed {results.get('seed')})")
    console.print(matrix_table(names, R, b))
    console.print(metrics_table(results["metrics"], ci=results.get("ci")))
    for key, why in (results.get("unavailable") or {}).items():
        console.print(f"{key} unavailable: {why}", markup=False)
    if results.get("diagonal_only"):
        console.print("a single-task reference: only R's diagonal (plasticity) is meaningful; the other "
                      "metrics are left empty.")
