"""Matrix I/O, tables, heatmap and sweep aggregation."""

import json

import pytest
from rich.console import Console

from aglcl.errors import AglclError
from aglcl.report.matrix import read_matrix, write_matrix_csv
from aglcl.report.plots import plot_heatmap
from aglcl.report.sweep import aggregate_sweep, write_sweep_csv
from aglcl.report.tables import matrix_table, metrics_table, sweep_table

TASKS = ["bbc", "snips", "sst2"]
R = [[0.8, None, None], [0.61234, 0.9, None], [0.5, 0.7, 0.6]]


def _render(renderable) -> str:
    console = Console(record=True, width=160)
    console.print(renderable)
    return console.export_text()


def test_csv_round_trip(tmp_path):
    path = write_matrix_csv(tmp_path / "R.csv", TASKS, R)
    lines = path.read_text().splitlines()
    assert lines[0] == "after,bbc,snips,sst2"
    assert lines[2] == "snips,0.6123,0.9000,"
    tasks, R2, b = read_matrix(path)
    assert tasks == TASKS and b is None
    assert R2 == [[0.8, None, None], [0.6123, 0.9, None], [0.5, 0.7, 0.6]]


def test_csv_initial_row(tmp_path):
    path = write_matrix_csv(tmp_path / "R.csv", TASKS, R, b=[0.1, 0.2, 0.3])
    assert read_matrix(path)[2] == [0.1, 0.2, 0.3]
    (tmp_path / "b.csv").write_text("after,x,y\nb,0.1,\nx,0.5,0.2\ny,0.4,0.6\n")
    assert read_matrix(tmp_path / "b.csv") == (["x", "y"], [[0.5, 0.2], [0.4, 0.6]], [0.1, None])
    (tmp_path / "task_b.csv").write_text("after,a,b\na,0.5,0.2\nb,0.4,0.6\n")  # a task called "b"
    assert read_matrix(tmp_path / "task_b.csv") == (["a", "b"], [[0.5, 0.2], [0.4, 0.6]], None)


def test_json(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"tasks": TASKS, "R": R, "b": [0.1, 0.2, 0.3], "metrics": {}}))
    tasks, R2, b = read_matrix(path)
    assert tasks == TASKS and R2 == R and b == [0.1, 0.2, 0.3]
    path.write_text(json.dumps({"tasks": TASKS[:2], "R": [[1, 0], [0.5, 1]]}))
    assert read_matrix(path) == (TASKS[:2], [[1.0, 0.0], [0.5, 1.0]], None)


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("m.txt", "after,a,b\n", "'.csv', '.json'"),
        ("m.csv", "after,a,b\na,0.5,x\nb,0.4,0.6\n", r"row 2 \('a'\), column 'b': 'x' is not a number"),
        ("m.csv", "after,a,b\na,0.5\nb,0.4,0.6\n", "row 2 .* has 2 cells, header has 3"),
        ("m.csv", "after,a,b\na,0.5,0.1\n", "not square: 1 stage rows for 2 tasks"),
        ("m.csv", "after,a\na,0.5\n", "T=1"),
        ("m.csv", "", "empty file"),
        ("m.json", "{not json", "invalid JSON"),
        ("m.json", '{"tasks": ["a", "b"]}', "key 'R'"),
        ("m.json", '{"tasks": ["a", "b"], "R": [[1, 0], [1]]}', r"R\[1\] has 1 cells"),
        ("m.json", '{"tasks": ["a", "b"], "R": [[1, "x"], [1, 1]]}', r"R\[0\]\[1\] \(task 'b'\)"),
        ("m.json", '{"tasks": ["a", "b"], "R": [[1, 0], [1, 1]], "b": [1]}', "'b' must be a list"),
    ],
)
def test_bad_files(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AglclError, match=match) as e:
        read_matrix(path)
    assert "\n" not in str(e.value) and name in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(AglclError, match="not found"):
        read_matrix(tmp_path / "nope.csv")


def test_tables():
    text = _render(matrix_table(TASKS, R, b=[0.1, 0.2, 0.3]))
    assert "initial" in text and "0.6123" in text
    text = _render(metrics_table({"op": 0.6, "fwt": None}))
    assert "0.6000" in text and "n/a" in text
    text = _render(sweep_table([{"overrides": "method=seqft", "n": 2, "op": (0.6, 0.1)}], ["op", "bwt"]))
    assert "0.600 ± 0.100" in text and "n/a" in text


def test_heatmap(tmp_path):
    path = plot_heatmap(TASKS, R, tmp_path / "plots" / "R_heatmap.png", title="run")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000


def _job(root, num, overrides, metrics, timings):
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "results.json").write_text(json.dumps({"metrics": metrics, "timings": timings}))


def test_sweep(tmp_path):
    base = {"fwt": None, "forgetting": 0.1, "aia": 0.7, "plasticity": 0.8}
    _job(tmp_path, 0, ["method=seqft", "trainer.seed=0"], {**base, "op": 0.5, "bwt": -0.2}, {"wall_s": 10.0})
    _job(tmp_path, 1, ["method=seqft", "trainer.seed=1"], {**base, "op": 0.7, "bwt": -0.4}, {"wall_s": 20.0})
    _job(tmp_path, 2, ["method=agft", "trainer.seed=0"], {**base, "op": 0.8, "bwt": -0.1, "fwt": 0.05}, {})
    _job(tmp_path, 3, ["method=agft", "+trainer.seed=1"], {**base, "op": 0.8, "bwt": -0.1}, {})
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    (tmp_path / "9").mkdir()  # a job that never finished

    seqft, agft = aggregate_sweep(tmp_path)
    assert seqft["overrides"] == "method=seqft" and seqft["n"] == 2
    assert seqft["op"] == pytest.approx((0.6, 0.1))
    assert seqft["bwt"] == pytest.approx((-0.3, 0.1))
    assert seqft["aia"] == pytest.approx((0.7, 0.0))
    assert seqft["fwt"] == (None, None)
    assert seqft["wall_s"] == pytest.approx((15.0, 5.0))
    assert agft["n"] == 2 and agft["op"] == pytest.approx((0.8, 0.0))
    assert agft["fwt"] == pytest.approx((0.05, 0.0))  # None values are skipped
    assert "wall_s" not in agft and "peak_mem_mb" not in seqft

    lines = write_sweep_csv([seqft, agft], tmp_path / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("overrides,n,op_mean,op_std,bwt_mean,bwt_std,")
    assert lines[0].endswith("wall_s_mean,wall_s_std")
    assert lines[1].startswith("method=seqft,2,0.6,0.1,-0.3,0.1,")


def test_sweep_without_jobs(tmp_path):
    with pytest.raises(AglclError, match="no job dirs") as e:
        aggregate_sweep(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(AglclError, match="no job dirs"):
        aggregate_sweep(tmp_path / "missing")
