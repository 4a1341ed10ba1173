"""MIGU and SEEKR baselines: CLI runs that resume like unbroken ones, plus unit tests of their pieces."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TASKS, resume_and_compare, stop_then_resume, train

from aglcl.data.collate import IGNORE, collate, encode
from aglcl.errors import AglclError
from aglcl.methods.migu import MIGU, unit_mask
from aglcl.methods.replay import unpack_examples
from aglcl.methods.seekr import (
    SEEKR,
    attention_forward,
    attention_kl,
    eager_attention,
    head_scores,
    select_heads,
)

FAST = ["trainer.lr=5e-3"]
# (method, extra overrides, whether checkpoint/task_1/method.safetensors must exist after the first task)
CASES = [
    ("migu", ["method.quantile=0.5"], False),
    ("seekr", ["method.fraction=0.1", "method.ratio=0.5", "method.layer_budget=1", "method.head_budget=3"], True),
]


@pytest.fixture(scope="module")
def tiny():
    from aglcl.models import build_tiny

    model, tok = build_tiny()
    data = {name: [encode(tok, p + " Answer:", " " + a, 64) for p, a in rows[:24]] for name, rows in TASKS.items()}
    return model, tok, data


@pytest.mark.parametrize(("method", "extra", "has_state"), CASES, ids=[c[0] for c in CASES])
def test_method_runs_and_resumes_like_an_unbroken_run(conf, tmp_path, method, extra, has_state):
    args = [*FAST, f"method={method}", *extra]
    a, split = stop_then_resume(conf, tmp_path, *args)
    assert a["method"].rsplit(".", 2)[-2] == method
    saved = split / "checkpoint" / "task_1" / "method.safetensors"
    assert saved.is_file() == has_state
    if method == "seekr":  # the buffer (round(0.1 · 24) = 2 examples) and the chosen heads (3, all in 1 layer)
        from safetensors.torch import load_file

        state = load_file(saved)
        assert len(unpack_examples(state)) == 2
        assert state["heads"].dtype == torch.bool and int(state["heads"].sum()) == 3
        assert int(state["heads"].any(1).sum()) == 1 and state["scores"].shape == state["heads"].shape
    resume_and_compare(conf, split, a, *args)


def test_bad_hyper_parameter_is_refused_before_training(conf, tmp_path):  # the other keys are checked below
    with pytest.raises(AglclError, match="method.quantile"):
        train(conf, tmp_path / "run", "method=migu", "method.quantile=1.0")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("make", "key"), [
    (lambda: MIGU(quantile=0.0), "method.quantile"),
    (lambda: MIGU(quantile=1.0), "method.quantile"),
    (lambda: MIGU(quantile=-0.5), "method.quantile"),
    (lambda: MIGU(from_task=-1), "method.from_task"),
    (lambda: SEEKR(fraction=-0.1), "method.fraction"),
    (lambda: SEEKR(fraction=1.5), "method.fraction"),
    (lambda: SEEKR(ratio=1.0), "method.ratio"),
    (lambda: SEEKR(logits_weight=-0.5), "method.logits_weight"),
    (lambda: SEEKR(logits_weight=1.5), "method.logits_weight"),
    (lambda: SEEKR(attn_weight=-1.0), "method.attn_weight"),
    (lambda: SEEKR(layer_budget=0), "method.layer_budget"),
    (lambda: SEEKR(head_budget=0), "method.head_budget"),
])
def test_bad_hyper_parameters_name_the_key(make, key):
    with pytest.raises(AglclError) as info:
        make()
    assert key in str(info.value) and "\n" not in str(info.value)


# -- MIGU -----------------------------------------------------------------------------------------------------
class Toy(torch.nn.Module):
    """One Llama-named linear layer (4 → 5 units, with bias): ``mlp.up_proj``, plus an untargeted head."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.up_proj = torch.nn.Linear(4, 5)
        self.head = torch.nn.Linear(5, 1)
        with torch.no_grad():
            self.mlp.up_proj.weight.copy_(torch.eye(5, 4))  # unit j copies input j (unit 4: zero)
            self.mlp.up_proj.bias.zero_()

    def forward(self, x, attention_mask=None):
        return self.head(self.mlp.up_proj(x))


