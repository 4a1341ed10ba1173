"""``aglcl train`` end to end under ``torchrun`` (2 CPU processes, gloo): DDP resume and data sharding, FSDP2
and DeepSpeed ZeRO-2 with AGFT, a refusal under torchrun (the others run in-process: test_distributed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import make_fixture_conf, run_cli, tiny_overrides, torchrun, train

pytestmark = pytest.mark.integration  # subprocesses: the CLI's exit codes, signals, torchrun

AGFT = ["method=agft", "attribution=grad_x_weight", "attribution.estimator.num_samples=4",
        "attribution.estimator.correct_only=false", "trainer.lr=5e-3"]


@pytest.fixture(scope="module")
def conf(tmp_path_factory):
    return make_fixture_conf(tmp_path_factory.mktemp("dist_cli"))


KILLABLE = ["trainer.max_steps=4", "checkpoint.every_steps=2"]  # a step checkpoint mid-task, for kill -9


@pytest.fixture(scope="module")
def unbroken(conf, tmp_path_factory):
    """``unbroken(engine)``: the run dir of one torchrun of ``AGFT + KILLABLE`` under ``engine``, launched
    once per module and shared by the tests that compare against it."""
    runs: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in runs:
            root = tmp_path_factory.mktemp(f"unbroken_{engine}")
            proc = torchrun(*tiny_overrides(conf, root / "run"), f"distributed={engine}", *AGFT, *KILLABLE, cwd=root)
            assert proc.returncode == 0, proc.stderr[-4000:]
            runs[engine] = root / "run"
        return runs[engine]

    return get


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_ddp_stop_and_resume_equals_an_unbroken_ddp_run(conf, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    args = ["distributed=ddp", *AGFT]
    proc = torchrun(*tiny_overrides(conf, whole), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = torchrun(*tiny_overrides(conf, split), *args, "stop_after=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((split / "state.json").read_text())["next_task"] == 1
    proc = torchrun(*tiny_overrides(conf, split), *args, "resume=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = _results(whole), _results(split)
    assert a["R"] == b["R"] and a["metrics"] == b["metrics"]
    assert [a["train"][t]["loss"] for t in a["tasks"]] == [b["train"][t]["loss"] for t in b["tasks"]]
    assert not list(tmp_path.glob("outputs/*"))  # every rank used the given run dir, none made its own


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed_zero2"])
def test_killed_mid_task_resumes_from_its_step_checkpoint(conf, tmp_path, engine, unbroken):
    """kill -9 after a step checkpoint. FSDP2: AdamW's sharded state was gathered into optimizer.pt by rank 0,
    and every rank takes its shard back. DeepSpeed: the engine's own per-rank checkpoint. Either way the
    resumed run equals an unbroken one."""
    from test_faults import plant

    args, run = [f"distributed={engine}", *AGFT, *KILLABLE], tmp_path / "run"
    # each rank dies at its 3rd forward: task 1, step 3, after the step-2 checkpoint
    proc = torchrun(*tiny_overrides(conf, run), *args, cwd=tmp_path,
                    before=lambda: plant("aglcl.engine.loop", "lm_forward", 3, "*"))
    assert proc.returncode != 0 and not (run / "results.json").exists()
    state = json.loads((run / "state.json").read_text())
    assert state["step_checkpoint"] == "checkpoint/task_0_step_2", state
    proc = torchrun(*tiny_overrides(conf, run), *args, "resume=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = _results(unbroken(engine)), _results(run)
    assert a["R"] == b["R"] and a["metrics"] == b["metrics"]
    assert [a["train"][t]["loss"] for t in a["tasks"]] == [b["train"][t]["loss"] for t in b["tasks"]]


def test_ddp_ewc_with_generation_scoring(tmp_path):
    """Hooks get the unwrapped model (EWC's parameter names) and generation runs on it (DDP has no generate)."""
    conf, run = make_fixture_conf(tmp_path), tmp_path / "run"
    fixture = conf / "sequence" / "fixture.yaml"
    fixture.write_text(fixture.read_text().replace(  # the first task scored by generation
        "{_target_: aglcl.data.scoring.LabelLikelihood, labels: null}",
        "{_target_: aglcl.data.scoring.Generation, max_new_tokens: 3}", 1))
    proc = torchrun(*tiny_overrides(conf, run), "distributed=ddp", "method=ewc", "method.num_samples=4",
                    "trainer.lr=5e-3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = _results(run)
    assert len(results["R"]) == 2 and json.loads((run / "state.json").read_text())["done"]


def test_fsdp2_refuses_methods_with_whole_tensor_state(conf, tmp_path):
    proc = torchrun(*tiny_overrides(conf, tmp_path / "run"), "distributed=fsdp2", "method=lwf", cwd=tmp_path)
    assert proc.returncode != 0 and "does not support distributed=fsdp2" in proc.stderr, proc.stderr[-3000:]


def test_fsdp2_trains_the_sequence_with_agft(conf, tmp_path, unbroken):
    run = unbroken("fsdp2")
    results = _results(run)
    assert len(results["R"]) == 2 and results["metrics"]["op"] is not None
    assert (run / "importance" / "combined.safetensors.index.json").is_file()
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["task_1"]  # step checkpoints pruned
    # activation checkpointing recomputes the forward in backward: the same numbers, less memory
    ckpt = tmp_path / "ckpt"
    proc = torchrun(*tiny_overrides(conf, ckpt), "distributed=fsdp2", "distributed.activation_checkpointing=true",
                    *AGFT, *KILLABLE, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    again = _results(ckpt)
    assert again["R"] == results["R"]
    assert [again["train"][t]["loss"] for t in again["tasks"]] == [results["train"][t]["loss"]
                                                                   for t in results["tasks"]]


@pytest.mark.parametrize("extra", [[], ["peft=lora"]], ids=["full", "lora"])
def test_deepspeed_zero3_trains_the_sequence_with_agft(conf, tmp_path, extra):
    """ZeRO-3: weights partitioned while a task trains, handed back whole for scoring and attribution;
    under LoRA the frozen base weights are gathered back too (parity with one process: test_distributed)."""
    run = tmp_path / "run"
    proc = torchrun(*tiny_overrides(conf, run), "distributed=deepspeed_zero3", *AGFT, "trainer.grad_accum=2", *extra,
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = _results(run)
    assert len(results["R"]) == 2 and results["metrics"]["op"] is not None
    assert all(math.isfinite(results["train"][t]["loss"]) for t in results["tasks"])
    assert (run / "importance" / "combined.safetensors").is_file()  # attribution ran on the gathered model


def test_deepspeed_zero2_seekr_distils_through_the_engine(conf, tmp_path):
    """SEEKR's loss gets the DeepSpeed engine as the model: it must reach the module under it for attention maps."""
    run = tmp_path / "run"
    proc = torchrun(*tiny_overrides(conf, run), "distributed=deepspeed_zero2", "method=seekr", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(_results(run)["R"]) == 2


def test_deepspeed_runs_in_one_process_without_a_launcher(conf, tmp_path):
    """No torchrun: a one-rank process group is started for DeepSpeed (ZeRO-Offload on one GPU works so).
    Under bf16 the engine casts the model; the weights handed back (and checkpointed) are fp32 again."""
    from safetensors import safe_open

    run = tmp_path / "run"
    proc = run_cli("train", *tiny_overrides(conf, run), "distributed=deepspeed_zero2", *AGFT,
                   "trainer.precision=bf16", "checkpoint.every_task=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_results(run)["R"]) == 2
    with safe_open(str(run / "checkpoint" / "task_1" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"}


def test_ddp_shards_the_data_over_ranks(conf, tmp_path):
    """One epoch under 2 ranks is half the optimizer steps of one process: each rank sees its own batches.
    (The ``torchrun`` binary itself, each rank a fresh interpreter; the other tests fork their ranks.)"""
    args = ["trainer.max_steps=null", "trainer.epochs=1", "method=seqft", "stop_after=1"]
    train(conf, tmp_path / "one", *args)  # one process, in this one
    proc = torchrun(*tiny_overrides(conf, tmp_path / "two"), "distributed=ddp", *args, cwd=tmp_path, fresh=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "state.json").read_text())["train"]
    two = json.loads((tmp_path / "two" / "state.json").read_text())["train"]
    task = next(iter(one))
    assert one[task]["steps"] > 1 and two[task]["steps"] == -(-one[task]["steps"] // 2)
