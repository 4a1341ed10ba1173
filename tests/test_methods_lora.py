"""Every baseline that makes sense under LoRA runs with ``peft=lora`` (2 tasks x 2 steps each, in-process)."""

from __future__ import annotations

import math

import pytest
from conftest import train

# olora manages its own adapters and refuses peft=lora (tests/test_olora.py); agft under LoRA: tests/test_agft.py;
# freeze defaults to blocks 0-5, which the 2-block tiny model lacks: it gets method.layers=[0,1]
# seqft, replay and multitask only change which examples train: their LoRA path is seqft's (covered by agft's)
METHODS = {"ewc": [], "lwf": [], "migu": [], "seekr": [], "single": [], "freeze": ["method.layers=[0,1]"]}


@pytest.mark.parametrize("method", METHODS)
def test_baselines_train_under_lora(conf, tmp_path, method):
    results = train(conf, tmp_path / "run", "peft=lora", "trainer.lr=5e-3", f"method={method}", *METHODS[method])
    assert results["method"].rsplit(".", 2)[-2] == method
    assert all(math.isfinite(results["train"][t]["loss"]) for t in results["tasks"]), method
