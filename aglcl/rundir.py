"""The run-dir contract (docs/design.md, "Run-dir contract"): fixed file names, atomic writes.

    <run>/results.json  R.csv  R_heatmap.png  state.json
    <run>/predictions/after_<t>_<task>/<task>.jsonl     (t = 0 is the initial model)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path

from aglcl.errors import AglclError

RESULTS = "results.json"
STATE = "state.json"
R_CSV = "R.csv"
HEATMAP = "R_heatmap.png"
PREDICTIONS = "predictions"
INITIAL = "initial"
_UMASK: list[int] = []


def _new_file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` would give: an existing file's own, else 0o666 less the umask.

    (``mkstemp`` makes 0o600 files, which other users of a shared results dir could not read.)
    """
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        pass
    if not _UMASK:
        _UMASK.append(os.umask(0o022))
        os.umask(_UMASK[0])
    return 0o666 & ~_UMASK[0]


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temp file in the same dir, fsync, then rename: readers see old or new, never half.

    On any failure (a full disk, a read-only dir) the temp file is removed, an existing ``path`` is left as
    it was, and an OSError without a file name gets ``path`` as its ``filename`` (for the one-line message).
    """
    path = Path(path)
    prefix = f".{path.name}."
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
        with contextlib.suppress(OSError):
            os.fchmod(fd, _new_file_mode(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and (
            exc.filename is None or str(exc.filename).startswith(str(path.parent / prefix))
        ):
            exc.filename, exc.filename2 = str(path), None  # name the file meant, not the temp file
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def stage_dir(run_dir: Path, stage: int, name: str) -> Path:
    """``predictions/after_<stage>_<name>``; stage 0 is the initial model."""
    return Path(run_dir) / PREDICTIONS / f"after_{stage}_{name}"


def write_predictions(run_dir: Path, stage: int, stage_name: str, task: str, records: list[dict]) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write(stage_dir(run_dir, stage, stage_name) / f"{task}.jsonl", lines)


def _read_jsonl(file: Path) -> list:
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AglclError(f"{file}: not UTF-8 text (byte {e.start}: {e.reason}); the file is corrupt") from None
    records = []
    # split at "\n" only: the records may hold U+2028, U+0085, ... where str.splitlines() would cut
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError) as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
            raise AglclError(f"{file}:{lineno}: invalid JSON line ({reason}); the file is corrupt or "
                             "truncated") from None
    return records


def read_predictions(run_dir: Path) -> dict[int, dict[str, list[dict]]]:
    """``{stage: {task: records}}`` from ``predictions/after_<stage>_<name>/<task>.jsonl``.

    A directory not named ``after_<stage>_<name>``, two directories for one stage, or a file that is not
    JSON Lines is an :class:`AglclError` naming it.
    """
    out: dict[int, dict[str, list[dict]]] = {}
    seen: dict[int, Path] = {}
    root = Path(run_dir) / PREDICTIONS
    for d in sorted(root.glob("after_*")):
        match = re.fullmatch(r"after_(\d+)_.+", d.name)
        if not match or not d.is_dir():
            raise AglclError(f"{d}: unexpected entry in {root}; expected directories after_<stage>_<task>")
        stage = int(match.group(1))
        if stage in seen:
            raise AglclError(f"{root} holds two directories for stage {stage}: {seen[stage].name} and {d.name}")
        seen[stage] = d
        out[stage] = {f.stem: _read_jsonl(f) for f in sorted(d.glob("*.jsonl"))}
    return out
