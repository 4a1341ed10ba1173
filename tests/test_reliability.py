"""Reliability: the whole config is checked before the first write, the run dir has one owner, and a partial
sweep says it is partial. In-process where the message is the point; the CLI where exit codes and files are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_fixture_conf, run_cli, tiny_overrides
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from aglcl.engine import ownership
from aglcl.engine.validate import check_train_config
from aglcl.errors import AglclError
from aglcl.paths import conf_dir


def _compose(*overrides):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.lr=abc"], r"trainer.lr='abc' is invalid: must be a number"),
    (["trainer.max_steps=abc"], r"trainer.max_steps='abc' is invalid: must be an integer or null"),
    (["method.lam=abc"], r"method.lam='abc' is invalid: must be a number"),
    (["method=ewc", "method.lam=abc"], r"method.lam='abc' is invalid"),
    (["trainer.batch_size=2.5"], r"trainer.batch_size=2.5 is invalid: must be an integer"),
    (["trainer.batch_size=1e9"], r"trainer.batch_size=1000000000.0 is invalid: must be an integer"),
    (["trainer.max_steps=2.5"], r"trainer.max_steps=2.5 is invalid"),
    (["trainer.seed=abc"], r"trainer.seed='abc' is invalid: must be an integer"),
    (["stop_after=abc"], r"stop_after='abc' is invalid"),
    (["stop_after=-1"], r"stop_after=-1 is invalid: must be a task count in 1..3"),
    (["stop_after=0"], r"stop_after=0 is invalid"),
    (["stop_after=4"], r"stop_after=4 is invalid"),
    (["resume=maybe"], r"resume='maybe' is invalid: must be true/false or 'force'"),
    (["resume=true", "overwrite=true"], r"contradict"),
    (["checkpoint.every_steps=-1"], r"checkpoint.every_steps=-1 is invalid"),
    (["limit.eval=0"], r"limit.eval=0 is invalid"),
    (["evaluation.every=0"], r"evaluation.every=0 is invalid: must be >= 1"),
    (["evaluation.tasks=some"], r"evaluation.tasks='some' is invalid: must be 'all' or 'seen' or 'past'"),
    (["+evaluation.skip=1"], r"evaluation.skip is not an option"),
    (["data_seed=1.5"], r"data_seed=1.5 is invalid"),
    (["tags=abc"], r"tags='abc' is invalid: must be a list"),
    (["+lr=1e-4"], r"'lr' is not a config key of aglcl train.*did you mean 'trainer.lr'"),
    (["+trainer.lrr=1"], r"trainer.lrr is not an option of .*TrainerConfig; did you mean 'lr'"),
    (["+checkpoint.every=1"], r"checkpoint.every is not an option; did you mean"),
    (["+attribution.estimator.foo=1"], r"attribution.estimator.foo is not an option of .*LRP"),
    (["model=tiny", "model.hidden_size=1.5"], r"model.hidden_size=1.5 is invalid: must be an integer"),
    (["model=hub"], r"model.name_or_path is required"),
    (["peft=lora", "peft.r=abc"], r"peft.r='abc' is invalid: must be an integer"),
    (["method=agft_replay", "method.methods.agft.lam=x"], r"method.methods.agft.lam='x' is invalid"),
    (["+sequence.tasks.bbc_topic.scoring.normalize=3"], r"sequence.tasks.bbc_topic.scoring.normalize=3 is invalid"),
    # range checks of the cheap groups run too (their own __init__)
    (["trainer.lr=-1"], r"trainer.lr=-1 is invalid: must be > 0"),
    (["method.mode=sideways"], r"method.mode='sideways' is invalid"),
])
def test_bad_values_and_unknown_keys_are_named(overrides, message):
    with pytest.raises(AglclError, match=message):
        check_train_config(_compose(*overrides), build=True)


def test_every_shipped_option_passes_the_check():
    """The check refuses nothing the project ships (each option of each group, and each method under LoRA)."""
    root = Path(conf_dir())
    with initialize_config_dir(str(root), version_base="1.3"):
        for group in ("method", "attribution", "model", "sequence", "distributed", "peft", "logger",
                      "experiment", "debug", "trainer"):
            for option in sorted((root / group).glob("*.yaml")):
                extra = ["model.name_or_path=x"] if option.stem == "hub" else []
                check_train_config(compose("train", overrides=[f"{group}={option.stem}", *extra]), build=True)
        for option in sorted((root / "method").glob("*.yaml")):
            check_train_config(compose("train", overrides=[f"method={option.stem}", "peft=lora"]), build=True)


@pytest.fixture(scope="module")
def conf(tmp_path_factory):
    return make_fixture_conf(tmp_path_factory.mktemp("reliability"))


def one_line(proc, *needles):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.integration
@pytest.mark.parametrize("bad", ["trainer.batch_size=2.5", "stop_after=abc", "+lr=1e-4", "trainer.lr=-1"])
def test_a_bad_value_writes_nothing(conf, tmp_path, bad):
    run = tmp_path / "run"
    one_line(run_cli("train", *tiny_overrides(conf, run), bad, cwd=tmp_path), bad.lstrip("+").split("=")[0])
    assert not run.exists()


@pytest.mark.integration
def test_a_bad_sweep_value_is_refused_before_the_first_job(conf, tmp_path):
    sweep = tmp_path / "sweep"
    args = [o for o in tiny_overrides(conf, tmp_path / "x") if not o.startswith("hydra.run.dir")]
    proc = run_cli("train", "-m", *args, "trainer.lr=1e-3,-1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    one_line(proc, "job 1", "trainer.lr=-1")
    assert not any(p.name.isdigit() for p in sweep.iterdir()) if sweep.exists() else True


@pytest.fixture(scope="module")
def finished(conf, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    run = root / "run"
    proc = run_cli("train", *tiny_overrides(conf, run), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.mark.integration
def test_a_fresh_run_into_a_finished_run_dir_is_refused(conf, finished, tmp_path):
    before = (finished / "results.json").read_text(), (finished / "train.log").read_text()
    one_line(run_cli("train", *tiny_overrides(conf, finished), cwd=tmp_path), "holds a finished run",
             "overwrite=true")
    assert ((finished / "results.json").read_text(), (finished / "train.log").read_text()) == before


@pytest.mark.integration
def test_overwrite_starts_from_an_empty_dir(conf, finished, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "importance" / "stale.safetensors").parent.mkdir(exist_ok=True)
    (run / "importance" / "stale.safetensors").write_bytes(b"old")
    old_log = (run / "train.log").read_text()
    proc = run_cli("train", *tiny_overrides(conf, run), "method=seqft", "overwrite=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (run / "importance").exists()  # seqft writes no maps: the old run's are gone
    assert old_log not in (run / "train.log").read_text()
    assert json.loads((run / "results.json").read_text())["method"].endswith("SeqFT")


@pytest.mark.integration
def test_overwrite_refuses_a_directory_that_holds_no_run(conf, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    one_line(run_cli("train", *tiny_overrides(conf, mine), "overwrite=true", cwd=tmp_path), "holds no aglcl run")
    assert (mine / "thesis.tex").read_text() == "precious"


@pytest.mark.integration
@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_run_dir_that_is_a_file_is_refused(conf, tmp_path, command):
    target = tmp_path / "afile"
    target.write_text("x")
    args = tiny_overrides(conf, target) if command == "train" else ["matrix=m.csv", f"hydra.run.dir={target}"]
    one_line(run_cli(command, *args, cwd=tmp_path), "is a file, not a directory")
    assert target.read_text() == "x"


@pytest.mark.integration
def test_a_locked_run_dir_is_refused_and_a_stale_lock_is_taken_over(conf, tmp_path):
    run = tmp_path / "run"
    lock = ownership.RunLock(run)
    lock.acquire()
    try:
        one_line(run_cli("train", *tiny_overrides(conf, run), cwd=tmp_path), "in use by another aglcl run",
                 f"pid {os.getpid()}")
    finally:
        lock.release()
    # a lock file left by a process that died (kill -9): nobody holds its flock, so it is stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ownership.LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": "elsewhere", "since": "then"}))
    assert ownership.RunLock.holder(run) is None
    proc = run_cli("train", *tiny_overrides(conf, run), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (run / ownership.LOCK).exists()


def test_two_locks_on_one_dir_exclude_each_other(tmp_path):
    first, second = ownership.RunLock(tmp_path), ownership.RunLock(tmp_path)
    first.acquire()
    with pytest.raises(AglclError, match="is locked"):
        second.acquire()
    assert "pid" in ownership.RunLock.holder(tmp_path)
    first.release()
    second.acquire()
    second.release()


@pytest.mark.integration
def test_a_resume_of_a_dir_without_a_resume_point_says_why(conf, tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    one_line(run_cli("train", *tiny_overrides(conf, run), "resume=true", cwd=tmp_path), "state.json")


@pytest.mark.integration
def test_aglcl_without_a_command_exits_2():
    proc = subprocess.run([sys.executable, "-m", "aglcl"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "usage: aglcl <command>" in proc.stderr


# -- a partial sweep ----------------------------------------------------------------------------------------
def _fake_sweep(root: Path, finished: dict[int, float], started: tuple[int, ...] = ()) -> Path:
    """Hydra's layout for ``-m method=seqft,agft trainer.seed=0,1,2``: multirun.yaml and job dirs."""
    sweep = root / "sweep"
    sweep.mkdir()
    cfg = {"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                 "params": None},
                     "overrides": {"task": ["model=tiny", "method=seqft,agft", "trainer.seed=0,1,2"]}}}
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml(cfg))
    jobs = [["model=tiny", f"method={m}", f"trainer.seed={s}"] for m in ("seqft", "agft") for s in (0, 1, 2)]
    for num in (*finished, *started):
        job = sweep / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(jobs[num]))
        if num in finished:
            (job / "results.json").write_text(json.dumps({"metrics": {"op": finished[num]}, "timings": {}}))
    return sweep


