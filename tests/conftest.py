"""Shared fixtures: offline mode, a tiny task sequence written as files, and a CLI runner."""

from __future__ import annotations

import functools
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
# One intra-op thread per test process: `make test` runs 2 xdist workers on 2 cores, and a forked child
# (run_cli) of a process whose OpenMP pool ran with more threads hangs at its first parallel region.
os.environ["OMP_NUM_THREADS"] = "1"

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


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300, fresh: bool = False,
            before=None) -> subprocess.CompletedProcess:
    """``python -m aglcl ARGS`` as a child process (integration tests only); returns the completed process.

    By default the child is a fork of this test process, which has torch, transformers and Hydra imported
    already (a fresh interpreter spends about 9 s importing them): the exit code, signals and stdout/stderr
    are the child's own, as in a subprocess. ``before()`` runs in the child first (e.g. to plant a fault).
    ``fresh=True`` starts a new interpreter instead (``before`` is then not allowed).
    """
    require_integration(f"run_cli{args[:1]}")
    cwd = cwd or REPO
    env = _child_env(cwd)
    if fresh:
        assert before is None, "before() needs a forked child"
        return subprocess.run([sys.executable, "-m", "aglcl", *args], cwd=cwd, env=env, text=True,
                              capture_output=True, timeout=timeout)
    return forked(["aglcl", *args], functools.partial(_cli, list(args), before), cwd, env, timeout)


def torchrun(*args: str, cwd: Path, nproc: int = 2, before=None, target=None, fresh: bool = False,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m aglcl train ARGS`` (integration tests only), gloo on CPU.

    By default this is torchrun's own elastic launcher (``torch.distributed.launcher.api.elastic_launch``,
    what ``torchrun`` calls: the same agent, rendezvous and rank environment) in a forked child, starting
    its ranks by fork (``start_method="fork"``), so no rank pays the imports. ``before()`` runs in every
    rank first; ``target()`` replaces the CLI as the ranks' program. ``fresh=True`` runs the ``torchrun``
    binary itself (``python -m torch.distributed.run``), each rank a new interpreter.
    """
    require_integration("torchrun")
    env = _child_env(cwd)
    env.pop("AGLCL_LAUNCH_TIME", None)
    port = free_port()
    if fresh:
        assert before is None and target is None, "before() and target() need forked ranks"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), "-m", "aglcl", "train", *args]
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    program = target or functools.partial(_cli, ["train", *args], None)

    def launch():
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id="aglcl-test",
                              rdzv_backend="static", rdzv_endpoint=f"127.0.0.1:{port}", rdzv_configs={"rank": 0},
                              max_restarts=0, monitor_interval=0.1, start_method="fork")
        elastic_launch(config, _rank)(program, before)

    return forked(["torchrun", "-m", "aglcl", "train", *args], launch, cwd, env, timeout)


def run_python(script: str | Path, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` (a path, or code as for ``python -c``) in a forked child; integration tests only."""
    import runpy

    require_integration("run_python")
    if isinstance(script, Path):
        argv, main = [str(script), *args], functools.partial(runpy.run_path, str(script), run_name="__main__")
    else:
        argv, main = ["-c", *args], functools.partial(exec, script, {"__name__": "__main__"})
    return forked(argv, main, cwd, _child_env(cwd), timeout)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env(cwd: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "AGLCL_OUTPUT_DIR": str(cwd / "outputs")}


def _cli(argv: list[str], before=None) -> None:
    if before is not None:
        before()
    from aglcl.cli import main

    main(argv)


def _rank(program, before) -> None:
    """A forked rank (of the launcher child, whose state forked() reset): ``before()``, then ``program()``;
    its coverage is saved."""
    try:
        if before is not None:
            before()
        program()
    finally:
        _save_coverage()


def _fresh_state() -> None:
    """Forget what the test process set up in-process (accelerate's singleton state, Hydra's global)."""
    from accelerate.state import AcceleratorState
    from hydra.core.global_hydra import GlobalHydra

    AcceleratorState._reset_state(True)
    GlobalHydra.instance().clear()


def forked(argv: list[str], main, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run ``main()`` in a forked child in ``cwd`` with environment ``env`` and ``sys.argv = argv``; returns
    the completed process: its exit status (``SystemExit``'s code; a traceback and 1 on an exception; minus
    the signal that killed it), stdout and stderr."""
    import faulthandler
    import signal
    import tempfile
    import time
    import traceback

    import torch

    _warm()
    assert torch.get_num_threads() == 1, "OpenMP's thread pool does not survive fork: run with one thread"
    assert not torch.distributed.is_initialized(), "a process group in the test process would leak into the child"
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.setpgid(0, 0)  # a group of its own: a timeout kills its ranks too
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)
            sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)
            sys.argv = list(argv)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
            faulthandler.dump_traceback_later(max(timeout - 5, 1), exit=True)  # a hang shows where
            _fresh_state()
            main()
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - as the interpreter would: a traceback and status 1
            traceback.print_exc()
        finally:
            _save_coverage()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)  # the child and any ranks it started
            os.waitpid(pid, 0)
            raise subprocess.TimeoutExpired(argv, timeout)
        time.sleep(0.02)
    texts = []
    for f in (out, err):
        f.seek(0)
        texts.append(f.read().decode(errors="replace"))
        f.close()
    return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), texts[0], texts[1])


# What a run imports lazily (a model class, the trainer stack, plots): imported once in the parent, so each
# forked child starts with them.
WARM = ("transformers.models.llama.modeling_llama", "transformers.generation", "accelerate", "peft",
        "matplotlib.pyplot", "hydra.core.plugins", "safetensors.torch", "rich.console")


@functools.cache
def _warm() -> None:
    import importlib
    import pkgutil

    import aglcl

    for info in pkgutil.walk_packages(aglcl.__path__, "aglcl."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for name in WARM:
        importlib.import_module(name)


def _save_coverage() -> None:
    """Under ``make coverage`` a forked child's lines are saved too, to a data file of its own that the run
    combines (coverage's ``patch=fork`` restarts measuring in the child; ``os._exit`` skips its atexit save)."""
    coverage = sys.modules.get("coverage")
    cov = coverage.Coverage.current() if coverage is not None else None
    if cov is not None:
        cov.stop()
        own = coverage.CoverageData(basename=os.path.abspath(cov.config.data_file), suffix=True)
        own.update(cov.get_data())
        own.write()


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
