"""The GPU check script stays runnable: its ``--smoke`` mode (tiny model, CPU) prints every row."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_python

pytestmark = pytest.mark.integration  # subprocesses: the CLI's exit codes, signals, torchrun


def test_gpu_check_smoke_prints_every_row(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = run_python(REPO / "scripts" / "gpu_check.py", "--smoke", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r["row"] for r in json.loads(out.read_text())["rows"]]
    assert rows == ["seqft", "agft update", "agft grad", "attribution", "seqft zero2", "agft zero2"]
    assert "agft zero2" in proc.stdout
