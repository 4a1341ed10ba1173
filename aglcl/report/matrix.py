"""Read and write the accuracy matrix: ``R.csv`` and ``results.json`` layouts (DESIGN.md section 5).

CSV: header ``after,<task 1>,...,<task T>``, then one row per training stage whose first cell names
the task just trained; empty cells are unknown (None). An optional row labelled ``initial`` (or
``b``, unless a task has that name) holds the initial model's scores.
JSON: ``{"tasks": [...], "R": [[...]], "b": [...]}``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from aglcl.engine.rundir import atomic_write
from aglcl.errors import AglclError, choices

_B_LABELS = ("initial", "b")
_EXTENSIONS = (".csv", ".json")


def _number(value, where: str) -> float | None:
    """A cell as float, None when empty/null/NaN; AglclError naming ``where`` otherwise (inf included)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    shown = repr(value) if isinstance(value, str | int | float) and len(repr(value)) <= 40 else "this value"
    if isinstance(value, bool):
        raise AglclError(f"{where}: {shown} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise AglclError(f"{where}: {shown} is not a number (or too large)") from None
    if math.isinf(x):
        raise AglclError(f"{where}: {shown} is infinite; a score must be a finite number (empty or NaN for "
                         "unknown)")
    return None if math.isnan(x) else x


def _check_tasks(path: Path, tasks: list[str]) -> None:
    seen = set()
    for t in tasks:
        if not t:
            raise AglclError(f"{path}: a task name in the header is empty")
        if t in seen:
            raise AglclError(f"{path}: task {t!r} appears twice; task names must be unique")
        seen.add(t)


def _read_csv(path: Path):
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            rows = [r for r in reader if any(c.strip() for c in r)]
        except csv.Error as e:
            raise AglclError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    if not rows:
        raise AglclError(f"{path}: empty file; expected header 'after,<task 1>,...,<task T>'")
    header, R, b = rows[0], [], None
    tasks = [c.strip() for c in header[1:]]
    for n, row in enumerate(rows[1:], start=2):
        label = row[0].strip()
        if len(row) != len(header):
            raise AglclError(f"{path}: row {n} ({label!r}) has {len(row)} cells, header has {len(header)}")
        cells = [
            _number(v, f"{path}: row {n} ({label!r}), column {t!r}")
            for v, t in zip(row[1:], tasks, strict=True)
        ]
        if label.lower() in _B_LABELS and label not in tasks:  # a task may itself be called "b"
            b = cells
        else:
            R.append(cells)
    return tasks, R, b


def _read_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AglclError(f"{path}: invalid JSON ({e})") from None
    except RecursionError:
        raise AglclError(f"{path}: invalid JSON (nested too deeply)") from None
    except UnicodeDecodeError:
        raise
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise AglclError(f"{path}: invalid JSON ({str(e).split(':')[0]})") from None
    if not isinstance(data, dict):
        raise AglclError(f"{path}: expected a JSON object with keys 'tasks', 'R' (and optional 'b')")
    for key in ("tasks", "R"):
        if not isinstance(data.get(key), list):
            raise AglclError(f"{path}: missing or non-list key {key!r}")
    tasks = [str(t) for t in data["tasks"]]
    R = []
    for n, row in enumerate(data["R"]):
        if not isinstance(row, list):
            raise AglclError(f"{path}: R[{n}] is not a list")
        if len(row) != len(tasks):
            raise AglclError(f"{path}: R[{n}] has {len(row)} cells, expected {len(tasks)} (one per task)")
        R.append(
            [
                _number(v, f"{path}: R[{n}][{i}] (task {t!r})")
                for i, (v, t) in enumerate(zip(row, tasks, strict=True))
            ]
        )
    b = data.get("b")
    if b is not None:
        if not isinstance(b, list) or len(b) != len(tasks):
            raise AglclError(f"{path}: 'b' must be a list with one score per task ({len(tasks)})")
        b = [
            _number(v, f"{path}: b[{i}] (task {t!r})") for i, (v, t) in enumerate(zip(b, tasks, strict=True))
        ]
    return tasks, R, b


def read_matrix(path) -> tuple[list[str], list[list[float | None]], list[float | None] | None]:
    """Read ``(tasks, R, b)`` from an R.csv-style CSV or a results.json-style JSON file."""
    path = Path(path)
    if not path.is_file():
        raise AglclError(f"matrix file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise AglclError(
            f"{path}: unknown matrix file extension {suffix!r}; choose one of {choices(_EXTENSIONS)}"
        )
    try:
        tasks, R, b = _read_csv(path) if suffix == ".csv" else _read_json(path)
    except UnicodeDecodeError as e:
        raise AglclError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    _check_tasks(path, tasks)
    T = len(tasks)
    if T < 2:
        raise AglclError(f"{path}: need at least 2 tasks, got T={T}")
    if len(R) != T:
        raise AglclError(f"{path}: matrix is not square: {len(R)} stage rows for {T} tasks")
    return tasks, R, b


def _fmt(v) -> str:
    return "" if v is None or math.isnan(float(v)) else f"{float(v):.4f}"


def write_matrix_csv(path, tasks, R, b=None) -> Path:
    """Write the R.csv layout (4-decimal floats, empty cells for None); ``b`` adds an ``initial`` row.

    Written atomically: a reader sees the old file or the new one, never half of it.
    """
    path = Path(path)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["after", *tasks])
    if b is not None:
        w.writerow(["initial", *map(_fmt, b)])
    for task, row in zip(tasks, R, strict=True):
        w.writerow([task, *map(_fmt, row)])
    atomic_write(path, buf.getvalue().encode("utf-8"))
    return path
