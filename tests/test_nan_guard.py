"""The numerical guard: a NaN gradient stops the task before it is applied, or skips that step."""

from __future__ import annotations

import math

import pytest
import torch

from aglcl.data.collate import encode
from aglcl.engine.config import TrainerConfig
from aglcl.engine.loop import train_task
from aglcl.errors import AglclError
from aglcl.methods.base import Method


class PoisonStep(Method):
    """Writes NaN into one gradient at optimizer step ``at``; records the weights after every good step."""

    def __init__(self, at: int):
        self.at, self.step, self.after = at, 0, []

    def after_backward(self, model):
        self.step += 1
        if self.step == self.at:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")

    def after_step(self, model, optimizer):
        self.after.append({n: p.detach().clone() for n, p in model.named_parameters()})


def _run(policy: str, at: int):
    from accelerate import Accelerator

    from aglcl.models import build_tiny

    torch.manual_seed(0)
    model, tok = build_tiny()
    data = [encode(tok, f"Is {n} even? Answer:", " yes" if n % 2 == 0 else " no", 32) for n in range(16)]
    cfg = TrainerConfig(max_steps=4, batch_size=4, precision="no", lr=1e-3, log_every=1, nan_policy=policy)
    method = PoisonStep(at)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    model = accelerator.prepare(model)
    try:
        return model, method, train_task(model, tok, data, method, cfg, accelerator, task="parity")
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)


def test_stop_names_step_and_task_and_keeps_the_last_good_weights():
    with pytest.raises(AglclError, match=r"step 3 of task 'parity'.*nan_policy=skip") as info:
        _run("stop", at=3)
    assert "\n" not in str(info.value)


def test_stop_leaves_the_weights_of_the_last_good_step():
    from accelerate import Accelerator

    from aglcl.models import build_tiny

    torch.manual_seed(0)
    model, tok = build_tiny()
    data = [encode(tok, f"Is {n} even? Answer:", " yes" if n % 2 == 0 else " no", 32) for n in range(16)]
    cfg = TrainerConfig(max_steps=4, batch_size=4, precision="no", lr=1e-3, log_every=1, nan_policy="stop")
    method = PoisonStep(at=3)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    with pytest.raises(AglclError):
        train_task(accelerator.prepare(model), tok, data, method, cfg, accelerator, task="parity")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    assert len(method.after) == 2  # steps 1 and 2 were applied, step 3 was not
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), method.after[-1][name]), name


def test_skip_drops_the_poisoned_step_and_trains_on():
    model, method, stats = _run("skip", at=2)
    assert stats["skipped_steps"] == 1 and stats["steps"] == 4
    assert len(method.after) == 3  # 4 steps, one skipped
    assert math.isfinite(stats["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_unknown_policy_names_the_key():
    with pytest.raises(AglclError, match=r"trainer.nan_policy='ignore'.*'skip', 'stop'"):
        TrainerConfig(nan_policy="ignore")


_DEEPSPEED_POISON = """
import json, sys, torch
from accelerate import Accelerator
from aglcl.data.collate import encode
from aglcl.engine.config import TrainerConfig
from aglcl.engine.strategy import DistributedConfig
from aglcl.engine.loop import train_task
from aglcl.errors import AglclError
from aglcl.methods.base import Method
from aglcl.models import build_tiny

class PoisonLoss(Method):  # NaN loss at optimizer step 3 (DeepSpeed keeps the gradients to itself)
    calls = 0
    def loss(self, model, batch, outputs):
        self.calls += 1
        return outputs.loss * float("nan") if self.calls == 3 else outputs.loss

torch.manual_seed(0)
model, tok = build_tiny()
data = [encode(tok, f"Is {n} even? Answer:", " yes" if n % 2 == 0 else " no", 32) for n in range(16)]
cfg = TrainerConfig(max_steps=4, batch_size=4, precision="no", lr=1e-3, log_every=1, nan_policy=sys.argv[1])
try:
    stats = train_task(model, tok, data, PoisonLoss(), cfg, Accelerator(cpu=True), task="parity",
                       engine=DistributedConfig(engine="deepspeed", zero_stage=2))
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    print(json.dumps({"skipped": stats["skipped_steps"], "steps": stats["steps"], "finite": finite}))
except AglclError as exc:
    print(json.dumps({"error": str(exc)}))
"""


@pytest.mark.integration
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_deepspeed_engine_skips_or_stops_on_a_nan_loss(policy, tmp_path):
    """DeepSpeed's own overflow check drops the poisoned step; the policy then counts it or stops the task."""
    import json

    from conftest import run_python

    proc = run_python(_DEEPSPEED_POISON, policy, cwd=tmp_path)  # a child of its own: DeepSpeed's group dies with it
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if policy == "skip":
        assert out == {"skipped": 1, "steps": 4, "finite": True}
    else:
        assert "step 3 of task 'parity'" in out["error"]