def test_a_partial_sweep_lists_failed_and_missing_jobs(tmp_path):
    from aglcl.report.sweep import aggregate_sweep, sweep_status

    sweep = _fake_sweep(tmp_path, {0: 0.5, 1: 0.7, 2: 0.6, 3: 0.9}, started=(4,))
    jobs = sweep_status(sweep)
    assert (jobs["expected"], jobs["finished"], jobs["seeds"]) == (6, 4, 3)
    assert [j["num"] for j in jobs["failed"]] == [4] and "method=agft trainer.seed=1" in jobs["failed"][0]["overrides"]
    assert [j["num"] for j in jobs["missing"]] == [5]
    seqft, agft = aggregate_sweep(sweep)
    assert (seqft["n"], seqft["complete"]) == (3, True) and seqft["op"]["mean"] == pytest.approx(0.6)
    assert (agft["n"], agft["complete"]) == (1, False)


def test_a_sweep_whose_group_never_finished_still_has_its_row(tmp_path):
    from aglcl.report.sweep import aggregate_sweep

    rows = aggregate_sweep(_fake_sweep(tmp_path, {0: 0.5, 1: 0.7, 2: 0.6}))
    assert [(r["overrides"], r["n"], r["complete"]) for r in rows] == [
        ("model=tiny method=seqft", 3, True), ("model=tiny method=agft", 0, False)]
    assert rows[1]["op"]["mean"] is None and rows[1]["op"]["n"] == 0


