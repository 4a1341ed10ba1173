"""Shared fixtures: offline mode, a tiny task sequence written as files, and a CLI runner."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

# Two toy tasks with disjoint label sets, so a tiny model can learn and forget them.
TASKS = {
    "parity": [(f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd") for n in range(40)],
    "sign": [(f"Is {n - 20} negative or positive?", "negative" if n < 20 else "positive") for n in range(40)],
}

# A third task, in the fixture's task list but not in its default order (sequence.order=[parity,sign,size]).
EXTRA = {"size": [(f"Is {n} small or large?", "small" if n < 20 else "large") for n in range(40)]}


def write_task_dir(root: Path, name: str, rows) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    records = [{"prompt": p, "answer": a} for p, a in rows]
    random.Random(0).shuffle(records)  # every split sees both labels
    splits = {"train": records[:24], "eval": records[24:32], "test": records[32:]}
    for split, recs in splits.items():
        (d / f"{split}.json").write_text(json.dumps(recs))
    return d


def make_fixture_conf(root: Path) -> Path:
    """A config dir for ``hydra.searchpath`` with ``sequence=fixture`` over two local TRACE-style tasks."""
    conf = root / "conf"
    (conf / "sequence").mkdir(parents=True)
    tasks = {name: write_task_dir(root / "data", name, rows) for name, rows in {**TASKS, **EXTRA}.items()}
    lines = ["# aglcl train sequence=fixture", "name: fixture", f"order: [{', '.join(TASKS)}]", "tasks:"]
    for name, path in tasks.items():
        lines += [f"  {name}:", f"    source: {{_target_: aglcl.data.sources.LocalDir, path: {path}}}",
                  "    template: '{prompt} Answer:'",
                  "    answer_prefix: ' '", "    metric: accuracy",
                  "    scoring: {_target_: aglcl.engine.scoring.LabelLikelihood, labels: null}",
                  "    eval_size: 8"]
    (conf / "sequence" / "fixture.yaml").write_text("\n".join(lines) + "\n")
    return conf


@pytest.fixture
def fixture_conf(tmp_path) -> Path:
    return make_fixture_conf(tmp_path)


def tiny_overrides(conf: Path, run_dir: Path) -> list[str]:
    return ["model=tiny", f"hydra.searchpath=[file://{conf}]", "sequence=fixture", f"hydra.run.dir={run_dir}",
            "trainer.max_steps=2", "trainer.batch_size=4", "trainer.precision=no", "trainer.log_every=1"]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m aglcl ARGS`` in a subprocess; returns the completed process (text mode)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "AGLCL_OUTPUT_DIR": str((cwd or REPO) / "outputs")}
    return subprocess.run([sys.executable, "-m", "aglcl", *args], cwd=cwd or REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)
