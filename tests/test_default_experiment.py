"""The packaged SmolLM2 (converted from its GGUF once per session) and the embedded default experiment on it
(the three offline tasks), two steps per task."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from conftest import run_cli

from aglcl.models import load_causal_lm
from aglcl.models.packaged import resolve_packaged

pytestmark = pytest.mark.slow  # loads the packaged SmolLM2


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A fresh cache with the packaged SmolLM2 converted into it, once for all xdist workers (the second
    waits on a file lock); ``(cache dir, model dir, seconds the conversion took)``."""
    from filelock import FileLock

    pytest.importorskip("gguf")
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "smollm2_cache"  # this session's
    took = root.parent / "smollm2_convert_s.txt"
    with FileLock(f"{root}.lock"):
        first, t0 = not took.is_file(), time.perf_counter()
        path = resolve_packaged("smollm2-135m-instruct", root)  # converts the first time, else finds it
        if first:
            took.write_text(str(time.perf_counter() - t0))
    return root, path, float(took.read_text())


def test_packaged_smollm2(cache):
    root, path, convert_s = cache
    assert path == (root / "models" / "smollm2-135m-instruct").resolve()
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert "quantization_config" not in (path / "config.json").read_text()
    assert [p.name for p in path.parent.iterdir()] == ["smollm2-135m-instruct"]  # no temp dir left

    t0 = time.perf_counter()
    model, tok = load_causal_lm("packaged://smollm2-135m-instruct", cache_dir=root)
    load_s = time.perf_counter() - t0
    assert load_s < convert_s  # the second time, the converted weights are read back, not converted again
    assert model.dtype == torch.float32 and not getattr(model, "is_quantized", False)
    assert tok.pad_token is not None and tok.chat_template

    tok.padding_side = "left"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    batch = tok([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2

    model.train()
    ids = tok(["The capital of France is Paris."], return_tensors="pt")["input_ids"]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)


@pytest.mark.integration  # the CLI as a child process
def test_default_experiment_runs_offline_for_two_steps(cache, tmp_path, monkeypatch):
    cache = cache[0]
    monkeypatch.setenv("AGLCL_CACHE_DIR", str(cache))  # data prepared here; the GGUF was converted here
    run = tmp_path / "run"
    proc = run_cli("train", "debug=fast", "limit.eval=4", "attribution.estimator.num_samples=4", f"hydra.run.dir={run}",
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == ["bbc_topic", "tweet_sentiment", "chat_topic"]
    assert all(stats["steps"] == 2 for stats in results["train"].values())
    assert (cache / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert (cache / "data" / "bbc_topic" / "test.json").is_file()
