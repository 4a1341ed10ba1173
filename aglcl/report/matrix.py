"""Read and write the accuracy matrix: ``R.csv`` and ``results.json`` layouts (docs/design.md, "Run-dir contract").

CSV: header ``after,<task 1>,...,<task T>`` (the header's order is the training order), then one row
per training stage whose first cell names the task just trained, or its stage number 1..T; rows may
come in any order. Empty cells are unknown (None). An optional row labelled ``initial`` (or ``b``,
unless a task has that name) holds the initial model's scores ``b``.
A file without a header (its first row holds numbers, e.g. copied from a paper) needs the task names:
``read_matrix(path, tasks=["a", "b", "c"])``; its rows are then T rows of T numbers in stage order, or
carry a label first as above.
JSON: ``{"tasks": [...], "R": [[...]], "b": [...]}``, R's rows in stage order.

Scores are fractions (0-1) or percent (0-100, divided by 100): ``scale="auto"`` takes 0-1 when every
value is at most 1, else percent, and refuses a row or column that alone looks like 0-1 (mixed scales);
``scale=1`` or ``scale=100`` says it. The scale used is ``read_matrix(...).scale``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from aglcl.errors import AglclError, choices
from aglcl.rundir import atomic_write

_B_LABELS = ("initial", "b")
_EXTENSIONS = (".csv", ".json")
SCALES = ("auto", "1", "100")


class Matrix(tuple):
    """``(tasks, R, b)`` as read, unpacked and compared like that tuple; ``scale`` (1 or 100) is what the
    file's values were divided by, and ``scale_note`` says it in a line (``scale: 0-1``)."""

    def __new__(cls, tasks, R, b, scale: int):
        self = super().__new__(cls, (tasks, R, b))
        self.scale = scale
        return self

    @property
    def scale_note(self) -> str:
        return "scale: 0-1" if self.scale == 1 else "scale: 0-100 (percent), divided by 100"


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


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


class _Row(NamedTuple):
    """One row as read: ``n`` its row number, ``label`` its first cell, ``name`` how errors call it."""

    n: int | None
    label: str
    name: str
    cells: list
    wheres: list


def _is_stage(label: str) -> bool:
    return label.isascii() and label.isdigit()


def _scale_option(scale) -> int | None:
    """``scale=auto|1|100`` as None (auto), 1 or 100."""
    if isinstance(scale, int | float) and not isinstance(scale, bool) and scale in (1, 100):
        return int(scale)
    if isinstance(scale, str) and scale.strip().lower() in SCALES:
        return None if scale.strip().lower() == "auto" else int(scale)
    raise AglclError(f"scale={scale!r} is not valid; choose one of {choices(SCALES)} (auto: 0-1 if every "
                     "value is at most 1, else percent)")


def _tasks_option(tasks) -> list[str] | None:
    """``tasks=[a,b,c]`` (any sequence of names, for a file without a header) as a list of str, or None."""
    if tasks is None:
        return None
    if isinstance(tasks, str | bytes) or not isinstance(tasks, Sequence) or not all(
            isinstance(t, str | int) and not isinstance(t, bool) for t in tasks):
        raise AglclError(f"tasks={tasks!r} is not valid; give a list of task names in training order, like "
                         "tasks=[a,b,c]")
    names = [str(t).strip() for t in tasks]
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise AglclError(f"tasks={names} is not valid; give at least 2 distinct, non-empty task names, like "
                         "tasks=[a,b,c]")
    return names


def _check_tasks(path: Path, tasks: list[str]) -> None:
    seen = set()
    for t in tasks:
        if not t:
            raise AglclError(f"{path}: a task name in the header is empty")
        if t in seen:
            raise AglclError(f"{path}: task {t!r} appears twice; task names must be unique")
        seen.add(t)
    if len(tasks) < 2:
        raise AglclError(f"{path}: need at least 2 tasks, got T={len(tasks)}")


def _agree(path: Path, tasks: list[str], given: list[str] | None) -> None:
    if given is not None and set(given) != set(tasks):
        raise AglclError(f"{path}: tasks={given} does not match the file's tasks {tasks}; give the same "
                         "names (any order) or leave tasks= out")


