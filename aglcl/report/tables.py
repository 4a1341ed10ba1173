"""Rich tables for the accuracy matrix, the metrics of one run, and sweep aggregates."""

from __future__ import annotations

import math

from rich.table import Table


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}"
    return str(v)


def _cell(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else _fmt(v)


def matrix_table(tasks, R, b=None, title: str = "Accuracy matrix R") -> Table:
    """Rows are training stages ("after <task>"), columns are evaluated tasks; ``b`` adds an initial row."""
    table = Table(title=title)
    table.add_column("after", style="bold")
    for task in tasks:
        table.add_column(str(task), justify="right")
    if b is not None:
        table.add_row("initial", *map(_cell, b), style="dim")
    for task, row in zip(tasks, R, strict=True):
        table.add_row(str(task), *map(_cell, row))
    return table


def metrics_table(metrics: dict, title: str = "Continual-learning metrics") -> Table:
    """One row per metric; None is shown as "n/a"."""
    table = Table(title=title)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(str(key), _fmt(value))
    return table


def sweep_table(rows, metric_keys, title: str = "Sweep", seeds: int | None = None) -> Table:
    """One row per override group: ``overrides``, ``n``, then ``mean ± std`` per metric key.

    A row with ``"complete": False`` (fewer runs than the sweep's ``seeds``) shows ``n`` as ``2 of 3 !``.
    Column names are never cut: the overrides column wraps instead.
    """
    table = Table(title=title)
    table.add_column("overrides", style="bold", overflow="fold", min_width=12)
    table.add_column("n", justify="right", no_wrap=True)
    for key in metric_keys:
        table.add_column(str(key), justify="right", no_wrap=True, min_width=max(len(str(key)), 13))
    for row in rows:
        cells = []
        for key in metric_keys:
            mean, std = row.get(key) or (None, None)
            digits = 0 if key in ("wall_s", "peak_mem_mb") else 3  # seconds and MiB need no decimals
            cells.append("n/a" if mean is None else f"{_fmt(mean, digits)} ± {_fmt(std, digits)}")
        n = str(row.get("n", ""))
        if row.get("complete") is False and seeds:
            n = f"{n} of {seeds} !"
        table.add_row(str(row.get("overrides", "")), n, *cells)
    return table


def print_whole(console, table) -> None:
    """Print ``table`` without cutting a column: on a console narrower than the table's minimum width, print
    it at that width (the terminal wraps the lines) rather than let rich squeeze columns away."""
    from rich.measure import Measurement

    width = console.width
    console.width = max(width, Measurement.get(console, console.options.update_width(10**4), table).minimum)
    try:
        console.print(table)
    finally:
        console.width = width


def sweep_status_lines(jobs: dict) -> list[str]:
    """What a partial sweep lacks, for the console: failed and missing jobs, and rows short of seeds."""
    lines = []
    if jobs.get("expected") is not None:
        lines.append(f"jobs: {jobs['finished']} of {jobs['expected']} finished")
    for kind, hint in (("failed", "no results.json: it failed or was killed; resume it with resume=true "
                                  "hydra.run.dir=<its dir>"),
                       ("missing", "never started: the sweep stopped before it")):
        for job in jobs.get(kind) or []:
            lines.append(f"{kind} job {job['num']} ({job['overrides'] or 'overrides unknown'}): {hint}")
    if jobs.get("failed") or jobs.get("missing"):
        lines.append(f"PARTIAL SWEEP: rows marked '!' have fewer than the sweep's {jobs['seeds']} seeds; their "
                     "means are over the runs that finished")
    return lines
