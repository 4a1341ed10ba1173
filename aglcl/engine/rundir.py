"""The run-dir contract (DESIGN.md §5): fixed file names, atomic writes.

    <run>/results.json  R.csv  R_heatmap.png  state.json
    <run>/predictions/after_<t>_<task>/<task>.jsonl     (t = 0 is the initial model)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

RESULTS = "results.json"
STATE = "state.json"
R_CSV = "R.csv"
HEATMAP = "R_heatmap.png"
PREDICTIONS = "predictions"
INITIAL = "initial"


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temp file in the same dir, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def stage_dir(run_dir: Path, stage: int, name: str) -> Path:
    """``predictions/after_<stage>_<name>``; stage 0 is the initial model."""
    return Path(run_dir) / PREDICTIONS / f"after_{stage}_{name}"


def write_predictions(run_dir: Path, stage: int, stage_name: str, task: str, records: list[dict]) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(stage_dir(run_dir, stage, stage_name) / f"{task}.jsonl", lines)


def read_predictions(run_dir: Path) -> dict[int, dict[str, list[dict]]]:
    """``{stage: {task: records}}`` from ``predictions/after_<stage>_<name>/<task>.jsonl``."""
    out: dict[int, dict[str, list[dict]]] = {}
    root = Path(run_dir) / PREDICTIONS
    for d in sorted(root.glob("after_*")):
        stage = int(d.name.split("_")[1])
        out[stage] = {
            f.stem: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            for f in sorted(d.glob("*.jsonl"))
        }
    return out