def test_unit_mask_keeps_units_at_or_above_the_quantile():
    magnitude = torch.tensor([1.0, 5.0, 3.0, 2.0, 4.0])
    assert unit_mask(magnitude, 0.5).tolist() == [False, True, True, False, True]  # quantile 3.0, ties kept
    assert unit_mask(magnitude, 0.7).tolist() == [False, True, False, False, True]  # 3.8


def test_migu_masks_exactly_the_low_magnitude_rows():
    model = Toy()
    migu = MIGU(quantile=0.6, from_task=1)
    # tokens [B=1, T=3, 4]; the padded last token is huge on unit 0 and must not count
    x = torch.tensor([[[1.0, -3.0, 0.5, 2.0], [-1.0, 1.0, 0.5, -2.5], [100.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # |y| summed over the 2 real tokens: [2, 4, 1, 4.5, 0] -> quantile 0.6 of 5 units = 2.8 -> keep units 1 and 3
    migu.before_task(0, None, model)  # not active yet: no hooks, no masking
    model(x, attention_mask=mask).sum().backward()
    migu.after_backward(model)
    assert (model.mlp.up_proj.weight.grad != 0).any(1).tolist() == [True, True, True, True, True]
    model.zero_grad()

    migu.before_task(1, None, model)
    for micro in (x[:, :2], x[:, :2]):  # two micro-batches of one step: magnitudes add up
        model(micro).sum().backward()
    with torch.no_grad():  # evaluation passes do not count
        model(x * 1000)
    migu.after_backward(model)
    weight, bias = model.mlp.up_proj.weight.grad, model.mlp.up_proj.bias.grad
    kept = [1, 3]
    assert (weight != 0).any(1).tolist() == [j in kept for j in range(5)]
    assert (bias != 0).tolist() == [j in kept for j in range(5)]
    assert torch.equal(model.head.weight.grad, torch.tensor([[0.0, -4.0, 2.0, -1.0, 0.0]]))  # not masked (unit 2)
    assert migu.magnitude == {}  # reset for the next step

    model.zero_grad()
    model(x, attention_mask=mask).sum().backward()  # the padding mask reaches the hook through the model's kwargs
    migu.after_backward(model)
    assert (model.mlp.up_proj.weight.grad != 0).any(1).tolist() == [j in kept for j in range(5)]
    migu.after_task(1, None, model, [])
    assert not model.mlp.up_proj._forward_hooks and not model._forward_pre_hooks


def test_migu_targets_every_attn_and_mlp_layer_of_the_tiny_llama(tiny):
    model, tok, data = tiny
    model = copy.deepcopy(model).train()
    migu = MIGU()
    migu.before_task(1, None, model)
    assert len(migu._targets) == 2 * 7  # q k v o gate up down, two blocks
    from aglcl.models.forward import lm_forward

    batch = collate(data["parity"][:4], tok.pad_token_id)
    lm_forward(model, batch).loss.backward()
    migu.after_backward(model)
    q = model.model.layers[0].self_attn.q_proj.weight.grad
    kept = (q != 0).any(1)
    assert 0 < int(kept.sum()) <= math.ceil(0.3 * q.size(0)) + 1
    migu.after_task(1, None, model, [])


# -- SEEKR ----------------------------------------------------------------------------------------------------
def test_select_heads_picks_the_top_heads_within_the_layer_budget():
    scores = torch.tensor([[5.0, 0.0, 0.0],    # layer sum 5
                           [4.0, 0.1, 0.0],    # 4.1: dropped by the layer budget, although head (1, 0) scores 4
                           [3.0, 2.9, 0.5]])   # 6.4
    chosen = select_heads(scores, layer_budget=2, head_budget=3)
    assert chosen.nonzero().tolist() == [[0, 0], [2, 0], [2, 1]]
    assert select_heads(scores, 5, 100).all()  # budgets are clamped to the model
    assert select_heads(scores, 1, 1).nonzero().tolist() == [[2, 0]]


def test_attention_kl_is_zero_for_identical_maps_and_matches_a_hand_computation(tiny):
    model, tok, data = tiny
    batch = collate(data["parity"][:3], tok.pad_token_id)
    keep = (batch["labels"][:, 1:] != IGNORE).any(0).nonzero().squeeze(-1)
    with torch.no_grad():
        _, maps = attention_forward(model, batch, keep)
    heads = torch.tensor([[True, False, True, False], [False, False, False, True]])
    assert attention_kl(maps, maps, batch["attention_mask"], heads).item() == 0.0
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.q_proj.weight.mul_(3.0)
        _, other = attention_forward(teacher, batch, keep)
    assert attention_kl(maps, other, batch["attention_mask"], heads).item() > 1e-4
    # by hand: layer 1, head 3 of example 0 only
    n = int(batch["attention_mask"][0].sum())
    one = torch.tensor([[False] * 4, [False, False, False, True]])
    t, s = other[1][0, 3, :n, :n], maps[1][0, 3, :n, :n]
    by_hand = (torch.xlogy(t, t) - torch.xlogy(t, s)).sum() / n
    got = attention_kl([m[:1] for m in maps], [m[:1] for m in other], batch["attention_mask"][:1], one)
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_eager_attention_is_switched_only_inside_the_block(tiny):
    model, _, _ = tiny
    assert model.config._attn_implementation == "sdpa"
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"


def test_seekr_buffer_heads_distillation_and_state(tiny):
    from aglcl.models.forward import lm_forward

    model, tok, data = tiny
    model = copy.deepcopy(model).train()
    seekr = SEEKR(fraction=0.1, layer_budget=1, head_budget=2)
    seekr.num_tasks = 3
    seekr.before_task(0, None, model)
    assert seekr.teacher is not None and seekr.teacher.config._attn_implementation == "eager"
    assert seekr.train_examples(0, None, data["parity"]) == data["parity"]
    with torch.no_grad():  # "train" task 0: move the model away from its copy
        model.model.layers[1].self_attn.k_proj.weight.mul_(2.0)
    seekr.after_task(0, None, model, data["parity"])
    assert len(seekr.replay.buffer) == round(0.1 * 24) and seekr.teacher is None
    assert seekr.scores.shape == (2, 4) and (seekr.scores >= 0).all() and seekr.scores.sum() > 0
    assert int(seekr.heads.sum()) == 2 and int(seekr.heads.any(1).sum()) == 1
    assert seekr.heads[seekr.scores.sum(1).argmax()].sum() == 2

    seekr.before_task(1, None, model)  # teacher == student: both distillation terms vanish
    mixed = seekr.train_examples(1, None, data["sign"])
    assert mixed == data["sign"] + seekr.replay.buffer
    batch = collate([data["sign"][0], seekr.replay.buffer[0], data["sign"][1], seekr.replay.buffer[1]],
                    tok.pad_token_id)
    assert seekr.replay_rows(batch) == [1, 3]
    outputs = lm_forward(model, batch)
    gold = batch["labels"][:, 1:]
    keep = (gold != IGNORE).any(0).nonzero().squeeze(-1)

    def without_kl(outputs):  # L_task − w·CE_R/N: the loss when both KL terms are 0
        ce = F.cross_entropy(outputs.logits[[1, 3]].reshape(-1, outputs.logits.size(-1)),
                             gold[:, keep][[1, 3]].reshape(-1), ignore_index=IGNORE, reduction="sum")
        return (outputs.loss - 0.5 * ce / (gold != IGNORE).sum()).item()

    assert seekr.loss(model, batch, outputs).item() == pytest.approx(without_kl(outputs), abs=1e-5)
    assert seekr.loss(model, collate(data["sign"][:2], tok.pad_token_id), outputs) is outputs.loss
    with torch.no_grad():
        model.model.layers[seekr.heads.any(1).nonzero().item()].self_attn.q_proj.weight.mul_(3.0)
    outputs = lm_forward(model, batch)
    loss = seekr.loss(model, batch, outputs)
    assert loss.item() > without_kl(outputs) + 1e-4
    loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None

    state = seekr.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())
    again = SEEKR(fraction=0.1, layer_budget=1, head_budget=2)
    again.load_state_dict({k: v.clone() for k, v in state.items()})
    assert again.replay.buffer == seekr.replay.buffer
    assert torch.equal(again.heads, seekr.heads) and torch.equal(again.scores, seekr.scores)
    assert SEEKR().state_dict() == {}


def test_head_scores_vanish_when_the_task_changed_no_attention(tiny):
    model, _, data = tiny
    scores = head_scores(model, copy.deepcopy(model), data["parity"][:2], 0)
    assert scores.shape == (2, 4) and scores.abs().max().item() == 0.0
