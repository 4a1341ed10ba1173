"""The hook contract under every engine: a method that overrides every hook gets each one called at its
documented rate (docs/design.md, "Hook contract"), or the combination is refused before training.

No engine runs in-process; DeepSpeed ZeRO-2/3 (a one-rank group) in a forked child of its own, since
DeepSpeed's group outlives the run; DDP and FSDP2 under torchrun with 2 processes (integration).
"""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, tiny_overrides, torchrun, train

from aglcl.methods.base import HOOKS, Method

TASKS, STEPS, ACCUM = 2, 3, 2
ARGS = [f"trainer.max_steps={STEPS}", f"trainer.grad_accum={ACCUM}", "trainer.batch_size=2",
        "method=seqft", "method._target_=plugins.counting.Counting", "attribution=grad_x_weight",
        "attribution.estimator.num_samples=2", "attribution.estimator.correct_only=false"]
# per run: once; per task: once; per optimizer step: once; per micro-batch: once
EXPECTED = {"setup": 1, "before_task": TASKS, "train_examples": TASKS, "attach_optimizer": TASKS,
            "loss": TASKS * STEPS * ACCUM, "after_backward": TASKS * STEPS, "before_step": TASKS * STEPS,
            "after_step": TASKS * STEPS, "after_task": TASKS, "set_importance": TASKS - 1}


def test_the_probe_overrides_every_hook():
    from plugins.counting import Counting

    assert all(Counting("x").overrides(h) for h in HOOKS) and not any(Method().overrides(h) for h in HOOKS)


def _counts(out, ranks=1):
    found = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    assert all(f == found[0] for f in found), found  # every rank calls every hook alike
    return found[0]


def test_every_hook_is_called_without_an_engine(conf, tmp_path):
    train(conf, tmp_path / "run", *ARGS, f"+method.out={tmp_path / 'counts'}")
    assert _counts(tmp_path / "counts") == EXPECTED


@pytest.mark.integration
@pytest.mark.parametrize("engine", ["deepspeed_zero2", "deepspeed_zero3", "ddp", "fsdp2"])
def test_every_hook_is_called_under_every_engine(conf, tmp_path, engine):
    if engine.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    args = [*tiny_overrides(conf, tmp_path / "run"), *ARGS, f"+method.out={tmp_path / 'counts'}",
            f"distributed={engine}"]
    ranks = 1 if engine.startswith("deepspeed") else 2
    if ranks == 1:
        proc = run_cli("train", *args, cwd=tmp_path)  # a child of its own: the one-rank group dies with it
    else:
        proc = torchrun(*args, cwd=tmp_path)  # the probe lives in tests/plugins, on the ranks' sys.path
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _counts(tmp_path / "counts", ranks=ranks) == EXPECTED


def test_a_method_that_reads_grads_is_refused_under_deepspeed():
    from aglcl.engine.strategy import DistributedConfig
    from aglcl.errors import AglclError

    class ReadsGrads(Method):
        reads_grads = True

    with pytest.raises(AglclError, match="edits parameters' .grad"):
        DistributedConfig(engine="deepspeed").check(ReadsGrads())
    DistributedConfig(engine="ddp").check(ReadsGrads())  # DDP calls after_backward with .grad populated
