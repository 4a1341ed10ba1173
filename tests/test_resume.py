"""Resume after a task boundary: the metrics equal an unbroken run's (CPU, fixed seed, fp32)."""

from __future__ import annotations

import json

import pytest
from conftest import make_fixture_conf, run_cli, tiny_overrides


@pytest.fixture(scope="module")
def conf(tmp_path_factory):
    return make_fixture_conf(tmp_path_factory.mktemp("resume"))


@pytest.mark.parametrize(("method", "stop"), [
    (["method=seqft"], 1),
    (["method=agft", "attribution.estimator.correct_only=false", "attribution.estimator.num_samples=8"], 1),
    # LoRA, 3 tasks, stopped after 2: task 3 starts from the delta task 2 learnt under task 1's gate
    (["method=agft", "peft=lora", "attribution=grad_x_weight", "trainer.lr=5e-3", "attribution.estimator.num_samples=8",
      "attribution.estimator.correct_only=false", "sequence.order=[parity,sign,size]"], 2),
], ids=["seqft", "agft", "agft-lora"])
def test_stop_then_resume_equals_an_unbroken_run(conf, tmp_path, method, stop):
    whole, split = tmp_path / "whole", tmp_path / "split"
    proc = run_cli("train", *tiny_overrides(conf, whole), *method, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", *tiny_overrides(conf, split), *method, f"stop_after={stop}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (split / "results.json").exists()
    assert json.loads((split / "state.json").read_text())["next_task"] == stop
    assert (split / "checkpoint" / f"task_{stop}" / "model.safetensors").is_file()
    proc = run_cli("train", *tiny_overrides(conf, split), *method, "resume=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, split))
    assert a["R"] == b["R"] and a["b"] == b["b"] and a["metrics"] == b["metrics"]
    assert [a["train"][t]["loss"] for t in a["tasks"]] == [b["train"][t]["loss"] for t in b["tasks"]]


def test_resume_without_a_run_is_refused(conf, tmp_path):
    proc = run_cli("train", *tiny_overrides(conf, tmp_path / "nothing"), "resume=true", cwd=tmp_path)
    assert proc.returncode == 2 and "state.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_resume_with_another_order_is_refused(conf, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", *tiny_overrides(conf, run), "stop_after=1", cwd=tmp_path).returncode == 0
    proc = run_cli("train", *tiny_overrides(conf, run), "resume=true", "sequence.order=[sign,parity]", cwd=tmp_path)
    assert proc.returncode == 2 and "order" in proc.stderr
