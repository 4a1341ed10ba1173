"""Fault injection: kill -9 a run at many points, resume it, and get exactly the unbroken run's results.

The killed runs are child processes (integration); the unbroken reference and every resume run in-process.

Each killed run is ``aglcl train`` in a forked child (conftest.run_cli) with one function wrapped so that its n-th matching call
sends SIGKILL to the process (no cleanup, no atexit, no flush): mid-task, during evaluation, during
attribution, between writing a temp file and renaming it (importance map, checkpoint, state.json).
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
from conftest import (
    assert_resumes_like_unbroken,
    make_fixture_conf,
    refused,
    run_cli,
    tiny_overrides,
    train,
)


def plant(module: str, attr: str, nth, match: str, sig: str = "SIGKILL") -> None:
    """Wrap ``module.attr`` so that its ``nth`` call whose last positional argument ends with ``match``
    (``*``: any call) sends ``sig`` to this process: no cleanup, no atexit, no flush under SIGKILL."""
    import functools
    import importlib

    signum = getattr(signal, sig)
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original, calls = getattr(owner, name), [0]

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        if match == "*" or str(args[-1]).endswith(match):
            calls[0] += 1
            if calls[0] == int(nth):
                os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)

# Two tasks x 4 steps, a mid-task checkpoint every 2 steps, AGFT (cheap estimator: maps get written) plus
# replay (method state gets written).
ARGS = ["trainer.max_steps=4", "checkpoint.every_steps=2", "method=agft_replay", "attribution=grad_x_weight",
        "attribution.estimator.num_samples=4", "attribution.estimator.correct_only=false", "trainer.lr=5e-3",
        "method.methods.replay.fraction=0.2"]

# (id, module, attribute, n-th matching call that dies, match on the last positional argument)
FAULTS = [
    ("initial-evaluation", "aglcl.engine.runner", "evaluate_all", 1, "*"),  # before b is known
    ("mid-task-1", "aglcl.engine.loop", "lm_forward", 3, "*"),            # task 1, step 3 (after the step-2 ckpt)
    ("mid-task-2", "aglcl.engine.loop", "lm_forward", 6, "*"),            # task 2, step 2, before its checkpoint
    ("evaluation", "aglcl.engine.runner", "evaluate_all", 3, "*"),        # scoring after the last task
    ("attribution", "aglcl.attribution.pipeline", "Attribution.after_task", 1, "*"),
    ("map-write", "os", "replace", 1, "combined.safetensors"),            # temp file written, not yet renamed
    ("checkpoint-write", "os", "replace", 3, "model.safetensors"),        # the task-1 checkpoint's weights
    ("state-write", "os", "replace", 3, "state.json"),                    # the state after the first step ckpt
    ("results-write", "os", "replace", 1, "results.json"),                # the final results, before "done"
]


@pytest.fixture(scope="module")
def conf(tmp_path_factory):
    return make_fixture_conf(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def unbroken(conf, tmp_path_factory):
    return train(conf, tmp_path_factory.mktemp("unbroken") / "run", *ARGS)


def _killed(conf, run, cwd, module, attr, nth, match, sig="SIGKILL"):
    """``aglcl train`` (forked) with the fault planted; returns the completed process."""
    return run_cli("train", *tiny_overrides(conf, run), *ARGS, cwd=cwd,
                   before=lambda: plant(module, attr, nth, match, sig))


@pytest.mark.integration
@pytest.mark.parametrize(("module", "attr", "nth", "match"), [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_kill_then_resume_equals_the_unbroken_run(conf, tmp_path, unbroken, module, attr, nth, match):
    run = tmp_path / "run"
    proc = _killed(conf, run, tmp_path, module, attr, nth, match)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (run / "results.json").exists()
    train(conf, run, *ARGS, "resume=true")
    assert_resumes_like_unbroken(run, unbroken)
    assert not list(run.rglob("*.tmp"))  # the killed write's temp file is cleaned up on resume
    state = json.loads((run / "state.json").read_text())
    assert state["done"] and sorted(p.name for p in (run / "checkpoint").iterdir()) == ["task_1"]


@pytest.mark.integration
@pytest.mark.parametrize(("attr", "nth"), [("loop.lm_forward", 6), ("runner.evaluate_all", 1)],
                         ids=["mid-task-2", "initial-evaluation"])
def test_ctrl_c_prints_one_line_and_resumes_exactly(conf, tmp_path, unbroken, attr, nth):
    """SIGINT: exit 130, one line naming the checkpoint and resume=true, no traceback, the lock released;
    the resumed run equals the unbroken one."""
    run = tmp_path / "run"
    module, _, name = f"aglcl.engine.{attr}".rpartition(".")
    proc = _killed(conf, run, tmp_path, module, name, nth, "*", sig="SIGINT")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "resume=true" in lines[-1] and str(run) in lines[-1]
    assert not [line for line in lines if "error" in line.lower()], proc.stderr
    assert not (run / ".aglcl.lock").exists()
    train(conf, run, *ARGS, "resume=true")
    assert_resumes_like_unbroken(run, unbroken)


@pytest.fixture(scope="module")
def stopped(conf, tmp_path_factory):
    """A run stopped after its first task (checkpoint/task_1 holds weights, method state and the map)."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    train(conf, run, *ARGS, "stop_after=1")
    return run


def _copy(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    return run


def test_resume_with_a_changed_config_is_refused_unless_forced(conf, tmp_path, stopped):
    run = _copy(stopped, tmp_path)
    refused(lambda: train(conf, run, *ARGS, "resume=true", "trainer.lr=1e-3", "method.methods.agft.lam=0.5"),
            "trainer.lr", "method.methods.agft.lam", "resume=force")
    train(conf, run, *ARGS, "resume=force", "trainer.lr=1e-3")
    assert json.loads((run / "state.json").read_text())["done"]


@pytest.mark.parametrize("artifact", ["model.safetensors", "method.safetensors", "importance.safetensors",
                                      "state.json"])
def test_a_truncated_checkpoint_is_refused_in_one_line(conf, tmp_path, stopped, artifact):
    run = _copy(stopped, tmp_path)
    target = run / "state.json" if artifact == "state.json" else run / "checkpoint" / "task_1" / artifact
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    refused(lambda: train(conf, run, *ARGS, "resume=true"), target.name)


def test_a_checkpoint_of_another_model_is_refused(conf, tmp_path, stopped):
    run = _copy(stopped, tmp_path)
    refused(lambda: train(conf, run, *ARGS, "resume=force", "model.hidden_size=48"), "model.safetensors")


def test_machine_paths_do_not_count_as_a_config_change():
    """A run resumed on another machine, or with its data moved, keeps its identity: ``${paths.*}`` values
    are stored as placeholders, while a real change is still named."""
    from hydra import compose, initialize_config_dir

    from aglcl.engine.checkpoint import config_diff
    from aglcl.engine.checkpoint import plain_config as _plain_config
    from aglcl.paths import conf_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir())):
        a = compose("train", overrides=["sequence=trace", "paths.data_root=/data/a", "paths.cache_dir=/c/a"])
        b = compose("train", overrides=["sequence=trace", "paths.data_root=/mnt/b", "paths.cache_dir=/c/b"])
        c = compose("train", overrides=["sequence=trace", "paths.data_root=/data/a", "trainer.lr=1e-3"])
    plain = _plain_config(a)
    assert "<paths.data_root>/TRACE" in json.dumps(plain) and "/data/a" not in json.dumps(plain)
    assert config_diff(plain, _plain_config(b)) == []
    assert [d.split(" ")[0] for d in config_diff(plain, _plain_config(c))] == ["trainer.lr"]
