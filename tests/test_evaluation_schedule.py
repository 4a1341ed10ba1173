"""``evaluation.tasks`` / ``evaluation.every``: which cells of R each stage scores, and which metrics a run
with an incomplete R reports as unavailable (and why)."""

from __future__ import annotations

import json

import pytest
from conftest import results, train

from aglcl.engine.validate import EvaluationConfig
from aglcl.metrics.cl import available, compute_all


@pytest.mark.parametrize(("tasks", "every", "want"), [
    # after task t = 1..4 of T = 4: the 0-based tasks scored
    ("all", 1, [[0, 1, 2, 3]] * 4),
    ("seen", 1, [[0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3]]),
    ("past", 1, [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]),
    ("all", 2, [[0, 1], [0, 1, 2, 3], [2, 3], [0, 1, 2, 3]]),
    ("past", 3, [[0], [1], [0, 1, 2], [0, 1, 2, 3]]),
    ("seen", 3, [[0, 1], [1, 2], [0, 1, 2, 3], [0, 1, 2, 3]]),
])
def test_tasks_after(tasks, every, want):
    evaluation = EvaluationConfig(tasks=tasks, every=every)
    assert [evaluation.tasks_after(t, 4) for t in range(1, 5)] == want


def test_available_names_what_a_missing_cell_removes():
    R = [[0.8, None, None], [0.6, 0.7, None], [0.5, 0.6, 0.9]]  # tasks=past: no superdiagonal
    metrics, why = available(R, [0.1, 0.2, 0.3])
    assert metrics["fwt"] is None and "R[i-1][i]" in why["fwt"]
    assert metrics["bwt"] == pytest.approx(((0.5 - 0.8) + (0.6 - 0.7)) / 2)
    assert metrics["forgetting"] == pytest.approx(((0.8 - 0.5) + (0.7 - 0.6)) / 2)
    assert set(why) == {"fwt"}
    R[1][0] = None  # a skipped stage: forgetting and AIA need the rows in between
    metrics, why = available(R, [0.1, 0.2, 0.3])
    assert metrics["forgetting"] is None and metrics["aia"] is None and metrics["bwt"] is not None
    assert "R[1][0]" in why["forgetting"] and "R[1][0]" in why["aia"]
    with pytest.raises(Exception, match=r"R\[1\]\[0\]"):
        compute_all(R, [0.1, 0.2, 0.3])  # the strict form still names the cell


def test_a_run_scores_only_the_scheduled_cells(conf, tmp_path):
    """tasks=past, every=2 on 3 tasks: after task 1 only task 1 (a stage in between; the next task is not
    scored under past), after task 2 tasks 1-2, after task 3 all; predictions exist for the scored cells only; results.json names what
    is unavailable and the setting that left it out."""
    out = train(conf, tmp_path, "sequence.order=[parity,sign,size]", "evaluation.tasks=past", "evaluation.every=2")
    R = out["R"]
    assert [[v is not None for v in row] for row in R] == [[True, False, False], [True, True, False], [True] * 3]
    assert results(tmp_path)["evaluation"] == {"tasks": "past", "every": 2, "split": None}
    unavailable = results(tmp_path)["unavailable"]
    assert set(unavailable) == {"fwt"} and "evaluation.tasks=past" in unavailable["fwt"]
    assert out["metrics"]["bwt"] == pytest.approx(sum(R[2][i] - R[i][i] for i in range(2)) / 2)
    stages = sorted(p.name for p in (tmp_path / "predictions").iterdir())
    scored = {s: sorted(f.stem for f in (tmp_path / "predictions" / s).glob("*.jsonl")) for s in stages}
    names = out["tasks"]
    assert [len(scored[s]) for s in stages] == [3, 1, 2, 3]  # initial (b), then the three stages
    assert scored[stages[1]] == [names[0]]
    csv = (tmp_path / "R.csv").read_text().splitlines()
    assert csv[1].split(",")[2:] == ["", ""]  # the skipped cells stay empty in R.csv
    assert json.loads((tmp_path / "state.json").read_text())["R"] == R
    ci = results(tmp_path)["ci"]  # over the stored per-example scores: brackets each available metric
    assert ci["fwt"] is None and "percentile bootstrap" in results(tmp_path)["ci_method"]
    for key in ("op", "bwt", "plasticity"):
        assert ci[key][0] <= out["metrics"][key] <= ci[key][1], key


def test_bootstrap_off_and_a_bad_value(conf, tmp_path):
    from aglcl.errors import AglclError

    out = train(conf, tmp_path / "run", "evaluation.bootstrap=0")
    assert out["ci"] is None and out["metrics"]["op"] is not None
    with pytest.raises(AglclError, match=r"evaluation.confidence=1.5 is invalid: must lie in \(0, 1\)"):
        train(conf, tmp_path / "bad", "evaluation.confidence=1.5")
    assert not (tmp_path / "bad").exists()


def test_eval_of_an_incomplete_run_says_what_is_unavailable(conf, tmp_path, capsys):
    """``aglcl eval run_dir=`` on a run that skipped cells re-scores the cells it has, reports the metrics
    they give (as the run did) and, per missing one, why; a corrupt ``evaluation`` entry is refused."""
    from omegaconf import OmegaConf

    from aglcl.errors import AglclError
    from aglcl.report.evaluate import run_eval

    run = tmp_path / "run"
    train(conf, run, "sequence.order=[parity,sign,size]", "evaluation.tasks=past", "evaluation.every=2")
    cfg = OmegaConf.create({"run_dir": str(run), "matrix": None, "sweep_dir": None, "tasks": None, "scale": "auto"})
    metrics = run_eval(cfg, out_dir=tmp_path / "eval")
    assert metrics == pytest.approx(results(run)["metrics"]) and metrics["fwt"] is None
    printed = capsys.readouterr()
    assert "fwt unavailable: needs R[i-1][i]" in printed.out + printed.err
    saved = results(run)
    (run / "results.json").write_text(json.dumps({**saved, "evaluation": {"tasks": "past", "every": 0}}))
    with pytest.raises(AglclError, match=r"results.json: 'evaluation' must be .* the file is corrupt"):
        run_eval(cfg, out_dir=tmp_path / "eval2")


def test_evaluation_split_eval_scores_the_eval_split_only(conf, tmp_path):
    """evaluation.split=eval (tuning): every stage scores each task's eval split, never its test split, and
    results.json says so."""
    from aglcl.rundir import read_predictions

    out = train(conf, tmp_path, "evaluation.split=eval")
    assert results(tmp_path)["evaluation"]["split"] == "eval"
    data = conf.parent / "data"
    for stage in read_predictions(tmp_path).values():
        for task, records in stage.items():
            split_prompts = {s: {r["prompt"] for r in json.loads((data / task / f"{s}.json").read_text())}
                             for s in ("eval", "test")}
            scored = {r["prompt"].removesuffix(" Answer:") for r in records}  # the fixture's template
            assert scored <= split_prompts["eval"] and not scored & split_prompts["test"], task
    assert out["R"]
