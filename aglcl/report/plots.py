"""Heatmap of the accuracy matrix, written as a PNG with matplotlib's Agg canvas."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_heatmap(tasks, R, path, title: str | None = None) -> Path:
    """Annotated heatmap: rows "after <task>", columns tasks; missing (None/NaN) cells stay blank.

    Uses ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot), so it never changes the
    global backend and leaks no figures across multirun jobs.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    M = np.array([[np.nan if v is None else float(v) for v in row] for row in R], dtype=float)
    known = M[~np.isnan(M)]
    vmax = 1.0 if known.size == 0 or known.max() <= 1.0 else float(known.max())
    vmin = min(0.0, float(known.min())) if known.size else 0.0

    T = len(tasks)
    size = max(4.0, 1.0 + 0.9 * T)
    fig = Figure(figsize=(size + 1.5, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(M), cmap="viridis", vmin=vmin, vmax=vmax)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(T), [str(t) for t in tasks], rotation=45, ha="right")
    ax.set_yticks(range(M.shape[0]), [f"after {t}" for t in tasks[: M.shape[0]]])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("training stage")
    middle = (vmin + vmax) / 2
    for (t, i), v in np.ndenumerate(M):
        if not np.isnan(v):
            ax.text(
                i,
                t,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=9,
                color="black" if v > middle else "white",
            )
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Render ``fig`` as PNG and write it atomically (a crash never leaves half a picture)."""
    import io

    from aglcl.rundir import atomic_write

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write(Path(path), buffer.getvalue())
    return Path(path)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_sweep_metrics(rows, keys, path) -> Path:
    """``sweep_metrics.png``: one panel per metric, each sweep row's mean with its 95% t-CI whisker (a dot
    alone where n = 1 or the metric is unavailable)."""
    keys = [k for k in keys if any((r.get(k) or {}).get("mean") is not None for r in rows)]
    fig = _figure(3.2 * max(len(keys), 1), 1.2 + 0.35 * len(rows))
    labels = [str(r["overrides"]) for r in rows]
    for j, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), j + 1)
        for i, row in enumerate(rows):
            ci = row.get(key) or {}
            if ci.get("mean") is None:
                continue
            if ci.get("lo") is not None:
                ax.errorbar(ci["mean"], i, xerr=[[ci["mean"] - ci["lo"]], [ci["hi"] - ci["mean"]]], fmt="o",
                            capsize=3, color="C0")
            else:
                ax.plot(ci["mean"], i, "o", color="C0")
        ax.set_yticks(range(len(rows)), labels if j == 0 else [""] * len(rows))
        ax.invert_yaxis()
        ax.set_title(key)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_stability_plasticity(rows, path, method_of=None) -> Path:
    """``stability_plasticity.png``: BWT against plasticity, one point per run, one colour per method
    (``method_of(row)``; default: the row's ``method=`` override, else its overrides)."""
    def default(row):
        found = [o.split("=", 1)[1] for o in str(row["overrides"]).split() if o.lstrip("+").startswith("method=")]
        return found[0] if found else str(row["overrides"])

    method_of = method_of or default
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    colours = {}
    for row in rows:
        name = method_of(row)
        colour = colours.setdefault(name, f"C{len(colours) % 10}")
        points = [(r["metrics"].get("plasticity"), r["metrics"].get("bwt")) for r in row.get("runs", [])]
        points = [(p, b) for p, b in points if p is not None and b is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, color=colour, label=name if name not in ax.get_legend_handles_labels()[1] else None,
                       alpha=0.8)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("plasticity (mean of R's diagonal)")
    ax.set_ylabel("BWT")
    if colours:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)
