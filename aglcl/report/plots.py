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