def _place(path: Path, tasks: list[str], rows: list[_Row]) -> tuple[list[_Row], _Row | None]:
    """Order labelled rows by stage: ``(R rows, b row or None)``."""
    T = len(tasks)
    b_names = [x for x in _B_LABELS if x not in tasks]
    valid = (f"valid labels: a task name ({', '.join(map(repr, tasks))}: the task just trained), a stage "
             f"number 1..{T}")
    if b_names:
        valid += f", or {' / '.join(map(repr, b_names))} for the initial scores"
    b_rows, stage_rows = [], []
    for r in rows:
        (b_rows if r.label.lower() in _B_LABELS and r.label not in tasks else stage_rows).append(r)
    numbers = [int(r.label) - 1 if _is_stage(r.label) and 1 <= int(r.label) <= T else None
               for r in stage_rows]
    if all(r.label in tasks for r in stage_rows):
        index = [tasks.index(r.label) for r in stage_rows]
        if None not in numbers and numbers != index:
            raise AglclError(f"{path}: the row labels are both task names and stage numbers, and these "
                             "disagree; rename the tasks or label rows by their stage in header order")
    elif None not in numbers:
        index = numbers
    else:
        bad = next((r for r, k in zip(stage_rows, numbers, strict=True)
                    if k is None and r.label not in tasks), None)
        if bad is not None:
            raise AglclError(f"{path}: row {bad.n}: unknown label {bad.label!r}; {valid}")
        raise AglclError(f"{path}: the row labels mix task names and stage numbers; use one kind ({valid})")
    placed: dict[int, _Row] = {}
    for r, i in zip(stage_rows, index, strict=True):
        if i in placed:
            raise AglclError(f"{path}: row {r.n} (label {r.label!r}) repeats stage {i + 1} (task "
                             f"{tasks[i]!r}) of row {placed[i].n}; each stage needs exactly one row; {valid}")
        placed[i] = r
    if len(b_rows) > 1:
        raise AglclError(f"{path}: row {b_rows[1].n} (label {b_rows[1].label!r}) repeats the initial scores "
                         f"of row {b_rows[0].n}; give one such row")
    if len(placed) != T:
        missing = ", ".join(repr(t) for i, t in enumerate(tasks) if i not in placed)
        raise AglclError(f"{path}: matrix is not square: {len(placed)} stage rows for {T} tasks; no row for "
                         f"{missing}; {valid}")
    return [placed[i] for i in range(T)], (b_rows[0] if b_rows else None)


def _read_csv(path: Path, given: list[str] | None):
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            lines = [r for r in reader if any(c.strip() for c in r)]
        except csv.Error as e:
            raise AglclError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    if not lines:
        raise AglclError(f"{path}: empty file; expected header 'after,<task 1>,...,<task T>'")
    first = [c.strip() for c in lines[0]]
    headerless = (first[0].lower() != "after" and all(not c or _is_number(c) for c in first[1:])
                  and (any(map(_is_number, first)) or first[0].lower() in _B_LABELS))
    if headerless:
        if given is None:
            raise AglclError(f"{path}: the file has no header row (its first row holds numbers); name its "
                             "tasks in training order with tasks=[a,b,c]")
        tasks, body, T = given, list(enumerate(lines, start=1)), len(given)
        labelled = len(body[0][1]) == T + 1
        for n, row in body:
            if len(row) != len(body[0][1]) or len(row) not in (T, T + 1):
                raise AglclError(f"{path}: row {n} has {len(row)} cells; with tasks={tasks} every row needs "
                                 f"{T} cells, or {T + 1} with a row label first")
    else:
        tasks = first[1:]
        _check_tasks(path, tasks)
        _agree(path, tasks, given)
        body, labelled = list(enumerate(lines, start=1))[1:], True
        for n, row in body:
            if len(row) != len(first):
                raise AglclError(f"{path}: row {n} ({row[0].strip()!r}) has {len(row)} cells, header has "
                                 f"{len(first)}")
    rows = []
    for n, row in body:
        label = row[0].strip() if labelled else str(n)
        name = f"row {n} ({label!r})" if labelled else f"row {n}"
        wheres = [f"{path}: {name}, column {t!r}" for t in tasks]
        cells = [_number(v, w) for v, w in zip(row[1:] if labelled else row, wheres, strict=True)]
        rows.append(_Row(n, label, name, cells, wheres))
    odd = next((r for r in rows if labelled and headerless and _is_number(r.label)
                and not _is_stage(r.label)), None)
    if odd is not None:
        raise AglclError(f"{path}: row {odd.n} has {len(tasks) + 1} cells, so its first, {odd.label!r}, "
                         f"would be its label, but it is a score; check that tasks={tasks} names every "
                         "column")
    if not labelled:  # T rows of T numbers, in stage order
        if len(rows) != len(tasks):
            extra = ("; T+1 unlabelled rows are ambiguous: put a label first in every row (a task name or "
                     "stage number, 'initial' for the initial scores)" if len(rows) == len(tasks) + 1 else "")
            raise AglclError(f"{path}: matrix is not square: {len(rows)} rows for {len(tasks)} tasks{extra}")
        return tasks, rows, None
    R, b = _place(path, tasks, rows)
    return tasks, R, b


