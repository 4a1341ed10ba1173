"""AGFT's gate on a toy least-squares problem: movement of protected weights per optimizer and mode.

Each row of W only affects its own output, so protected rows (R̄ = 1) can be compared with the same
rows trained without a gate, and unprotected rows must move exactly as without a gate.
"""

from __future__ import annotations

import pytest
import torch

from aglcl.errors import AglclError
from aglcl.methods.agft import AGFT

OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
    "adam_l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
}


def _movement(opt: str, mode: str | None, lam: float = 0.8, threshold=None, steps: int = 5) -> torch.Tensor:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8, bias=False)
    start = model.weight.detach().clone()
    method = AGFT(lam=lam, mode=mode or "update", threshold=threshold, gate_dtype="float32")
    if mode is not None:
        rbar = torch.zeros(8, 8)
        rbar[:4] = 1.0  # protect the first four rows
        method.set_importance({"weight": rbar})
    method.before_task(0, None, model)
    optimizer = OPTIMIZERS[opt](model.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
        ((model(x) - y) ** 2).mean().backward()
        method.after_backward(model)
        method.before_step(model, optimizer)
        optimizer.step()
        method.after_step(model, optimizer)
        optimizer.zero_grad()
    return (model.weight.detach() - start).abs()


def _ratio(opt: str, mode: str, **kw) -> tuple[float, float]:
    free, gated = _movement(opt, None), _movement(opt, mode, **kw)
    protected = (gated[:4].sum() / free[:4].sum()).item()
    plastic = (gated[4:].sum() / free[4:].sum()).item()
    return protected, plastic


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_update_mode_shrinks_protected_movement_by_one_minus_lambda(opt):
    protected, plastic = _ratio(opt, "update")
    assert protected == pytest.approx(0.2, abs=0.04)
    assert plastic == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("opt", ["adamw", "adam_l2"])
def test_grad_mode_is_cancelled_by_adam(opt):
    protected, plastic = _ratio(opt, "grad")
    assert protected > 0.85  # Adam divides by sqrt(v): a constant per-element factor barely changes the step
    assert plastic == pytest.approx(1.0, abs=1e-5)


def test_grad_mode_works_under_sgd():
    protected, _ = _ratio("sgd", "grad")
    assert protected == pytest.approx(0.2, abs=0.02)  # plain SGD: scaling g scales each step by s


@pytest.mark.parametrize("opt", ["adamw", "sgd_momentum"])
def test_threshold_hard_freezes(opt):
    moved = _movement(opt, "update", lam=0.5, threshold=0.9)
    assert moved[:4].max().item() < 1e-6
    assert moved[4:].min().item() > 0


def test_no_importance_means_no_gate():
    assert torch.equal(_movement("adamw", None), _movement("adamw", None))
    method = AGFT()
    method.before_task(0, None, torch.nn.Linear(2, 2))
    assert method.mean_gate() is None


def test_gate_formula():
    method = AGFT(lam=0.5, threshold=0.9)
    rbar = torch.tensor([0.0, 0.5, 0.95, 1.0])
    assert torch.allclose(method.gate(rbar), torch.tensor([1.0, 0.75, 0.0, 0.0]))


@pytest.mark.parametrize(("kwargs", "key"), [({"lam": -0.1}, "method.lam"), ({"mode": "both"}, "method.mode"),
                                             ({"threshold": 1.5}, "method.threshold")])
def test_bad_hyper_parameters_name_the_key(kwargs, key):
    with pytest.raises(AglclError, match=key):
        AGFT(**kwargs)


def test_map_that_does_not_match_the_model_is_refused():
    method = AGFT()
    method.set_importance({"weight": torch.zeros(3, 3)})
    with pytest.raises(AglclError, match="shape"):
        method.before_task(0, None, torch.nn.Linear(2, 2))
    method.set_importance({"nope": torch.zeros(2, 2)})
    with pytest.raises(AglclError, match="nope"):
        method.before_task(0, None, torch.nn.Linear(2, 2))


def test_gate_is_applied_once_per_optimizer_step_under_accumulation():
    from accelerate import Accelerator

    from aglcl.data.collate import encode
    from aglcl.engine.config import TrainerConfig
    from aglcl.engine.loop import train_task
    from aglcl.models import build_tiny

    model, tok = build_tiny()
    name = "model.layers.0.mlp.down_proj.weight"
    param = dict(model.named_parameters())[name]
    calls = []

    class Spy(AGFT):
        def after_backward(self, model):
            before = param.grad.clone()
            super().after_backward(model)
            calls.append((param.grad / before)[before != 0])

    method = Spy(lam=0.5, mode="grad", gate_dtype="float32")
    method.set_importance({name: torch.ones_like(param)})
    method.before_task(0, None, model)
    data = [encode(tok, f"question {i}", f" answer {i % 3}", 32) for i in range(12)]
    cfg = TrainerConfig(max_steps=3, grad_accum=3, batch_size=2, precision="no", log_every=1)
    train_task(model, tok, data, method, cfg, Accelerator(cpu=True), task="t")
    assert len(calls) == 3  # once per optimizer step, not per micro-batch
    assert all(torch.allclose(r, torch.full_like(r, 0.5)) for r in calls)  # the gate never compounds


def _lora_tiny():
    from peft import LoraConfig, get_peft_model

    from aglcl.models import build_tiny

    model, tok = build_tiny()
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                             lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # as if a first task had been learnt
    return model.eval(), tok


def test_lora_gate_masks_the_weight_space_delta_and_merges_at_task_boundaries():
    from aglcl.methods.lora_gate import lora_layers

    model, _ = _lora_tiny()
    x = torch.randint(0, 200, (2, 7))
    layers = lora_layers(model)
    name = next(n for n in layers if "q_proj" in n)
    layer = layers[name]
    base = dict(model.named_parameters())[name]
    before = model(input_ids=x).logits
    rbar = torch.zeros_like(base)
    rbar[: base.shape[0] // 2] = 1.0  # protect the first half of the output rows
    method = AGFT(lam=1.0, gate_dtype="float32")
    method.set_importance({name: rbar})
    method.before_task(1, None, model)
    # the first task's delta was merged into W with gate 1: the function is unchanged, B is reset
    assert torch.allclose(model(input_ids=x).logits, before, atol=1e-5)
    assert all(float(b.weight.abs().sum()) == 0 for b in layer.lora_B.values())
    # train B: protected rows of the effective delta get no gradient
    for b in layer.lora_B.values():
        torch.nn.init.normal_(b.weight, std=0.1)
    hidden = torch.randn(3, base.shape[1])
    out = layer(hidden) - layer.base_layer(hidden)
    assert torch.allclose(out[:, : base.shape[0] // 2], torch.zeros(3, base.shape[0] // 2), atol=1e-6)
    assert out[:, base.shape[0] // 2 :].abs().sum() > 0


@pytest.mark.parametrize("control", ["permuted", "uniform"])
def test_controls_keep_the_mean_gate(control):
    rbar = torch.rand(16, 16) ** 3
    plain, ctl = AGFT(gate_dtype="float32"), AGFT(control=control, gate_dtype="float32")
    model = torch.nn.Linear(16, 16, bias=False)
    for m in (plain, ctl):
        m.set_importance({"weight": rbar})
        m.before_task(1, None, model)
    assert ctl.mean_gate() == pytest.approx(plain.mean_gate(), abs=1e-5)
    assert not torch.equal(ctl._gates[0][1], plain._gates[0][1])


@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(300, 200), (7, 5)], ids=["matrix", "small"])
def test_the_recovered_adam_step_equals_the_observed_step(wd, shape):
    """Update mode recovers θ_old − θ_new from AdamW's state (no snapshot of the weights): shrinking it by a
    bf16 gate gives what shrinking the step seen between a snapshot and the stepped weights gives, for
    contiguous and transposed weights."""
    from aglcl.methods.agft import _adam_step

    gen = torch.Generator().manual_seed(0)
    for transposed in (False, True):
        w = torch.randn(shape, generator=gen)
        param = torch.nn.Parameter(w.t() if transposed else w)
        optimizer = torch.optim.AdamW([param], lr=1e-2, weight_decay=wd)
        held = torch.rand(param.shape, generator=gen).to(torch.bfloat16)
        for _ in range(3):
            param.grad = torch.randn(param.shape, generator=gen)
            old = param.detach().clone()
            optimizer.step()
            new = param.detach().clone()
            with torch.no_grad():
                param.addcmul_(_adam_step(param, optimizer.param_groups[0], optimizer.state[param]), held)
            torch.testing.assert_close(param.detach(), new + held.float() * (old - new), atol=1e-6, rtol=1e-5)