@pytest.mark.integration
def test_the_partial_sweep_shows_in_the_eval_output(tmp_path):
    sweep = _fake_sweep(tmp_path, {0: 0.5, 1: 0.7, 2: 0.6, 3: 0.9}, started=(4,))
    proc = run_cli("eval", f"sweep_dir={sweep}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "jobs: 4 of 6 finished" in proc.stdout and "failed job 4" in proc.stdout
    assert "missing job 5" in proc.stdout and "1 of 3 !" in proc.stdout and "PARTIAL SWEEP" in proc.stdout
    out = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert out["jobs"]["missing"][0]["num"] == 5


def test_sweep_table_keeps_column_names_whole():
    from rich.console import Console

    from aglcl.report.tables import print_whole, sweep_table

    keys = ["op", "bwt", "fwt", "forgetting", "aia", "plasticity", "wall_s", "peak_mem_mb"]
    row = {"overrides": "method=agft attribution=lrp method.mode=update trainer.seed_group=abc", "n": 3,
           **{k: {"mean": 0.5, "lo": 0.4, "hi": 0.6, "sd": 0.1, "n": 3} for k in keys}}
    console = Console(width=100, record=True)
    print_whole(console, sweep_table([row], keys))
    text = console.export_text()
    for key in keys:
        assert key in text, (key, text)


@pytest.mark.parametrize(("cfg", "message"), [
    ({"matrix": "m.csv", "foo": 1}, r"'foo' is not a config key of aglcl eval"),
    ({"sweep_dir": "s", "tasks": ["a", "b"]}, r"tasks= and scale= apply to matrix= only"),
    ({"run_dir": "r", "scale": 100}, r"apply to matrix= only"),
])
def test_eval_refuses_keys_nothing_reads(tmp_path, cfg, message):
    from aglcl.report.evaluate import run_eval

    base = {"run_dir": None, "matrix": None, "sweep_dir": None, "tasks": None, "scale": "auto"}
    with pytest.raises(AglclError, match=message):
        run_eval(OmegaConf.create({**base, **cfg}), out_dir=tmp_path)
