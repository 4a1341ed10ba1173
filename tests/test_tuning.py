"""Tuning on the eval split: every conf/sweep/tune_*.yaml expands to 4 valid jobs that score the eval split, and
scripts/tune.py picks the best setting, refuses a test-split sweep and writes the value into the method YAML."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import yaml
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from aglcl.engine.preflight import sweep_jobs
from aglcl.engine.validate import check_train_config
from aglcl.paths import conf_dir

sys.path.insert(0, str(REPO / "scripts"))
import tune  # noqa: E402

TUNED = sorted(p.stem.removeprefix("tune_") for p in (conf_dir() / "sweep").glob("tune_*.yaml"))


def test_every_method_the_evidence_issue_names_has_a_tuning_sweep():
    assert TUNED == ["agft", "ewc", "freeze", "lwf", "migu", "olora", "replay", "seekr"]


@pytest.mark.parametrize("method", TUNED)
def test_tuning_sweep_is_four_valid_eval_split_jobs(method):
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        base = ["experiment=offline_cl", f"sweep=tune_{method}"]
        cfg = compose("train", overrides=base, return_hydra_config=True)
        jobs = sweep_jobs(cfg)
        assert len(jobs) == 4 and len({tuple(j) for j in jobs}) == 4
        for job in jobs:
            job_cfg = compose("train", overrides=[*base, *job], return_hydra_config=True)
            assert job_cfg.hydra.runtime.choices.method == method and job_cfg.evaluation.split == "eval"
            with open_dict(job_cfg):
                del job_cfg["hydra"]
            check_train_config(job_cfg)


def _job(root, num, lam, op, split="eval", method="ewc"):
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["experiment=offline_cl", f"method.lam={lam}"]))
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"method": method}}}}))
    metrics = {"op": op, "bwt": -0.1, "plasticity": 0.7, "fwt": 0.0, "forgetting": 0.1, "aia": 0.6}
    (job / "results.json").write_text(json.dumps({"metrics": metrics, "timings": {},
                                                  "evaluation": {"tasks": "seen", "every": 1, "split": split}}))


def test_tune_picks_the_best_eval_setting_and_writes_it(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for num, (lam, op) in enumerate([(100.0, 0.55), (1000.0, 0.61), (10000.0, 0.58), (100000.0, 0.40)]):
        _job(sweep, num, lam, op)
    conf = tmp_path / "conf"
    (conf / "method").mkdir(parents=True)
    shutil.copy(conf_dir() / "method" / "ewc.yaml", conf / "method" / "ewc.yaml")
    assert tune.main([str(sweep), "--write", "--conf-dir", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "best op on the eval split: method.lam=1000.0" in out and "-> method.lam=1000.0" in out
    written = (conf / "method" / "ewc.yaml").read_text()
    line = next(x for x in written.splitlines() if x.startswith("lam:"))
    assert line.startswith("lam: 1000.0   # tuned (scripts/tune.py: best mean eval-split op of method.lam in")
    assert "was 400.0" in line
    assert yaml.safe_load(written)["lam"] == 1000.0 and yaml.safe_load(written)["mode"] == "separate"


def test_tune_refuses_a_sweep_that_scored_the_test_split(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _job(sweep, 0, 100.0, 0.5)
    _job(sweep, 1, 1000.0, 0.6, split=None)  # evaluation.split null: each task's eval_split, i.e. test
    with pytest.raises(SystemExit) as e:
        tune.main([str(sweep)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "scored the test split; tune on the eval split" in err and "\n" not in err.strip()
