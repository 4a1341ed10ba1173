"""Who may write a run dir: one run at a time, and never over another run by accident.

    aglcl train hydra.run.dir=outputs/r                   # refused if outputs/r holds a run already
    aglcl train hydra.run.dir=outputs/r resume=true       # continue it
    aglcl train hydra.run.dir=outputs/r overwrite=true    # start it afresh (the old contents are deleted)

* :func:`classify` names what a directory holds (nothing, an unfinished or finished run, something else).
* :func:`check_run_dir` applies the policy above, before anything is written.
* :class:`RunLock` is an exclusive ``flock`` on ``<run>/.aglcl.lock`` (pid and host inside, for the message),
  held for the whole run. A lock whose process died is released by the kernel, so a stale lock file is
  simply taken over. On file systems without ``flock`` the pid is checked instead (same host only).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path

from aglcl.errors import AglclError

LOCK = ".aglcl.lock"
_HYDRA_ONLY = (".hydra", LOCK)  # what Hydra (and we) put in a run dir before the run writes anything


def classify(run_dir: Path) -> str:
    """``absent``, ``file``, ``empty`` (or only Hydra's ``.hydra/``, logs and empty dirs), ``unfinished``, ``finished``
    or ``foreign`` (files that are not an aglcl run's)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return "absent"
    if not run_dir.is_dir():
        return "file"
    entries = [p for p in run_dir.iterdir() if p.name not in _HYDRA_ONLY and p.suffix != ".log"
               and not (p.is_dir() and not any(p.iterdir()))]  # empty dirs hold nothing of a run
    if not entries:
        return "empty"
    if (run_dir / "results.json").is_file():
        return "finished"
    state = run_dir / "state.json"
    if state.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if json.loads(state.read_text()).get("done") is True:
                return "finished"
        return "unfinished"
    if (run_dir / "config.json").is_file():
        return "unfinished"  # killed before its first resume point: overwrite it
    return "foreign"


def check_run_dir(run_dir: Path, resume, overwrite: bool, key: str = "hydra.run.dir") -> str:
    """Refuse a run dir this run may not write (one line, naming ``key`` and the options); returns its class."""
    kind = classify(run_dir)
    if kind == "file":
        raise AglclError(f"{key}={run_dir} is a file, not a directory; choose another output directory")
    holder = RunLock.holder(run_dir) if kind != "absent" else None
    if holder is not None:
        raise AglclError(f"{key}={run_dir} is in use by another aglcl run ({holder}); wait for it to finish, "
                         f"or choose another {key}")
    if kind == "foreign":
        raise AglclError(f"{key}={run_dir} is not empty and holds no aglcl run; choose an empty or new directory")
    if resume or overwrite:
        return kind
    if kind == "unfinished":
        raise AglclError(f"{key}={run_dir} holds an unfinished run; continue it with resume=true, or start it "
                         "afresh with overwrite=true (deletes its contents)")
    if kind == "finished":
        raise AglclError(f"{key}={run_dir} holds a finished run; choose another {key}, or replace it with "
                         "overwrite=true (deletes its contents)")
    return kind


def clear(run_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Delete everything in ``run_dir`` except the names in ``keep`` (``overwrite=true``)."""
    for entry in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        if entry.name in keep or entry.name == LOCK:
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run dir, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    @staticmethod
    def _owner(text: str) -> dict:
        with contextlib.suppress(ValueError, TypeError):
            owner = json.loads(text)
            if isinstance(owner, dict):
                return owner
        return {}

    @staticmethod
    def _describe(owner: dict) -> str:
        return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, since {owner.get('since', '?')}"

    @classmethod
    def holder(cls, run_dir: Path) -> str | None:
        """Who holds the lock of ``run_dir`` now (a description), or None if nobody does. Writes nothing."""
        import fcntl

        path = Path(run_dir) / LOCK
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            owner = cls._owner(os.pread(fd, 4096, 0).decode(errors="replace"))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return cls._describe(owner)
            except OSError:  # no flock here: a live pid on this host holds it
                alive = owner.get("host") != socket.gethostname() or _alive(int(owner.get("pid", 0) or 0))
                return cls._describe(owner) if owner and alive else None
            return None
        finally:
            os.close(fd)

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._owner(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                raise AglclError(f"{self.path.parent} is locked ({self._describe(owner)})") from None
            except OSError as exc:  # no flock here (some network file systems): trust a live pid on this host
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                owner = self._owner(os.pread(fd, 4096, 0).decode(errors="replace"))
                if owner and (owner.get("host") != socket.gethostname() or _alive(int(owner.get("pid", 0)))):
                    os.close(fd)
                    raise AglclError(f"{self.path.parent} is locked ({self._describe(owner)}; if that run is "
                                     f"gone, delete {self.path})") from None
            try:  # the previous owner may have removed the file between our open and flock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd

    def release(self, remove: bool = True) -> None:
        if self.fd is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
