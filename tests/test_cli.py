"""The ``aglcl`` CLI end to end, in subprocesses, on the tiny model and fixture tasks."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import make_fixture_conf, run_cli, tiny_overrides

pytestmark = pytest.mark.integration  # subprocesses: the CLI's exit codes, signals, torchrun

CONTRACT = ["results.json", "R.csv", "R_heatmap.png", "state.json", ".hydra/config.yaml"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny 2-task run shared by the tests of this module."""
    root = tmp_path_factory.mktemp("cli")
    conf = make_fixture_conf(root)
    run = root / "run"
    proc = run_cli("train", *tiny_overrides(conf, run), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, conf, run


def test_train_writes_the_run_dir_contract(trained):
    _, _, run = trained
    for name in CONTRACT:
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == ["parity", "sign"]
    assert len(results["R"]) == 2 and all(len(row) == 2 for row in results["R"])
    assert len(results["b"]) == 2
    assert set(results["metrics"]) >= {"op", "bwt", "fwt", "forgetting", "aia", "plasticity"}
    assert results["metric"] == {"parity": "accuracy", "sign": "accuracy"}
    state = json.loads((run / "state.json").read_text())
    assert state["next_task"] == 2 and state["done"] is True
    rows = list(csv.reader((run / "R.csv").open()))
    assert rows[0] == ["after", "parity", "sign"] and [r[0] for r in rows[1:]] == ["parity", "sign"]
    for stage in ("after_0_initial", "after_1_parity", "after_2_sign"):
        for task in ("parity", "sign"):
            lines = (run / "predictions" / stage / f"{task}.jsonl").read_text().splitlines()
            record = json.loads(lines[0])
            assert set(record) == {"prompt", "reference", "prediction", "score"}
            assert len(lines) == 8  # eval_size


def test_eval_run_dir_reproduces_the_metrics(trained):
    root, _, run = trained
    out = root / "eval_out"
    proc = run_cli("eval", f"run_dir={run}", f"hydra.run.dir={out}", cwd=root)
    assert proc.returncode == 0, proc.stderr
    recomputed = json.loads((out / "metrics.json").read_text())
    stored = json.loads((run / "results.json").read_text())["metrics"]
    assert recomputed == pytest.approx(stored)
    assert "bwt" in proc.stdout


def test_eval_matrix_from_a_paper_table(tmp_path):
    table = tmp_path / "paper.csv"
    table.write_text("after,a,b,c\na,0.9,,\nb,0.7,0.8,\nc,0.6,0.7,0.9\n")
    out = tmp_path / "out"
    proc = run_cli("eval", f"matrix={table}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["op"] == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert metrics["bwt"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)
    assert metrics["fwt"] is None and "unavailable" in proc.stdout


def test_multirun_makes_one_job_dir_per_value_and_sweep_aggregates(trained, tmp_path):
    _, conf, _ = trained
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(conf, tmp_path / "unused") if not o.startswith("hydra.run.dir")]
    proc = run_cli("train", "-m", *overrides, "trainer.seed=0,1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if (p / "results.json").is_file())
    assert jobs == ["0", "1"]
    out = tmp_path / "agg"
    proc = run_cli("eval", f"sweep_dir={sweep}", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 1 and rows[0]["n"] == "2"


def test_cfg_job_prints_the_config_without_running(tmp_path):
    proc = run_cli("train", "--cfg", "job", "model=tiny", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "trainer:" in proc.stdout and "build_tiny" in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("train", "eval", "ls", "data"))


def test_ls_lists_groups_and_runs(trained):
    root, _, run = trained
    proc = run_cli("ls", f"paths.log_dir={root}", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "method" in proc.stdout and "seqft" in proc.stdout
    assert "run" in proc.stdout


def test_tensorboard_logger_writes_event_files(trained, tmp_path):
    _, conf, _ = trained
    run = tmp_path / "run"
    proc = run_cli("train", *tiny_overrides(conf, run), "logger=tensorboard", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((run / "tb").rglob("events.out.tfevents.*"))


def test_fp16_without_a_gpu_warns_that_it_runs_fp32(tmp_path):
    """accelerate has no fp16 autocast or grad scaler on CPU: the run goes on in fp32 and says so."""
    from aglcl.dist import has_accelerator

    if has_accelerator():
        pytest.skip("a GPU is present: fp16 is real here")
    conf, run = make_fixture_conf(tmp_path), tmp_path / "run"
    proc = run_cli("train", *tiny_overrides(conf, run), "trainer.precision=fp16", "stop_after=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trainer.precision=fp16 has no effect on cpu" in proc.stdout + proc.stderr
