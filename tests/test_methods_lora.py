"""Every baseline that makes sense under LoRA runs with ``peft=lora`` (one multirun, 2 tasks x 2 steps each)."""

from __future__ import annotations

import json
import math

from conftest import make_fixture_conf, run_cli, tiny_overrides

# olora manages its own adapters and refuses peft=lora (tests/test_olora.py); agft under LoRA: tests/test_agft.py;
# freeze defaults to blocks 0-5, which the 2-block tiny model lacks: it runs on its own below
# seqft, replay and multitask only change which examples train: their LoRA path is seqft's (covered by agft's)
METHODS = ["ewc", "lwf", "migu", "seekr", "single"]


def test_baselines_train_under_lora(tmp_path):
    conf = make_fixture_conf(tmp_path)
    sweep = tmp_path / "sweep"
    args = [a for a in tiny_overrides(conf, tmp_path / "unused") if not a.startswith("hydra.run.dir")]
    proc = run_cli("train", "-m", *args, f"hydra.sweep.dir={sweep}", "peft=lora", "trainer.lr=5e-3",
                   f"method={','.join(METHODS)}", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert len(jobs) == len(METHODS)
    for job, method in zip(jobs, METHODS):
        results = json.loads((job / "results.json").read_text())
        assert results["method"].rsplit(".", 2)[-2] == method
        assert all(math.isfinite(results["train"][t]["loss"]) for t in results["tasks"]), method


def test_freeze_runs_under_lora(tmp_path):
    conf = make_fixture_conf(tmp_path)
    run = tmp_path / "run"
    proc = run_cli("train", *tiny_overrides(conf, run), "peft=lora", "trainer.lr=5e-3", "method=freeze",
                   "method.layers=[0,1]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert all(math.isfinite(results["train"][t]["loss"]) for t in results["tasks"])
