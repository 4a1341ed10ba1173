"""Continual-learning baselines (ewc, replay, lwf, freeze, multitask, single): CLI matrix + unit tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import TASKS, resume_and_compare, stop_then_resume, train

from aglcl.data.collate import collate, encode
from aglcl.errors import AglclError
from aglcl.methods.ewc import EWC
from aglcl.methods.freeze import Freeze
from aglcl.methods.lwf import LwF, distill_kl
from aglcl.methods.multitask import MultiTask
from aglcl.methods.replay import Replay
from aglcl.methods.single import Single

# (method, extra overrides, whether checkpoint/method.safetensors must exist after the first task)
TEST_CASES = [
    ("ewc", ["method.num_samples=8", "method.batch_size=4"], True),
    ("replay", ["method.fraction=0.2", "method.ratio=0.25"], True),
    ("lwf", [], False),
    ("freeze", ["method.layers=[0,1]", "method.patterns=[embed_tokens]"], False),
    ("multitask", [], True),
    ("single", [], True),
    ("ewc_replay", ["method.methods.ewc.num_samples=8", "method.methods.ewc.batch_size=4",
                    "method.methods.replay.fraction=0.2"], True),
    ("agft_replay", ["attribution=grad_x_weight", "attribution.estimator.num_samples=4",
                     "method.methods.replay.fraction=0.2"], True),
]
FAST = ["trainer.lr=5e-3"]  # large enough that two steps move the tiny model and every method's term matters


@pytest.fixture(scope="module")
def tiny():
    from aglcl.models import build_tiny

    model, tok = build_tiny()
    data = {name: [encode(tok, p + " Answer:", " " + a, 64) for p, a in rows[:24]] for name, rows in TASKS.items()}
    return model, tok, data


@pytest.mark.parametrize(("method", "extra", "has_state"), TEST_CASES,
                         ids=[f"{m}-{'-'.join(e) or 'default'}" for m, e, _ in TEST_CASES])
def test_method_runs_and_resumes_like_an_unbroken_run(conf, tmp_path, method, extra, has_state):
    args = [*FAST, f"method={method}", *extra]
    a, split = stop_then_resume(conf, tmp_path, *args)
    assert a["method"].rsplit(".", 2)[-2] == ("compose" if method.endswith("_replay") else method)
    assert a["diagonal_only"] == (method == "single")  # single: only plasticity is reported
    assert (a["metrics"]["op"] is None) == (method == "single") and a["metrics"]["plasticity"] is not None
    assert (split / "checkpoint" / "task_1" / "method.safetensors").is_file() == has_state
    resume_and_compare(conf, split, a, *args)


def test_bad_hyper_parameter_is_refused_before_training(conf, tmp_path):
    with pytest.raises(AglclError, match="method.lam"):
        train(conf, tmp_path / "run", "method=ewc", "method.lam=-1")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("make", "key"), [
    (lambda: EWC(lam=-1.0), "method.lam"),
    (lambda: EWC(gamma=1.5), "method.gamma"),
    (lambda: EWC(mode="bogus"), "method.mode"),
    (lambda: EWC(num_samples=0), "method.num_samples"),
    (lambda: Replay(ratio=1.5), "method.ratio"),
    (lambda: Replay(ratio=1.0), "method.ratio"),
    (lambda: Replay(fraction=-0.1), "method.fraction"),
    (lambda: LwF(temperature=0), "method.temperature"),
    (lambda: Freeze(layers=[3, 1]), "method.layers"),
    (lambda: Freeze(layers=None, patterns=[]), "method.layers"),
    (lambda: Freeze(patterns=["("]), "method.patterns"),
])
def test_bad_hyper_parameters_name_the_key(make, key):
    with pytest.raises(AglclError) as info:
        make()
    assert key in str(info.value) and "\n" not in str(info.value)


# -- EWC ------------------------------------------------------------------------------------------------------
def test_ewc_penalty_is_zero_at_the_anchor_and_matches_the_formula(tiny):
    import copy

    model, _, data = tiny
    model = copy.deepcopy(model)
    ewc = EWC(lam=3.0, num_samples=8, batch_size=4)
    ewc.after_task(0, None, model, data["parity"])
    ewc.before_task(1, None, model)
    assert ewc.penalty().item() == 0.0
    fisher, star = ewc.anchors[0]
    assert set(fisher) == set(star) and any("q_proj" in n for n in fisher) and not any("embed" in n for n in fisher)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in fisher:
            params[n].add_(0.01 * torch.randn_like(params[n]))
    by_hand = 0.5 * 3.0 * sum(float((fisher[n] * (params[n].detach() - star[n]) ** 2).sum()) for n in fisher)
    assert ewc.penalty().item() > 0
    assert ewc.penalty().item() == pytest.approx(by_hand, rel=1e-5)
    outputs = SimpleNamespace(loss=torch.tensor(1.0))
    assert ewc.loss(model, {}, outputs).item() == pytest.approx(1.0 + by_hand, rel=1e-5)


def test_ewc_modes_and_state_round_trip(tiny):
    model, _, data = tiny
    sep, onl = EWC(num_samples=8), EWC(mode="online", gamma=0.5, num_samples=8)
    for method in (sep, onl):
        method.after_task(0, None, model, data["parity"])
        method.after_task(1, None, model, data["sign"])
    assert len(sep.anchors) == 2 and len(onl.anchors) == 1
    name = next(iter(onl.anchors[0][0]))
    expected = 0.5 * sep.anchors[0][0][name] + sep.anchors[1][0][name]
    assert torch.allclose(onl.anchors[0][0][name], expected)
    restored = EWC(num_samples=8)
    restored.load_state_dict({k: v.clone() for k, v in sep.state_dict().items()})
    assert len(restored.anchors) == 2
    for (f1, s1), (f2, s2) in zip(sep.anchors, restored.anchors):
        assert f1.keys() == f2.keys() and all(torch.equal(f1[n], f2[n]) and torch.equal(s1[n], s2[n]) for n in f1)


# -- LwF ------------------------------------------------------------------------------------------------------
def test_lwf_kl_is_zero_when_student_equals_teacher(tiny):
    import copy

    from aglcl.models.forward import lm_forward

    model, tok, data = tiny
    model = copy.deepcopy(model)
    lwf = LwF()
    lwf.before_task(0, None, model)
    assert lwf.teacher is None
    lwf.before_task(1, None, model)
    assert lwf.teacher is not model and not any(p.requires_grad for p in lwf.teacher.parameters())
    batch = collate(data["parity"][:4], tok.pad_token_id)
    outputs = lm_forward(model, batch)
    assert lwf.distillation(batch, outputs.logits).item() == pytest.approx(0.0, abs=1e-6)
    assert lwf.loss(model, batch, outputs).item() == pytest.approx(outputs.loss.item(), abs=1e-6)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.5)
    outputs = lm_forward(model, batch)
    assert lwf.distillation(batch, outputs.logits).item() > 1e-6
    lwf.after_task(1, None, model, data["parity"])
    assert lwf.teacher is None


def test_distill_kl_by_hand():
    s, t = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]]), torch.tensor([[[1.0, 0.0], [2.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    p, q = torch.softmax(t[0, 0] / 2, -1), torch.softmax(s[0, 0] / 2, -1)
    assert distill_kl(s, t, mask, 2.0).item() == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-6)


# -- freeze ---------------------------------------------------------------------------------------------------
def test_freeze_masks_exactly_the_chosen_layers():
    from aglcl.models import build_tiny

    model, _ = build_tiny()
    freeze = Freeze(layers=[0, 1], patterns=["embed_tokens"], from_task=1)
    freeze.before_task(0, None, model)
    assert all(p.requires_grad for p in model.parameters())
    freeze.before_task(1, None, model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if ".layers.0." in n or "embed_tokens" in n}
    assert any(".layers.1." in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(AglclError, match=r"method\.layers"):
        Freeze(layers=[0, 5]).before_task(0, None, model)
    with pytest.raises(AglclError, match=r"method\.patterns"):
        Freeze(layers=None, patterns=["no_such_weight"]).before_task(0, None, model)


# -- replay ---------------------------------------------------------------------------------------------------
def test_replay_buffer_size_mix_and_round_trip(tiny):
    _, _, data = tiny
    tiny_fraction = Replay(fraction=0.01)
    tiny_fraction.after_task(0, None, None, data["parity"])
    assert len(tiny_fraction.buffer) == 1  # round(0.24) = 0, but at least one
    replay = Replay(fraction=0.1)
    replay.after_task(0, None, None, data["parity"])
    assert len(replay.buffer) == round(0.1 * 24) and all(ex in data["parity"] for ex in replay.buffer)
    assert replay.train_examples(1, None, data["sign"]) == data["sign"] + replay.buffer  # ratio null: all of it
    replay.ratio = 0.25
    mixed = replay.train_examples(1, None, data["sign"])
    assert len(mixed) == 24 + 8 and mixed[:24] == data["sign"]  # 8 / 32 = 0.25, cycling the 2-example buffer
    assert all(ex in replay.buffer for ex in mixed[24:])
    state = replay.state_dict()
    assert all(t.dtype == torch.int64 for t in state.values())
    again = Replay()
    again.load_state_dict(state)
    assert again.buffer == replay.buffer
    assert Replay().state_dict() == {}


# -- multitask / single ---------------------------------------------------------------------------------------
def test_multitask_trains_on_the_union(tiny):
    _, _, data = tiny
    mt = MultiTask()
    assert mt.train_examples(0, None, data["parity"]) == data["parity"]
    mt.after_task(0, None, None, data["parity"])
    assert mt.train_examples(1, None, data["sign"]) == data["parity"] + data["sign"]
    again = MultiTask()
    again.load_state_dict(mt.state_dict())
    assert again.train_examples(1, None, data["sign"]) == data["parity"] + data["sign"]


def test_single_restores_the_initial_weights():
    from aglcl.models import build_tiny

    model, _ = build_tiny()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    single = Single()
    single.before_task(0, None, model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    resumed = Single()
    resumed.load_state_dict(single.state_dict())
    for method in (single, resumed):
        method.before_task(1, None, model)
        assert all(torch.equal(p, initial[n]) for n, p in model.named_parameters())
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.add_(1.0)
