"""The embedded default experiment (packaged SmolLM2 on the three offline tasks), two steps per task."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

pytestmark = pytest.mark.integration  # subprocesses: the CLI's exit codes, signals, torchrun


@pytest.mark.slow
def test_default_experiment_runs_offline_for_two_steps(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("AGLCL_CACHE_DIR", str(cache))  # a fresh cache: data prepared, GGUF converted here
    run = tmp_path / "run"
    proc = run_cli("train", "debug=fast", "limit.eval=4", "attribution.estimator.num_samples=4", f"hydra.run.dir={run}",
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == ["bbc_topic", "tweet_sentiment", "chat_topic"]
    assert all(stats["steps"] == 2 for stats in results["train"].values())
    assert (cache / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert (cache / "data" / "bbc_topic" / "test.json").is_file()
