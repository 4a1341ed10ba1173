"""``aglcl train method=agft`` end to end on the tiny model (in-process): maps written, gate active, eval reads them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_fixture_conf, run_cli, train

from aglcl.attribution import store


@pytest.fixture(scope="module")
def agft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("agft")
    conf = make_fixture_conf(root)
    run = root / "run"
    train(conf, run, "method=agft", "attribution=grad_x_weight", "attribution.after_last=true",
          "attribution.estimator.correct_only=false")
    return root, conf, run


def test_agft_writes_per_task_and_combined_maps(agft_run):
    _, _, run = agft_run
    maps = sorted(p.name for p in (run / "importance").iterdir())
    assert maps == ["combined.safetensors", "task_1_parity.safetensors", "task_2_sign.safetensors"]
    combined, meta = store.load_map(run / "importance" / "combined.safetensors")
    assert meta["estimator"] == "GradXWeight" and meta["normalize"] == "rank" and meta["tasks"] == "2"
    assert all(0.0 <= float(t.min()) and float(t.max()) <= 1.0 for t in combined.values())
    assert any("q_proj" in name for name in combined) and not any("embed" in name for name in combined)
    first, _ = store.load_map(run / "importance" / "task_1_parity.safetensors")
    second, _ = store.load_map(run / "importance" / "task_2_sign.safetensors")
    for name, value in combined.items():  # max-combine, up to the uint8 step
        assert torch.allclose(value, torch.maximum(first[name], second[name]), atol=1 / 255 + 1e-6)
    results = json.loads((run / "results.json").read_text())
    assert set(results["timings"]["attribution_s"]) == {"parity", "sign"}
    stages = results["timings"]["eval_s_by_stage"]  # each evaluation stage, the initial model's first
    assert list(stages) == ["initial", "parity", "sign"]
    assert sum(stages.values()) == pytest.approx(results["timings"]["eval_s"])
    assert results["method"] == "aglcl.methods.agft.AGFT"


@pytest.mark.integration
def test_eval_reports_importance_per_layer_and_overlap(agft_run):
    root, _, run = agft_run
    out = root / "eval"
    proc = run_cli("eval", f"run_dir={run}", f"hydra.run.dir={out}", cwd=root)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "importance.json").read_text())
    assert report["tasks"] == ["parity", "sign"]
    assert report["overlap"][0][0] == pytest.approx(1.0)
    assert 0.0 <= report["overlap"][0][1] <= 1.0
    assert (out / "importance_by_layer.png").stat().st_size > 0
    assert "Overlap" in proc.stdout


@pytest.mark.parametrize("estimator", ["fisher", "mas", "integrated_gradients", "lrp"])
def test_every_estimator_runs_in_the_cli(agft_run, tmp_path, estimator):
    _, conf, _ = agft_run
    run = tmp_path / "run"
    train(conf, run, "method=agft", f"attribution={estimator}", "method.mode=grad",
          "attribution.estimator.num_samples=4")
    assert (run / "importance" / "combined.safetensors").is_file()


def test_agft_without_attribution_is_refused(agft_run, tmp_path):
    _, conf, _ = agft_run
    from aglcl.errors import AglclError

    with pytest.raises(AglclError, match="attribution="):
        train(conf, tmp_path / "run", "method=agft", "attribution=none")


def test_restore_reads_the_maps_and_refuses_a_mismatched_model(agft_run):
    from aglcl.attribution.estimators import GradXWeight
    from aglcl.attribution.pipeline import Attribution
    from aglcl.errors import AglclError
    from aglcl.models import build_tiny

    _, _, run = agft_run
    model, _ = build_tiny()
    maps = Attribution(GradXWeight()).restore(run, model, completed=2)
    saved, _ = store.load_map(run / "importance" / "combined.safetensors")
    assert maps.keys() == saved.keys()
    other, _ = build_tiny(hidden_size=32)
    with pytest.raises(AglclError, match="shape"):
        Attribution(GradXWeight()).restore(run, other, completed=2)


def test_agft_with_lora_gates_the_weight_space_delta(agft_run, tmp_path):
    _, conf, _ = agft_run
    run = tmp_path / "run"
    train(conf, run, "peft=lora", "method=agft", "attribution.estimator.correct_only=false",
          "peft.target_modules=[q_proj,v_proj]")
    maps, _ = store.load_map(run / "importance" / "combined.safetensors")
    assert any(name.endswith("q_proj.base_layer.weight") for name in maps)
    assert not any("lora_" in name for name in maps)
