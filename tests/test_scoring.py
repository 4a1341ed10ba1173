"""Scoring strategies on the tiny model: shared-prompt label scoring equals full-sequence scoring."""

from __future__ import annotations

import pytest
import torch

from aglcl.data.collate import collate, encode
from aglcl.data.scoring import GreedyGeneration, LabelLikelihood, label_logprobs
from aglcl.data.tasks import Task
from aglcl.models import build_tiny


def _full_sequence_logprob(model, tokenizer, prompt, answer):
    row = encode(tokenizer, prompt, answer, 256)
    batch = collate([row], tokenizer.pad_token_id)
    logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    targets = batch["labels"][0, 1:]
    keep = targets != -100
    return torch.log_softmax(logits[keep], -1).gather(-1, targets[keep, None]).sum().item()


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny(seed=3)
    return model.eval(), tokenizer


@pytest.mark.parametrize("impl, tree", [("sdpa", True), ("eager", True), ("sdpa", False)])
def test_shared_prompt_scores_equal_full_sequence_scores(tiny, monkeypatch, impl, tree):
    """Every label, scored after the prompt's cache, as a tree in one row (eager, sdpa) or on a cache repeated
    per label (kernels that take no 4-D mask): the log-probability of prompt + label in one sequence."""
    from aglcl.data import scoring

    model, tok = tiny
    monkeypatch.setattr(model.config, "_attn_implementation", impl)
    if not tree:
        monkeypatch.setattr(scoring, "TREE_KERNELS", ())
    prompts = ["Is 4 even or odd? Answer:", "A much longer prompt, to force left padding. Answer:"]
    labels = [" even", " odd", " neither of them"]
    from aglcl.data.collate import encode_answer

    got = label_logprobs(model, tok.pad_token_id, [tok(p).input_ids for p in prompts],
                         [encode_answer(tok, lab) for lab in labels])
    want = torch.tensor([[_full_sequence_logprob(model, tok, p, lab) for lab in labels] for p in prompts])
    assert torch.allclose(got, want, atol=1e-4)


def test_the_prompt_pass_computes_logits_at_the_last_position_only(tiny, monkeypatch):
    """``logits_to_keep=1`` on the prompt pass (no full-vocabulary logits at every prompt position) gives the
    scores the full computation gives."""
    from aglcl.data import scoring
    from aglcl.data.collate import encode_answer

    model, tok = tiny
    prompts = [tok(p).input_ids for p in ["Is 4 even or odd? Answer:", "A longer prompt, left-padded. Answer:"]]
    labels = [encode_answer(tok, lab) for lab in (" even", " odd", " neither of them")]
    shapes = []
    original = type(model).forward

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        shapes.append(tuple(out.logits.shape))
        return out

    monkeypatch.setattr(type(model), "forward", recording)
    fast = label_logprobs(model, tok.pad_token_id, prompts, labels)
    assert shapes[0][1] == 1  # the prompt pass: one position's logits
    monkeypatch.setattr(scoring, "accepts", lambda model, name: False)  # as a model without logits_to_keep
    full = label_logprobs(model, tok.pad_token_id, prompts, labels)
    assert shapes[2][1] == max(len(p) for p in prompts)
    assert torch.allclose(fast, full, atol=1e-6)


def test_label_likelihood_predicts_labels_and_scores_them(tiny):
    model, tok = tiny
    task = Task(name="t", template="{prompt}", answer_prefix=" ", metric="accuracy", scoring=None,
                train=[{"prompt": "x", "answer": "yes"}, {"prompt": "y", "answer": "no"}])
    examples = [{"prompt": f"Q{i}:", "answer": "yes" if i % 2 else "no"} for i in range(5)]
    preds, scores = LabelLikelihood()(model, tok, task, examples, batch_size=2, max_length=64)
    assert len(preds) == 5 and set(preds) <= {"yes", "no"}
    assert scores == [float(p == ex["answer"]) for p, ex in zip(preds, examples)]


