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


def sweep_table(rows, metric_keys, title: str = "Sweep") -> Table:
    """One row per override group: ``overrides``, ``n``, then ``mean ± std`` per metric key."""
    table = Table(title=title)
    table.add_column("overrides", style="bold", no_wrap=True)
    table.add_column("n", justify="right")
    for key in metric_keys:
        table.add_column(str(key), justify="right", no_wrap=True)
    for row in rows:
        cells = []
        for key in metric_keys:
            mean, std = row.get(key) or (None, None)
            digits = 0 if key in ("wall_s", "peak_mem_mb") else 3  # seconds and MiB need no decimals
            cells.append("n/a" if mean is None else f"{_fmt(mean, digits)} ± {_fmt(std, digits)}")
        table.add_row(str(row.get("overrides", "")), str(row.get("n", "")), *cells)
    return table
