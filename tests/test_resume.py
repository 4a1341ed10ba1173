"""Resume after a task boundary: the metrics equal an unbroken run's (CPU, fixed seed, fp32). In-process."""

from __future__ import annotations

import pytest
from conftest import resume_and_compare, stop_then_resume, train

from aglcl.errors import AglclError


@pytest.mark.parametrize(("method", "stop"), [
    (["method=seqft"], 1),
    (["method=agft", "attribution.estimator.correct_only=false", "attribution.estimator.num_samples=8"], 1),
    # LoRA, 3 tasks, stopped after 2: task 3 starts from the delta task 2 learnt under task 1's gate
    (["method=agft", "peft=lora", "attribution=grad_x_weight", "trainer.lr=5e-3", "attribution.estimator.num_samples=8",
      "attribution.estimator.correct_only=false", "sequence.order=[parity,sign,size]"], 2),
], ids=["seqft", "agft", "agft-lora"])
def test_stop_then_resume_equals_an_unbroken_run(conf, tmp_path, method, stop):
    whole, split = stop_then_resume(conf, tmp_path, *method, stop=stop)
    assert (split / "checkpoint" / f"task_{stop}" / "model.safetensors").is_file()
    resume_and_compare(conf, split, whole, *method)


def test_resume_without_a_run_is_refused(conf, tmp_path):
    with pytest.raises(AglclError, match="state.json"):
        train(conf, tmp_path / "nothing", "resume=true")


def test_resume_with_another_order_is_refused(conf, tmp_path):
    run = tmp_path / "run"
    train(conf, run, "stop_after=1")
    with pytest.raises(AglclError, match="order"):
        train(conf, run, "resume=true", "sequence.order=[sign,parity]")