def test_greedy_generation_returns_one_line_per_example(tiny):
    model, tok = tiny
    task = Task(name="t", template="{prompt}", answer_prefix=" ", metric="rouge_l", scoring=None)
    examples = [{"prompt": "Hello", "answer": "world"}, {"prompt": "Hi there, how", "answer": "are you"}]
    preds, scores = GreedyGeneration(max_new_tokens=4)(model, tok, task, examples, batch_size=2, max_length=32)
    assert len(preds) == 2 and all("\n" not in p for p in preds)
    assert all(0.0 <= s <= 1.0 for s in scores)


def test_answer_only_forward_matches_the_library_loss(tiny):
    from aglcl.models.forward import lm_forward

    model, tok = tiny
    rows = [encode(tok, "a prompt of some length", " yes", 64), encode(tok, "short", " no way", 64)]
    batch = collate(rows, tok.pad_token_id)
    ours = lm_forward(model, batch)
    ref = model(**batch)
    assert torch.allclose(ours.loss, ref.loss, atol=1e-5)
    assert ours.logits.shape[1] < ref.logits.shape[1]  # only answer positions went through the head


@pytest.mark.parametrize("scorer", [LabelLikelihood(), GreedyGeneration(max_new_tokens=3)], ids=["labels", "generation"])
def test_length_batches_give_each_example_its_own_prediction(tiny, scorer, monkeypatch):
    """Batched by length (longest first), predictions still come back in the examples' order: the same as
    scoring every example alone. (The tiny model gives one label to every prompt, so label scoring here
    prefers the label picked by the prompt's length: a mix-up of rows shows.)"""
    from aglcl.data import scoring
    from aglcl.data.scoring import by_length

    def by_prompt_length(model, pad_id, prompts, labels):
        return torch.tensor([[float(len(p) % 2 == k) for k in range(len(labels))] for p in prompts])

    monkeypatch.setattr(scoring, "label_logprobs", by_prompt_length)
    model, tok = tiny
    task = Task(name="t", template="{prompt}", answer_prefix=" ", metric="accuracy", scoring=None,
                train=[{"prompt": "x", "answer": "yes"}, {"prompt": "y", "answer": "no"}])
    examples = [{"prompt": "Q " * n + f"{n}:", "answer": "yes"} for n in (1, 9, 3, 12, 2, 7, 5)]
    batched, _ = scorer(model, tok, task, examples, batch_size=3, max_length=64)
    alone = [scorer(model, tok, task, [ex], batch_size=1, max_length=64)[0][0] for ex in examples]
    assert batched == alone and len(set(batched)) > 1
    # lengths 12, 9, 7 | 5, 3, 2 | 1: each batch pads to its own longest prompt
    assert by_length([["a"] * n for n in (1, 9, 3, 12, 2, 7, 5)], 3) == [[3, 1, 5], [6, 2, 4], [0]]


def test_eval_precision_overrides_the_training_autocast_and_puts_it_back():
    """Under ``trainer.precision=bf16`` accelerate autocasts the model's forward: ``auto`` keeps that, ``fp32``
    scores without it (the plain fp32 forward, exactly), ``bf16`` with a bf16 autocast; it is back afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from aglcl.engine.config import TrainerConfig
    from aglcl.engine.evaluate import scoring_precision
    from aglcl.errors import AglclError

    model, tok = build_tiny(seed=3)
    model.eval()
    ids = tok(["Is 4 even or odd? Answer:"], return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(input_ids=ids).logits.float()
        try:
            prepared = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
            trained = prepared(input_ids=ids).logits
            assert not torch.equal(trained, plain)  # the training autocast is on
            got = {}
            for precision in ("auto", "fp32", "bf16"):
                with scoring_precision(prepared, precision):
                    got[precision] = prepared(input_ids=ids).logits.float()
            assert torch.equal(prepared(input_ids=ids).logits, trained)  # the wrapper is back
        finally:
            AcceleratorState._reset_state(True)
    assert torch.equal(got["auto"], trained.float())
    assert torch.equal(got["fp32"], plain)
    assert torch.allclose(got["bf16"], half, atol=0.05)
    with pytest.raises(AglclError, match=r"trainer.eval_precision='fp16' is invalid; choose from: .*fp32"):
        TrainerConfig(eval_precision="fp16")
