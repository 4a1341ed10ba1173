"""Bad inputs: a non-zero exit, one line on stderr naming the problem (and the choices), no traceback,
and no results file left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_fixture_conf, run_cli, tiny_overrides

pytestmark = pytest.mark.integration  # subprocesses: the CLI's exit codes, signals, torchrun


def _assert_one_line_error(proc, *needles: str) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _write_sequence(conf: Path, source: str) -> None:
    (conf / "sequence" / "broken.yaml").write_text(
        "# aglcl train sequence=broken\nname: broken\norder: [t]\ntasks:\n  t:\n"
        f"    source: {source}\n    template: '{{prompt}}'\n    metric: accuracy\n"
        "    scoring: {_target_: aglcl.data.scoring.LabelLikelihood}\n")


@pytest.fixture
def broken(tmp_path):
    """(conf, run_dir, train(source) -> proc) for a one-task sequence with a custom source."""
    conf = make_fixture_conf(tmp_path)
    run = tmp_path / "run"

    def train(source: str, *extra: str):
        _write_sequence(conf, source)
        overrides = [o for o in tiny_overrides(conf, run) if not o.startswith("sequence=")]
        return run_cli("train", *overrides, "sequence=broken", *extra, cwd=tmp_path)

    return tmp_path, run, train


def _no_results(run: Path) -> None:
    assert not (run / "results.json").exists()
    assert not (run / "R.csv").exists()


def test_unknown_group_option_lists_the_choices(tmp_path):
    proc = run_cli("train", "method=nope", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    _assert_one_line_error(proc, "'nope'", "method", "seqft")
    _no_results(tmp_path / "run")


def test_unknown_command_lists_the_commands():
    _assert_one_line_error(run_cli("trian"), "trian", "train", "eval")


def test_missing_task_file_names_the_expected_file(broken):
    root, run, train = broken
    (root / "data" / "parity" / "test.json").unlink()
    proc = train(f"{{_target_: aglcl.data.sources.LocalDir, path: {root / 'data' / 'parity'}}}")
    _assert_one_line_error(proc, "test.json")
    _no_results(run)


def test_malformed_json_line_names_file_and_line(broken):
    root, run, train = broken
    good = json.dumps({"prompt": "a", "answer": "b"})
    (root / "t.jsonl").write_text(f"{good}\n{{not json\n")
    proc = train(f"{{_target_: aglcl.data.sources.Files, train: {root / 't.jsonl'}, test: {root / 't.jsonl'}}}")
    _assert_one_line_error(proc, "t.jsonl:2")
    _no_results(run)


def test_missing_field_names_the_field(broken):
    root, run, train = broken
    (root / "t.jsonl").write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    proc = train(f"{{_target_: aglcl.data.sources.Files, train: {root / 't.jsonl'}, test: {root / 't.jsonl'}}}")
    _assert_one_line_error(proc, "prompt")
    _no_results(run)


def test_empty_split_is_refused(broken):
    root, run, train = broken
    (root / "data" / "parity" / "train.json").write_text("[]")
    proc = train(f"{{_target_: aglcl.data.sources.LocalDir, path: {root / 'data' / 'parity'}}}")
    _assert_one_line_error(proc, "empty")
    _no_results(run)


def test_order_naming_an_unknown_task_lists_the_tasks(tmp_path):
    conf = make_fixture_conf(tmp_path)
    run = tmp_path / "run"
    proc = run_cli("train", *tiny_overrides(conf, run), "sequence.order=[parity,nope]", cwd=tmp_path)
    _assert_one_line_error(proc, "nope", "parity", "sign")
    _no_results(run)


def test_bad_trainer_value_names_the_key(tmp_path):
    conf = make_fixture_conf(tmp_path)
    run = tmp_path / "run"
    proc = run_cli("train", *tiny_overrides(conf, run), "trainer.lr=-1", cwd=tmp_path)
    _assert_one_line_error(proc, "trainer.lr")
    _no_results(run)


def test_matrix_with_one_task_is_refused(tmp_path):
    table = tmp_path / "m.csv"
    table.write_text("after,a\na,0.9\n")
    proc = run_cli("eval", f"matrix={table}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    _assert_one_line_error(proc, "T")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_missing_matrix_file(tmp_path):
    proc = run_cli("eval", f"matrix={tmp_path / 'nope.csv'}", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    _assert_one_line_error(proc, "nope.csv")


def test_eval_needs_exactly_one_source(tmp_path):
    proc = run_cli("eval", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path)
    _assert_one_line_error(proc, "run_dir", "matrix", "sweep_dir")


def test_hub_model_offline_gives_one_line(tmp_path):
    conf = make_fixture_conf(tmp_path)
    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(conf, run) if o != "model=tiny"]
    proc = run_cli("train", *overrides, "model=hub", "model.name_or_path=nobody/no-such-model", cwd=tmp_path)
    _assert_one_line_error(proc, "nobody/no-such-model")
    _no_results(run)
