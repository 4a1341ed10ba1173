"""Shared fixtures: offline mode, a tiny task sequence written as files, and a CLI runner."""

from __future__ import annotations

import json
import math
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
                  "    scoring: {_target_: aglcl.data.scoring.LabelLikelihood, labels: null}",
                  "    eval_size: 8"]
    (conf / "sequence" / "fixture.yaml").write_text("\n".join(lines) + "\n")
    return conf


@pytest.fixture
def fixture_conf(tmp_path) -> Path:
    return make_fixture_conf(tmp_path)


def tiny_overrides(conf: Path, run_dir: Path) -> list[str]:
    return ["model=tiny", f"hydra.searchpath=[file://{conf}]", "sequence=fixture", f"hydra.run.dir={run_dir}",
            "trainer.max_steps=2", "trainer.batch_size=4", "trainer.precision=no", "trainer.log_every=1"]


_TIER = {"integration": False}


def pytest_runtest_setup(item):
    """Remember whether the test about to run (and its fixtures) is marked ``integration``."""
    _TIER["integration"] = item.get_closest_marker("integration") is not None


def require_integration(what: str) -> None:
    """Subprocesses belong to ``integration`` tests (``make test-fast`` skips them): refuse them elsewhere."""
    if not _TIER["integration"]:
        raise AssertionError(f"{what} in a test not marked integration: run it in-process (conftest.train) or "
                             "mark the test @pytest.mark.integration")


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m aglcl ARGS`` in a subprocess (integration tests only); returns the completed process."""
    require_integration(f"run_cli{args[:1]}")
    env = {**os.environ, "PYTHONPATH": str(REPO), "AGLCL_OUTPUT_DIR": str((cwd or REPO) / "outputs")}
    return subprocess.run([sys.executable, "-m", "aglcl", *args], cwd=cwd or REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="session")
def conf(tmp_path_factory) -> Path:
    """The fixture tasks' config dir, written once per test process (a file may override it)."""
    return make_fixture_conf(tmp_path_factory.mktemp("conf"))


def compose_train(conf: Path, run_dir: Path, *overrides: str):
    """The config ``aglcl train`` would run for ``tiny_overrides(conf, run_dir) + overrides``, composed
    in-process with Hydra's compose API (HydraConfig set as in a run, so ``${hydra:...}`` resolves)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from aglcl.paths import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*tiny_overrides(conf, run_dir), *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def train(conf: Path, run_dir: Path, *overrides: str) -> dict:
    """``aglcl train`` in this process: composes, runs, writes the report files; returns the results
    (``{"stopped_after": k, ...}`` after ``stop_after=k``). User errors raise ``AglclError``."""
    from aglcl.commands.train import train as run

    return run(compose_train(conf, run_dir, *overrides), run_dir)


def results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def assert_resumes_like_unbroken(resumed: Path | dict, unbroken: Path | dict) -> None:
    """A resumed run's R, b, metrics and per-task losses equal the unbroken run's (run dirs or results)."""
    a = results(resumed) if isinstance(resumed, Path) else resumed
    b = results(unbroken) if isinstance(unbroken, Path) else unbroken
    assert a["tasks"] == b["tasks"]
    assert a["R"] == b["R"] and a["b"] == b["b"], (a["R"], b["R"])
    assert a["metrics"] == b["metrics"]
    assert [a["train"][t]["loss"] for t in a["tasks"]] == [b["train"][t]["loss"] for t in b["tasks"]]


def stop_then_resume(conf: Path, root: Path, *overrides: str, stop: int = 1) -> tuple[dict, Path]:
    """Train ``overrides`` unbroken into ``root/whole``, and into ``root/split`` stopped after ``stop`` tasks
    (``stop_after``); returns the unbroken results and the stopped run dir. Check the stopped dir, then call
    :func:`resume_and_compare`."""
    whole = train(conf, root / "whole", *overrides)
    assert all(math.isfinite(whole["train"][t]["loss"]) for t in whole["tasks"])
    assert train(conf, root / "split", *overrides, f"stop_after={stop}")["stopped_after"] == stop
    assert json.loads((root / "split" / "state.json").read_text())["next_task"] == stop
    assert not (root / "split" / "results.json").exists()
    return whole, root / "split"


def resume_and_compare(conf: Path, split: Path, whole: dict, *overrides: str) -> None:
    """Resume the stopped run ``split`` and check it equals the unbroken one."""
    train(conf, split, *overrides, "resume=true")
    assert_resumes_like_unbroken(split, whole)


def refused(fn, *needles) -> str:
    """``fn()`` raises a one-line ``AglclError`` holding every needle (a file's name, a key); returns it."""
    from aglcl.errors import AglclError

    with pytest.raises(AglclError) as info:
        fn()
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and msg == msg.strip(), msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg
