"""The GPU check script stays runnable: its ``--smoke`` mode (tiny model, CPU) prints every row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration  # subprocesses: the CLI's exit codes, signals, torchrun


def test_gpu_check_smoke_prints_every_row(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r["row"] for r in json.loads(out.read_text())["rows"]]
    assert rows == ["seqft", "agft update", "agft grad", "attribution", "seqft zero2", "agft zero2"]
    assert "agft zero2" in proc.stdout
