"""Importance estimators, parameter selection and the LRP rules, on tiny models built in-test."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from aglcl.attribution.estimators import LRP, MAS, Fisher, GradXWeight, IntegratedGradients
from aglcl.attribution.lrp import ATTN_NAME, lrp_rules
from aglcl.attribution.params import select_params
from aglcl.data.collate import IGNORE, collate, encode
from aglcl.errors import AglclError
from aglcl.models import build_tiny

ROWS = [("Is 3 even or odd? Answer:", " odd"), ("Is 8 even or odd? Answer:", " even"),
        ("Is -2 negative? Answer:", " yes"), ("Is 7 even or odd? Answer:", " odd")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def llama(**kw):
    model, tok = build_tiny(hidden_size=32, intermediate_size=64, **kw)
    return model, tok


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64, bos_token_id=0,
                            eos_token_id=0)
        return GPT2LMHeadModel(config).eval()


def examples(tok, rows=ROWS):
    return [encode(tok, p, a, 48) for p, a in rows]


def shuffled(exs, n, seed=0):
    order = list(range(len(exs)))
    random.Random(seed).shuffle(order)
    return [exs[i] for i in order[:n]]


def manual_grads(model, exs, params, target="predicted_logit"):
    """Per-example gradients of the target, computed by hand on the full logits."""
    out = []
    for ex in exs:
        b = collate([ex], 0)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[0, :-1].float()
        gold = b["labels"][0, 1:]
        z, y = logits[gold != IGNORE], gold[gold != IGNORE]
        t = z.max(-1).values.sum() if target == "predicted_logit" else z.log_softmax(-1)[torch.arange(len(y)), y].sum()
        out.append(dict(zip(params, torch.autograd.grad(t, list(params.values())), strict=True)))
    return out


def close(a: dict, b: dict, atol=1e-5, rtol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=k)


def greedy_example(model, tok, prompt, n=2, wrong=False):
    """A 2-token answer equal to the model's own greedy continuation (so correct under teacher forcing), or
    with its first token shifted (so incorrect)."""
    ids = tok(prompt).input_ids
    start = len(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    if wrong:
        ids[start] = (ids[start] + 1) % model.config.vocab_size
    return {"input_ids": ids, "labels": [IGNORE] * start + ids[start:]}


# -- parameter selection ------------------------------------------------------------------------------------

def test_select_llama_and_gpt2():
    model, _ = llama()
    names = list(select_params(model))
    assert len(names) == 7 * 2 and all(n.endswith(".weight") for n in names)
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.1.mlp.down_proj.weight" in names
    assert set(select_params(model, ["embed"])) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert "model.norm.weight" in select_params(model, ["norm"])
    names = list(select_params(gpt2(), ("attn", "mlp")))
    assert names[:4] == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                         "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]
    assert len(names) == 8
    assert set(select_params(gpt2(), ["norm"])) >= {"transformer.h.0.ln_1.weight", "transformer.ln_f.weight"}


def test_select_lora_base_weights():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama()[0], LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    names = list(select_params(model))
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in names
    assert "base_model.model.model.layers.0.self_attn.k_proj.weight" in names
    assert len(names) == 14 and not any("lora" in n for n in names)
    with_lora = select_params(model, ("attn", "lora"))
    assert sum("lora_A" in n or "lora_B" in n for n in with_lora) == 2 * 2 * 2


def test_select_errors():
    model, _ = llama()
    with pytest.raises(AglclError, match="valid groups: 'attn', 'embed', 'lora', 'mlp', 'norm'"):
        select_params(model, ["attention"])
    with pytest.raises(AglclError, match="matches no parameter"):
        select_params(nn.Sequential(nn.Linear(2, 2)))


# -- estimators against hand computations -------------------------------------------------------------------

def test_grad_x_weight_and_fisher_match_manual():
    model, tok = llama()
    exs = examples(tok)
    params = select_params(model)
    chosen = shuffled(exs, 3)
    got = GradXWeight(num_samples=3, batch_size=1, correct_only=False)(model, exs, 0)
    grads = manual_grads(model, chosen, params)
    close(got, {n: torch.stack([(g[n] * params[n]).abs() for g in grads]).mean(0) for n in params})

    got = Fisher(num_samples=3, batch_size=1, correct_only=False)(model, exs, 0)
    grads = manual_grads(model, chosen, params, target="gold_logprob")
    close(got, {n: torch.stack([g[n] ** 2 for g in grads]).mean(0) for n in params}, atol=1e-8)


@pytest.mark.parametrize("reduction", ["mean", "max", "topk_mean"])
def test_transform_and_reductions(reduction):
    model, tok = llama()
    exs = examples(tok)
    params = select_params(model)
    grads = manual_grads(model, exs, params)
    got = GradXWeight(num_samples=4, batch_size=1, correct_only=False, transform="log1p", reduction=reduction,
                      topk=2)(model, exs, 0)
    want = {}
    for n, p in params.items():
        c = torch.stack([torch.log1p((g[n] * p).abs()) for g in grads])
        want[n] = {"mean": c.mean(0), "max": c.max(0).values, "topk_mean": c.topk(2, dim=0).values.mean(0)}[reduction]
    close(got, want)


def test_topk_larger_than_samples_is_plain_mean():
    model, tok = llama()
    exs = examples(tok)
    a = GradXWeight(num_samples=3, batch_size=1, correct_only=False, reduction="topk_mean", topk=5)(model, exs, 0)
    close(a, GradXWeight(num_samples=3, batch_size=1, correct_only=False)(model, exs, 0))


def test_correct_only_masks_incorrect_samples():
    model, tok = llama()
    right = greedy_example(model, tok, "Is 3 even?")
    wrong = [greedy_example(model, tok, p, wrong=True) for p in ("Is 4 odd?", "Hello there")]
    alone = GradXWeight(num_samples=1, correct_only=False)(model, [right], 0)
    assert any(v.abs().sum() > 0 for v in alone.values())
    for batch_size in (1, 3):  # per-sample skip, and masking inside one micro-batch
        got = GradXWeight(num_samples=3, batch_size=batch_size, correct_only=True)(model, [right, *wrong], 0)
        close(got, alone)
    with pytest.warns(UserWarning, match="no attribution sample is answered correctly"):
        got = GradXWeight(num_samples=3, batch_size=1, correct_only=True)(model, wrong, 0)
    close(got, GradXWeight(num_samples=3, batch_size=1, correct_only=False)(model, wrong, 0))


def test_integrated_gradients_path_and_restore():
    model, tok = llama()
    exs = examples(tok)
    params = select_params(model)
    est = IntegratedGradients(steps=1, num_samples=2, batch_size=1, correct_only=False)
    with pytest.raises(AglclError, match="pre-task weights"):
        est(model, exs, 0)
    est.before_task(model)
    with pytest.warns(UserWarning, match="did not change"):
        est(model, exs, 0)
    pre = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():  # "train" the task
        for p in params.values():
            p.add_(0.02 * torch.randn_like(p))
    post = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = est(model, exs, 0)
    assert all(torch.equal(p, post[n]) for n, p in model.named_parameters())
    grads = manual_grads(model, shuffled(exs, 2), params)
    close(got, {n: torch.stack([((params[n] - pre[n]) * g[n]).abs() for g in grads]).mean(0) for n in params})

    many = IntegratedGradients(steps=3, num_samples=2, batch_size=2, correct_only=False)
    many._pre = est._pre
    out = many(model, exs, 0)
    assert all(torch.equal(p, post[n]) for n, p in model.named_parameters())
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in out.values())
    assert not all(torch.allclose(out[n], got[n]) for n in out)


def test_mas_shapes_nonnegative():
    model, tok = llama()
    params = select_params(model)
    got = MAS(num_samples=4, batch_size=2, correct_only=False)(model, examples(tok), 0)
    assert got.keys() == params.keys()
    for n, v in got.items():
        assert v.shape == params[n].shape and v.dtype == torch.float32 and v.device.type == "cpu"
        assert (v >= 0).all() and v.sum() > 0


def test_estimators_restore_model_state():
    model, tok = llama()
    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].mlp.eval()
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    for est in (GradXWeight(num_samples=2), LRP(num_samples=2, reduction="topk_mean", transform="log1p")):
        with pytest.warns(UserWarning, match="answered correctly"):  # a random model: the fallback path
            est(model, examples(tok), 0)
        assert all(p.grad is None for p in model.parameters())
        assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
        assert modes == {n: m.training for n, m in model.named_modules()}


def test_lora_model_attributed_in_weight_space():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama()[0], LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = GradXWeight(num_samples=2, correct_only=False)(model, examples(build_tiny()[1]), 0)
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    assert got[key].sum() > 0 and not flags[key]
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"num_samples": 0}, "num_samples"), ({"batch_size": 0}, "batch_size"), ({"topk": 0}, "topk"),
    ({"target": "logit"}, "target"), ({"transform": "log"}, "transform"), ({"reduction": "sum"}, "reduction"),
    ({"include": ["ffn"]}, "include"),
])
def test_validation_errors(kwargs, key):
    with pytest.raises(AglclError) as err:
        GradXWeight(**kwargs)
    message = str(err.value)
    assert f"attribution.estimator.{key}" in message and "\n" not in message
    if key == "reduction":
        assert "'max', 'mean', 'topk_mean'" in message
    with pytest.raises(AglclError, match="attribution.estimator.steps"):
        IntegratedGradients(steps=0)
    with pytest.raises(AglclError, match="attribution.estimator.epsilon"):
        LRP(epsilon=-1.0)


def test_no_answer_tokens_is_an_error():
    model, tok = llama()
    ex = {"input_ids": [1, 40, 41], "labels": [IGNORE] * 3}
    with pytest.raises(AglclError, match="no example has an answer token"):
        GradXWeight(correct_only=False)(model, [ex], 0)


# -- LRP rules ----------------------------------------------------------------------------------------------

class GatedBlock(nn.Module):
    """Bias-free ``x + MLP(RMSNorm(x))`` with Llama's own modules."""

    def __init__(self):
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        super().__init__()
        config = LlamaConfig(hidden_size=32, intermediate_size=64)
        self.norm, self.mlp = LlamaRMSNorm(32), LlamaMLP(config)
        nn.init.normal_(self.norm.weight, 1.0, 0.3)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


