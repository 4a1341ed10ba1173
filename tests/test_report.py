"""Matrix I/O, tables, heatmap and sweep aggregation."""

import json

import pytest
from rich.console import Console

from aglcl.errors import AglclError
from aglcl.report.matrix import read_matrix, write_matrix_csv
from aglcl.report.plots import plot_heatmap
from aglcl.report.sweep import aggregate_sweep, compare, write_sweep_csv
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
    text = _render(metrics_table({"op": 0.6, "fwt": None}, ci={"op": [0.55, 0.65], "fwt": None}))
    assert "95% CI" in text and "[0.5500, 0.6500]" in text
    ci = {"mean": 0.6, "lo": 0.5, "hi": 0.7, "sd": 0.1, "n": 2}
    text = _render(sweep_table([{"overrides": "method=seqft", "n": 2, "op": ci},
                                {"overrides": "method=ewc", "n": 1, "op": {**ci, "lo": None, "hi": None}}],
                               ["op", "bwt"]))
    assert "0.600 [0.500, 0.700]" in text and "n/a" in text and "Student t" in text
    assert " 0.600 │" in text.split("method=ewc")[1]  # n = 1: the mean alone


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
    half = 12.706204736174707 * 0.1 * 2**0.5 / 2**0.5  # t_{0.975, 1} x sd (0.1414) / sqrt(2)
    assert seqft["op"]["mean"] == pytest.approx(0.6) and seqft["op"]["n"] == 2
    assert (seqft["op"]["lo"], seqft["op"]["hi"]) == pytest.approx((0.6 - half, 0.6 + half))
    assert seqft["bwt"]["mean"] == pytest.approx(-0.3) and seqft["bwt"]["sd"] == pytest.approx(0.1 * 2**0.5)
    assert seqft["aia"]["lo"] == pytest.approx(0.7) and seqft["aia"]["hi"] == pytest.approx(0.7)
    assert seqft["fwt"]["mean"] is None and seqft["fwt"]["n"] == 0
    assert seqft["wall_s"]["mean"] == pytest.approx(15.0)
    assert agft["n"] == 2 and agft["op"]["mean"] == pytest.approx(0.8)
    assert agft["fwt"]["mean"] == pytest.approx(0.05) and agft["fwt"]["n"] == 1  # None values are skipped
    assert "wall_s" not in agft and "peak_mem_mb" not in seqft

    diffs = compare([seqft, agft], "method=seqft")
    assert list(diffs) == ["method=agft"]
    op = diffs["method=agft"]["op"]  # seed 0: 0.8 - 0.5, seed 1: 0.8 - 0.7 (the '+' prefix pairs the same)
    assert op["n"] == 2 and op["mean"] == pytest.approx(0.2) and op["p_sign"] == pytest.approx(0.5)
    with pytest.raises(AglclError, match=r"baseline='method=ewc' matches no row of the sweep; name one of: "
                                         r"'method=seqft', 'method=agft'"):
        compare([seqft, agft], "method=ewc")

    lines = write_sweep_csv([seqft, agft], tmp_path / "sweep.csv", diffs).read_text().splitlines()
    assert lines[0].startswith("overrides,n,op_mean,op_lo,op_hi,op_sd,bwt_mean,")
    assert "wall_s_mean,wall_s_lo,wall_s_hi,wall_s_sd,op_diff,op_diff_lo,op_diff_hi,op_p_t,op_p_sign" in lines[0]
    assert lines[1].startswith(f"method=seqft,2,0.6,{0.6 - half:.6g},{0.6 + half:.6g},")
    header, agft_cells = lines[0].split(","), lines[2].split(",")
    assert agft_cells[header.index("op_diff")] == "0.2" and agft_cells[header.index("op_p_sign")] == "0.5"


def _pairing_sweep(root, gains):
    """seqft and agft over 5 seeds; agft's OP is seqft's plus ``gains[seed]``."""
    base = {"bwt": -0.2, "fwt": 0.0, "forgetting": 0.2, "aia": 0.6, "plasticity": 0.7}
    for seed in range(5):
        op = 0.5 + 0.02 * seed
        _job(root, seed, ["method=seqft", f"trainer.seed={seed}"], {**base, "op": op}, {"wall_s": 1.0})
        _job(root, 5 + seed, ["method=agft", f"trainer.seed={seed}"], {**base, "op": op + gains[seed]}, {})


def test_eval_sweep_with_a_baseline_prints_paired_differences(tmp_path, capsys):
    """A gain present in every seed is significant paired (the seeds' own spread cancels) and marked; the
    sweep's CSV, plots and metrics.json carry it."""
    from omegaconf import OmegaConf

    from aglcl.report.evaluate import run_eval

    sweep = tmp_path / "sweep"
    _pairing_sweep(sweep, [0.03, 0.04, 0.05, 0.03, 0.04])
    cfg = {"run_dir": None, "matrix": None, "sweep_dir": str(sweep), "tasks": None, "scale": "auto",
           "baseline": "method=seqft"}
    out = run_eval(OmegaConf.create(cfg), out_dir=tmp_path / "out")
    op = out["paired"]["method=agft"]["op"]
    assert op["n"] == 5 and op["mean"] == pytest.approx(0.038) and op["lo"] > 0
    assert op["p_sign"] == pytest.approx(2 / 32)
    printed = capsys.readouterr().out
    assert "Paired difference against method=seqft" in printed and " *" in printed
    for name in ("sweep.csv", "sweep_metrics.png", "stability_plasticity.png", "metrics.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    with pytest.raises(AglclError, match="baseline= applies to sweep_dir= only"):
        run_eval(OmegaConf.create({**cfg, "sweep_dir": None, "matrix": "m.csv"}), out_dir=tmp_path / "o2")


def test_sweep_without_jobs(tmp_path):
    with pytest.raises(AglclError, match="no job dirs") as e:
        aggregate_sweep(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(AglclError, match="no job dirs"):
        aggregate_sweep(tmp_path / "missing")
