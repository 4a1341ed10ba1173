"""What the importance maps of a run say: per-layer magnitude, and how much tasks' top sets overlap.

    aglcl eval run_dir=outputs/train/runs/<stamp>      # prints these tables when the run has maps

The overlap of the top-p% most important weights of two tasks is the paper's motivating observation:
a large overlap means protecting old tasks also freezes what the new task needs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_LAYER = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def task_maps(run_dir: Path) -> list[tuple[str, dict, dict]]:
    """``[(task, maps, metadata)]`` for ``importance/task_<k>_<name>.safetensors``, in task order."""
    from aglcl.attribution.store import load_map

    pattern = re.compile(r"task_(\d+)_.+\.safetensors")
    files = sorted((f for f in (Path(run_dir) / "importance").glob("task_*.safetensors")
                    if pattern.fullmatch(f.name)), key=lambda f: int(pattern.fullmatch(f.name).group(1)))
    out = []
    for f in files:
        maps, meta = load_map(f)
        out.append((meta.get("task") or f.stem, maps, meta))
    return out


def layer_means(meta: dict) -> dict[int, float]:
    """Mean raw importance per Transformer block, from the per-tensor means stored with each map."""
    raw = json.loads(meta.get("raw_mean", "{}"))
    sums: dict[int, list[float]] = {}
    for name, value in raw.items():
        m = _LAYER.search(name)
        if m:
            sums.setdefault(int(m.group(1)), []).append(value)
    return {layer: sum(v) / len(v) for layer, v in sorted(sums.items())}


def importance_report(run_dir: Path, out_dir: Path, p: float = 0.05) -> dict | None:
    """Tables on the console plus ``importance_by_layer.png`` in ``out_dir``; None if the run has no maps."""
    from rich.console import Console
    from rich.table import Table

    from aglcl.attribution.store import top_overlap

    maps = task_maps(run_dir)
    if not maps:
        return None
    console = Console()
    names = [t for t, _, _ in maps]
    per_layer = {t: layer_means(meta) for t, _, meta in maps}
    layers = sorted({layer for means in per_layer.values() for layer in means})
    table = Table(title="Mean raw importance per layer (per task)")
    table.add_column("layer")
    for t in names:
        table.add_column(t, justify="right")
    for layer in layers:
        table.add_row(str(layer), *(f"{per_layer[t].get(layer, float('nan')):.3g}" for t in names))
    console.print(table)
    overlap = [[top_overlap(a, b, p) for _, b, _ in maps] for _, a, _ in maps]
    table = Table(title=f"Overlap of the top {p:.0%} most important weights")
    table.add_column("task")
    for t in names:
        table.add_column(t, justify="right")
    for t, row in zip(names, overlap):
        table.add_row(t, *(f"{v:.3f}" for v in row))
    console.print(table)
    plot = out_dir / "importance_by_layer.png"
    _plot(per_layer, plot)
    return {"tasks": names, "layer_means": per_layer, "top_p": p, "overlap": overlap, "plot": str(plot)}


def _plot(per_layer: dict[str, dict[int, float]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for task, means in per_layer.items():
        ax.plot(list(means), list(means.values()), marker="o", label=task)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean raw importance")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from aglcl.report.plots import save_figure

    save_figure(fig, path)
