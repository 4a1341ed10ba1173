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


def metrics_table(metrics: dict, title: str = "Continual-learning metrics", ci: dict | None = None,
                  confidence: float = 0.95) -> Table:
    """One row per metric; None is shown as "n/a". ``ci`` (``{metric: [lo, hi]}``) adds a CI column."""
    table = Table(title=title)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    if ci is not None:
        table.add_column(f"{confidence:.0%} CI (test examples)", justify="right")
    for key, value in metrics.items():
        cells = [_fmt(value)]
        if ci is not None:
            bounds = ci.get(key)
            cells.append(f"[{_fmt(bounds[0])}, {_fmt(bounds[1])}]" if bounds else "n/a")
        table.add_row(str(key), *cells)
    return table


def _interval(ci: dict | None, digits: int) -> str:
    if not ci or ci.get("mean") is None:
        return "n/a"
    if ci.get("lo") is None:
        return _fmt(ci["mean"], digits)
    return f"{_fmt(ci['mean'], digits)} [{_fmt(ci['lo'], digits)}, {_fmt(ci['hi'], digits)}]"


def sweep_table(rows, metric_keys, title: str = "Sweep", seeds: int | None = None) -> Table:
    """One row per override group: ``overrides``, ``n``, then ``mean [95% CI]`` per metric key (Student t
    over the row's runs; the mean alone when n = 1).

    A row with ``"complete": False`` (fewer runs than the sweep's ``seeds``) shows ``n`` as ``2 of 3 !``.
    Column names are never cut: the overrides column wraps instead.
    """
    body = []
    for row in rows:
        cells = [_interval(row.get(key), 0 if key in ("wall_s", "peak_mem_mb") else 3)  # s and MiB: no decimals
                 for key in metric_keys]
        n = str(row.get("n", ""))
        if row.get("complete") is False and seeds:
            n = f"{n} of {seeds} !"
        body.append((str(row.get("overrides", "")), n, *cells))
    return _whole_columns(Table(title=title, caption="mean [95% CI over runs, Student t]"), ["n", *metric_keys],
                          body)


def _whole_columns(table: Table, names: list[str], body: list[tuple]) -> Table:
    """``overrides`` (folded when long), then columns never cut: each as wide as its widest cell."""
    table.add_column("overrides", style="bold", overflow="fold", min_width=12)
    for j, name in enumerate(names, start=1):
        width = max([len(str(name)), *(len(r[j]) for r in body)])
        table.add_column(str(name), justify="right", no_wrap=True, min_width=width)
    for r in body:
        table.add_row(*r)
    return table


def compare_table(diffs: dict, metric_keys, baseline: str) -> Table:
    """Paired differences (row − baseline) per metric: ``mean [95% CI] p=<t-test>/<sign-flip>``, ``*`` where
    the t interval excludes 0; ``n`` is the number of pairs."""
    from aglcl.metrics.stats import excludes_zero

    body = []
    for name, by_metric in diffs.items():
        cells, n = [], 0
        for key in metric_keys:
            d = by_metric.get(key) or {}
            n = max(n, d.get("n") or 0)
            if d.get("mean") is None:
                cells.append("n/a")
                continue
            mark = " *" if excludes_zero(d.get("lo"), d.get("hi")) else ""
            p = f" p={_fmt(d.get('p_t'), 3)}/{_fmt(d.get('p_sign'), 3)}"
            cells.append(f"{_interval(d, 3)}{p}{mark}")
        body.append((str(name), str(n), *cells))
    table = Table(title=f"Paired difference against {baseline} (same seed / order)",
                  caption="mean [95% t CI] p = paired t-test / exact sign-flip; * : the CI excludes 0")
    return _whole_columns(table, ["n", *(f"Δ {key}" for key in metric_keys)], body)


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
