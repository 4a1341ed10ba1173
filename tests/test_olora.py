"""O-LoRA (aglcl/methods/olora.py): CLI run + resume, the orthogonality term, frozen-but-active old adapters."""

from __future__ import annotations

import pytest
import torch
from conftest import TASKS, resume_and_compare, stop_then_resume, train

from aglcl.data.collate import collate, encode
from aglcl.errors import AglclError
from aglcl.methods.olora import OLoRA, adapter_name, orthogonality
from aglcl.models.forward import lm_forward

FAST = ["trainer.lr=5e-3"]


# -- CLI ------------------------------------------------------------------------------------------------------
def test_olora_runs_and_resumes_like_an_unbroken_run(conf, tmp_path):
    from safetensors import safe_open

    args = [*FAST, "method=olora"]
    a, split = stop_then_resume(conf, tmp_path, *args)
    assert a["method"] == "aglcl.methods.olora.OLoRA"
    assert not (split / "checkpoint" / "method.safetensors").exists()  # the adapters live in the model weights
    with safe_open(split / "checkpoint" / "task_1" / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any(".lora_A.task_0." in k for k in keys) and not any(".task_1." in k for k in keys)
    resume_and_compare(conf, split, a, *args)


def test_bad_hyper_parameter_is_refused_before_training(conf, tmp_path):
    with pytest.raises(AglclError, match="method.lambda_1"):
        train(conf, tmp_path / "run", "method=olora", "method.lambda_1=-1")
    assert not (tmp_path / "run").exists()


def test_peft_lora_with_olora_is_refused(conf, tmp_path):
    with pytest.raises(AglclError, match="peft=none"):
        train(conf, tmp_path / "run", "method=olora", "peft=lora")


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"lambda_1": -0.5}, "method.lambda_1"),
    ({"lambda_2": -1.0}, "method.lambda_2"),
    ({"r": 0}, "method.r"),
    ({"r": 2.5}, "method.r"),
    ({"alpha": 0}, "method.alpha"),
    ({"dropout": 1.0}, "method.dropout"),
    ({"target_modules": []}, "method.target_modules"),
])
def test_bad_hyper_parameters_name_the_key(kwargs, key):
    with pytest.raises(AglclError) as info:
        OLoRA(**kwargs)
    assert key in str(info.value) and "\n" not in str(info.value)


# -- the orthogonality term -----------------------------------------------------------------------------------
def test_orthogonality_is_zero_for_orthogonal_rows_and_positive_otherwise():
    eye = torch.eye(6)
    old, new = [eye[:2], eye[2:3]], eye[3:5]
    assert orthogonality(old, new).item() == 0.0
    assert orthogonality([], new).item() == 0.0
    skew = new + 0.5 * eye[0] - 0.25 * eye[2]  # each new row picks up +0.5 e0 and -0.25 e2
    assert orthogonality(old, skew).item() == pytest.approx(2 * 0.5 + 2 * 0.25)
    a, b = torch.randn(3, 8), torch.randn(4, 8)
    assert orthogonality([a], b).item() == pytest.approx(float((a @ b.T).abs().sum()), rel=1e-6)


# -- adapters: one per task, old ones frozen and active ---------------------------------------------------------
def _train(model, method, batch, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        loss = method.loss(model, batch, lm_forward(model, batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return params


def _adapter(model, name):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


def test_old_adapter_stays_frozen_and_active():
    from aglcl.models import build_tiny

    torch.manual_seed(0)
    base, tok = build_tiny()
    method = OLoRA(r=4, dropout=0.0, lambda_2=0.01)
    model = method.setup(base, 2, 0)
    batch = collate([encode(tok, p + " Answer:", " " + a, 64) for p, a in TASKS["parity"][:4]], tok.pad_token_id)

    method.before_task(0, None, model)
    assert method._orth == [] and method.penalty().item() > 0  # the L2 term on task 0's factors
    params = _train(model, method, batch)
    assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if ".task_0." in n}
    first = _adapter(model, adapter_name(0))

    method.before_task(1, None, model)
    assert model.base_model.active_adapters == [adapter_name(0), adapter_name(1)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".task_1." in n for n in trainable)
    by_hand = sum(float((layer.lora_A["task_0"].weight @ layer.lora_A["task_1"].weight.T).abs().sum().detach())
                  for layer in model.modules() if hasattr(layer, "lora_A") and "task_1" in layer.lora_A)
    l2 = sum(float(p.detach().pow(2).sum()) for n, p in model.named_parameters() if ".task_1." in n)
    assert method.penalty().item() == pytest.approx(0.5 * by_hand + 0.01 * l2, rel=1e-5)
    second = _adapter(model, adapter_name(1))
    _train(model, method, batch)

    assert all(torch.equal(p, first[n]) for n, p in _adapter(model, adapter_name(0)).items())
    assert any(not torch.equal(p, second[n]) for n, p in _adapter(model, adapter_name(1)).items())
    model.eval()
    with torch.no_grad():
        both = lm_forward(model, batch).logits
        model.base_model.set_adapter([adapter_name(1)], inference_mode=True)  # task 0's adapter left out
        without = lm_forward(model, batch).logits
    assert not torch.allclose(both, without)


def test_target_modules_that_match_nothing_name_the_key():
    from aglcl.models import build_tiny

    base, _ = build_tiny()
    with pytest.raises(AglclError, match=r"method\.target_modules"):
        OLoRA(target_modules=["no_such_proj"]).setup(base, 2, 0)