def test_lrp_conserves_relevance_on_gated_block():
    torch.manual_seed(0)
    block, x, c = GatedBlock(), torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 5, 32)
    outs = {}
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(block.mlp, name).register_forward_hook(lambda m, i, o, name=name: outs.__setitem__(name, o))
    plain = torch.autograd.grad((block(x) * c).sum(), x)[0]
    with lrp_rules(block):
        y = block(x)
        for o in outs.values():
            o.retain_grad()
        score = (y * c).sum()
        score.backward()
    relevance = (x * x.grad).sum()
    assert abs(relevance - score) / score.abs() < 1e-4
    assert not torch.allclose(x.grad, plain)
    for name, z in outs.items():  # one Linear: Σ W ⊙ g̃_W = Σ z ⊙ g̃_z (its output relevance)
        w = getattr(block.mlp, name).weight
        torch.testing.assert_close((w * w.grad).sum(), (z * z.grad).sum(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lrp_forward_unchanged_and_undone(family, impl):
    model = llama()[0] if family == "llama" else gpt2()
    model.config._attn_implementation = impl
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 11, 12, 0, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    before = model(input_ids=ids, attention_mask=mask).logits
    with lrp_rules(model):
        assert model.config._attn_implementation == (ATTN_NAME if impl == "eager" else f"{ATTN_NAME}_{impl}")
        inside = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(inside, before)  # bit-exact: the model's own attention kernel, the same mask
    with pytest.raises(RuntimeError, match="boom"), lrp_rules(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == impl
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lrp_fused_attention_gives_the_eager_rules_relevance(family):
    """The fused kernel with gradient scales (1/4 q, 1/4 k, 1/2 v) and the uniform rule written out in eager
    matmuls give the same weight relevance (llama: GQA, 4 heads over 2 kv heads; padded rows)."""
    model = llama()[0] if family == "llama" else gpt2()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 11, 12, 13, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    grads = {}
    for impl in ("sdpa", "eager"):
        model.config._attn_implementation = impl
        model.zero_grad(set_to_none=True)
        with lrp_rules(model):
            logits = model(input_ids=ids, attention_mask=mask).logits
            logits[:, -3:].max(-1).values.sum().backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if "attn" in n and p.grad is not None}
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, attention_mask=mask).logits[:, -3:].max(-1).values.sum().backward()
    assert grads["sdpa"] and grads["sdpa"].keys() == grads["eager"].keys()
    for name, g in grads["sdpa"].items():
        torch.testing.assert_close(g, grads["eager"][name], rtol=1e-4, atol=1e-6)
    assert not all(torch.allclose(g, model.get_parameter(n).grad) for n, g in grads["sdpa"].items())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lrp_estimator_runs(family):
    if family == "llama":
        model, tok = llama()
    else:
        model, tok = gpt2(), build_tiny()[1]
    exs = examples(tok)
    lrp = LRP(num_samples=3, batch_size=2, correct_only=False, transform="log1p", reduction="topk_mean")(model, exs, 0)
    gxw = GradXWeight(num_samples=3, batch_size=2, correct_only=False, transform="log1p",
                      reduction="topk_mean")(model, exs, 0)
    assert lrp.keys() == gxw.keys()
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in lrp.values())
    assert not all(torch.allclose(lrp[n], gxw[n]) for n in lrp)