def _read_json(path: Path, given: list[str] | None):
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
    _check_tasks(path, tasks)
    _agree(path, tasks, given)
    R = []
    for n, row in enumerate(data["R"]):
        if not isinstance(row, list):
            raise AglclError(f"{path}: R[{n}] is not a list")
        if len(row) != len(tasks):
            raise AglclError(f"{path}: R[{n}] has {len(row)} cells, expected {len(tasks)} (one per task)")
        wheres = [f"{path}: R[{n}][{i}] (task {t!r})" for i, t in enumerate(tasks)]
        cells = [_number(v, w) for v, w in zip(row, wheres, strict=True)]
        R.append(_Row(n, str(n + 1), f"R[{n}]", cells, wheres))
    if len(R) != len(tasks):
        raise AglclError(f"{path}: matrix is not square: {len(R)} stage rows for {len(tasks)} tasks")
    b = data.get("b")
    if b is not None:
        if not isinstance(b, list) or len(b) != len(tasks):
            raise AglclError(f"{path}: 'b' must be a list with one score per task ({len(tasks)})")
        wheres = [f"{path}: b[{i}] (task {t!r})" for i, t in enumerate(tasks)]
        b = _Row(None, "b", "b", [_number(v, w) for v, w in zip(b, wheres, strict=True)], wheres)
    return tasks, R, b


def _scale(path: Path, tasks: list[str], rows: list, scale: int | None) -> int:
    """Check every value's range and pick the scale (1 or 100) of ``rows`` (R's, then b's)."""
    top = scale or 100
    for row in rows:
        for v, where in zip(row.cells, row.wheres, strict=True):
            if v is not None and v < 0:
                raise AglclError(f"{where}: {v!r} is negative; scores lie in 0-1 or 0-100 (percent)")
            if v is not None and v > top:
                hint = "; say scale=100 for percent, or scale=auto" if scale == 1 else ""
                raise AglclError(f"{where}: {v!r} is above {top}, outside scale={scale or 'auto'} "
                                 f"(0-{top}){hint}")
    if scale is not None:
        return scale
    big = next(((v, w) for row in rows for v, w in zip(row.cells, row.wheres, strict=True) if v is not None
                and v > 1), None)
    if big is None:
        return 1
    lines = [(row.name, row.cells) for row in rows]
    lines += [(f"column {t!r}", [row.cells[i] for row in rows]) for i, t in enumerate(tasks)]
    for name, cells in lines:
        nonzero = [v for v in cells if v]
        if nonzero and max(nonzero) <= 1:
            cell = big[1].removeprefix(f"{path}: ")
            raise AglclError(f"{path}: mixed scales: {name} holds only values of at most 1 (0-1?) while "
                             f"{cell} is {big[0]!r} (percent?); write every score on one scale, or say "
                             "scale=100 if they all are percent")
    return 100


def read_matrix(path, tasks=None, scale="auto") -> Matrix:
    """Read ``(tasks, R, b)`` from an R.csv-style CSV or a results.json-style JSON file (see the module doc).

    ``tasks``: the task names in training order, needed for a CSV without a header; with a header or
    JSON it must name the same tasks. ``scale``: ``"auto"`` (default), 1 or 100. R's rows come in stage
    order, values in 0-1; the returned :class:`Matrix` also carries ``.scale``. Anything it cannot read
    unambiguously raises a one-line :class:`AglclError` naming the file.
    """
    path = Path(path)
    given, divisor = _tasks_option(tasks), _scale_option(scale)
    if not path.is_file():
        raise AglclError(f"matrix file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise AglclError(
            f"{path}: unknown matrix file extension {suffix!r}; choose one of {choices(_EXTENSIONS)}"
        )
    try:
        names, R, b = _read_csv(path, given) if suffix == ".csv" else _read_json(path, given)
    except UnicodeDecodeError as e:
        raise AglclError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    used = _scale(path, names, R + ([b] if b else []), divisor)

    def scaled(row):
        return [v if v is None or used == 1 else v / used for v in row.cells]

    return Matrix(names, [scaled(r) for r in R], scaled(b) if b else None, used)


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
