"""``read_matrix`` never reads a matrix wrongly: labels, headerless files, scales and ranges."""

import csv
import json
import math

import pytest
from conftest import run_cli
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aglcl.errors import AglclError
from aglcl.metrics.cl import compute_all
from aglcl.report.matrix import read_matrix

TASKS = ["a", "b", "c"]
R = [[0.9, None, None], [0.7, 0.8, None], [0.6, 0.7, 0.9]]
B = [0.1, 0.2, 0.3]


def _file(tmp_path, text, name="m.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def refused(path, *needles, **options) -> str:
    """``read_matrix(path, **options)`` raises a one-line AglclError naming the file and every needle."""
    with pytest.raises(AglclError) as info:
        read_matrix(path, **options)
    msg = str(info.value)
    assert "\n" not in msg and path.name in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ------------------------------------------------------------------------------------- headerless
def test_headerless_needs_tasks(tmp_path):
    path = _file(tmp_path, "0.9,,\n0.7,0.8,\n0.6,0.7,0.9\n")
    refused(path, "no header row", "tasks=[a,b,c]")
    refused(_file(tmp_path, "a,0.9,,\nb,0.7,0.8,\nc,0.6,0.7,0.9\n"), "no header row", "tasks=")  # labelled
    refused(_file(tmp_path, "initial,,,\na,0.9,,\nb,0.7,0.8,\nc,0.6,0.7,0.9\n"), "no header row")


def test_headerless_with_tasks(tmp_path):
    path = _file(tmp_path, "0.9,,\n0.7,0.8,\n0.6,0.7,0.9\n")
    assert read_matrix(path, tasks=TASKS) == (TASKS, R, None)
    assert read_matrix(path, tasks=("x", "y", "z"))[0] == ["x", "y", "z"]
    path = _file(tmp_path, "c,0.6,0.7,0.9\ninitial,0.1,0.2,0.3\na,0.9,,\nb,0.7,0.8,\n")  # labelled, any order
    assert read_matrix(path, tasks=TASKS) == (TASKS, R, B)
    path = _file(tmp_path, "3,0.6,0.7,0.9\n1,0.9,,\n2,0.7,0.8,\n")
    assert read_matrix(path, tasks=TASKS) == (TASKS, R, None)


def test_headerless_shape_errors(tmp_path):
    refused(_file(tmp_path, "0.1,0.2,0.3\n0.9,,\n0.7,0.8,\n0.6,0.7,0.9\n"), "ambiguous", tasks=TASKS)
    refused(_file(tmp_path, "0.9,,\n0.7,0.8,\n"), "not square: 2 rows for 3 tasks", tasks=TASKS)
    refused(_file(tmp_path, "0.9,,\n0.7,0.8\n0.6,0.7,0.9\n"), "row 2 has 2 cells", tasks=TASKS)
    refused(_file(tmp_path, "0.9,,\n0.7,0.8,\n0.6,0.7,0.9\n"), "'0.9'", "tasks=['a', 'b']", tasks=["a", "b"])


def test_header_and_tasks_must_agree(tmp_path):
    path = _file(tmp_path, "after,a,b,c\na,0.9,,\nb,0.7,0.8,\nc,0.6,0.7,0.9\n")
    assert read_matrix(path, tasks=["c", "a", "b"]) == (TASKS, R, None)  # same names: the header's order
    refused(path, "does not match", "'x'", tasks=["a", "b", "x"])
    refused(path, "does not match", tasks=["a", "b"])
    json_path = _file(tmp_path, json.dumps({"tasks": TASKS, "R": R}), "m.json")
    assert read_matrix(json_path, tasks=TASKS)[1] == R
    refused(json_path, "does not match", tasks=["a", "b", "x"])


# ------------------------------------------------------------------------------------------ labels
def test_rows_in_any_order_are_reordered(tmp_path):
    path = _file(tmp_path, "after,a,b,c\nc,0.6,0.7,0.9\ninitial,0.1,0.2,0.3\na,0.9,,\nb,0.7,0.8,\n")
    assert read_matrix(path) == (TASKS, R, B)


def test_numeric_stage_labels(tmp_path):
    path = _file(tmp_path, "after,a,b,c\n3,0.6,0.7,0.9\n1,0.9,,\ninitial,0.1,0.2,0.3\n2,0.7,0.8,\n")
    assert read_matrix(path) == (TASKS, R, B)
    path = _file(tmp_path, "after,x,y,z\n3,0.6,0.7,0.9\n1,0.9,,\nB,0.1,0.2,0.3\n2,0.7,0.8,\n")
    assert read_matrix(path) == (["x", "y", "z"], R, B)
    path = _file(tmp_path, "after,1,2\n1,0.9,\n2,0.7,0.8\n")  # numeric task names: an 'after' header
    assert read_matrix(path) == (["1", "2"], [[0.9, None], [0.7, 0.8]], None)


@pytest.mark.parametrize("text, needles", [
    ("after,a,b\nx,0.9,\nb,0.7,0.8\n", ["row 2: unknown label 'x'", "valid labels", "'a', 'b'", "1..2"]),
    ("after,a,b\n,0.9,\nb,0.7,0.8\n", ["unknown label ''"]),
    ("after,a,b\n3,0.9,\n1,0.7,0.8\n", ["unknown label '3'"]),
    ("after,a,b\na,0.9,\na,0.7,0.8\n", ["row 3 (label 'a') repeats stage 1", "valid labels"]),
    ("after,a,b\n1,0.9,\na,0.7,0.8\n", ["mix task names and stage numbers"]),
    ("after,a,b\n2,0.9,\na,0.7,0.8\n", ["mix task names and stage numbers"]),
    ("after,a,b\ninitial,0.1,0.2\nb,0.9,\nINITIAL,0.1,0.2\na,0.7,0.8\n", ["repeats the initial scores"]),
    ("after,a,b,c\na,0.9,,\nc,0.6,0.7,0.9\n", ["not square: 2 stage rows for 3 tasks", "no row for 'b'",
                                               "valid labels"]),
    ("after,1,2\n1,0.9,\n2,0.7,0.8\n", []),  # fine: names and numbers agree
    ("after,2,1\n1,0.9,\n2,0.7,0.8\n", ["both task names and stage numbers"]),
])
def test_bad_labels(tmp_path, text, needles):
    path = _file(tmp_path, text)
    if not needles:
        read_matrix(path)
        return
    refused(path, *needles)


# ------------------------------------------------------------------------------------------- scale
def test_percent_is_divided_by_100(tmp_path):
    path = _file(tmp_path, "after,a,b,c\ninitial,10,20,30\na,90,,\nb,70,80,\nc,60,70,90\n")
    m = read_matrix(path)
    assert m.scale == 100 and m.scale_note == "scale: 0-100 (percent), divided by 100"
    assert m[0] == TASKS and m[2] == pytest.approx(B)
    assert [[None if v is None else round(v, 12) for v in row] for row in m[1]] == R
    m = read_matrix(_file(tmp_path, "after,a,b\na,0.9,\nb,0.7,0.8\n"))
    assert m.scale == 1 and m.scale_note == "scale: 0-1"
    assert read_matrix(_file(tmp_path, "after,a,b\na,0,0\nb,0,100\n")).scale == 100  # zeros fit either scale


@pytest.mark.parametrize("text, needles", [
    ("after,a,b\ninitial,0.1,0.2\na,90,\nb,70,80\n", ["mixed scales", "row 2 ('initial')", "90.0"]),
    ("after,a,b\na,90,0.5\nb,0.7,0.8\n", ["mixed scales", "row 3 ('b')"]),
    ("after,a,b\na,90,\nb,70,0.8\n", ["mixed scales", "column 'b'"]),  # one task's column in 0-1
    ("after,a,b\na,0.9,1.2\nb,0.7,0.8\n", ["mixed scales", "column 'b' is 1.2"]),
    ("after,a,b\na,0.9,-0.1\nb,0.7,0.8\n", ["row 2 ('a'), column 'b'", "-0.1 is negative"]),
    ("after,a,b\na,90,150\nb,70,80\n", ["row 2 ('a'), column 'b'", "150.0 is above 100"]),
])
def test_bad_scales(tmp_path, text, needles):
    refused(_file(tmp_path, text), *needles)


def test_explicit_scale(tmp_path):
    small = _file(tmp_path, "after,a,b\na,0.9,\nb,0.5,1\n")
    m = read_matrix(small, scale=100)  # the user says these are percent
    assert m.scale == 100 and m[1][0][1] is None
    assert [m[1][0][0], *m[1][1]] == pytest.approx([0.009, 0.005, 0.01])
    for same in (1, "1", 1.0):
        assert read_matrix(small, scale=same) == (["a", "b"], [[0.9, None], [0.5, 1.0]], None)
    assert read_matrix(small, scale="auto").scale == 1
    mixed = _file(tmp_path, "after,a,b\ninitial,0.5,1\na,90,\nb,70,80\n")
    assert read_matrix(mixed, scale="100")[2] == pytest.approx([0.005, 0.01])  # explicit: no mixed guess
    refused(mixed, "row 3 ('a'), column 'a'", "above 1", "scale=100", scale=1)
    refused(_file(tmp_path, "after,a,b\na,90,\nb,70,101\n"), "101.0 is above 100", scale=100)


@pytest.mark.parametrize("scale", [50, "percent", True, None, [100], 0.01])
def test_bad_scale_option(tmp_path, scale):
    path = _file(tmp_path, "after,a,b\na,0.9,\nb,0.5,1\n")
    with pytest.raises(AglclError, match=r"scale=.* is not valid; choose one of '1', '100', 'auto'"):
        read_matrix(path, scale=scale)


@pytest.mark.parametrize("tasks", ["abc", ["a"], ["a", "a"], ["a", ""], [1.5, 2], 3])
def test_bad_tasks_option(tmp_path, tasks):
    with pytest.raises(AglclError, match=r"tasks=.* is not valid; .*tasks=\[a,b,c\]"):
        read_matrix(_file(tmp_path, "0.9,\n0.5,1\n"), tasks=tasks)


def test_json_scale_and_range(tmp_path):
    path = _file(tmp_path, json.dumps({"tasks": ["a", "b"], "R": [[90, 10], [70, 80]], "b": [5, 20]}),
                 "m.json")
    m = read_matrix(path)
    assert m.scale == 100 and m[1] == [[0.9, 0.1], [0.7, 0.8]] and m[2] == [0.05, 0.2]
    path.write_text(json.dumps({"tasks": ["a", "b"], "R": [[90, 10], [70, 80]], "b": [0.1, 0.2]}))
    refused(path, "mixed scales", "b holds only values of at most 1")
    path.write_text(json.dumps({"tasks": ["a", "b"], "R": [[0.9, -1], [0.7, 0.8]]}))
    refused(path, "R[0][1] (task 'b')", "negative")
    path.write_text(json.dumps({"tasks": ["a", "b"], "R": [[0.9, 0.1], [0.7, 0.8]], "b": [0.1, 200]}))
    refused(path, "b[1] (task 'b')", "above 100")
    path.write_text(json.dumps({"tasks": ["a", "b"], "R": [[0.9, 0.1], [0.7, 0.8]], "b": [0.1, 2]}))
    refused(path, "b[1] (task 'b')", "above 1", scale=1)


# --------------------------------------------------------------------------------------------- CLI
@pytest.mark.integration
def test_cli_headerless(tmp_path):
    table = _file(tmp_path, "90,,\n70,80,\n60,70,90\n", "paper.csv")
    out = tmp_path / "out"
    proc = run_cli("eval", f"matrix={table}", f"hydra.run.dir={out}", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "paper.csv" in lines[0] and "tasks=[a,b,c]" in lines[0]
    proc = run_cli("eval", f"matrix={table}", "tasks=[a,b,c]", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "scale: 0-100 (percent), divided by 100" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert "scale" not in metrics
    assert metrics["op"] == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert metrics["bwt"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)
    proc = run_cli("eval", f"matrix={table}", "tasks=[a,b,c]", "scale=7", f"hydra.run.dir={out}",
                   cwd=tmp_path)
    assert proc.returncode == 2 and "scale=7" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------- property
NAMES = ["bbc", "snips", "sst2", "b", "initial", "Task 4", "x,y", "ümlaut"]
SCORE = st.floats(0, 1, allow_nan=False) | st.integers(0, 100).map(lambda k: k / 100) \
    | st.integers(0, 1000).map(lambda k: k / 1000)


@st.composite
def matrices(draw):
    T = draw(st.integers(2, 5))
    tasks = draw(st.lists(st.sampled_from(NAMES), min_size=T, max_size=T, unique=True))
    full = draw(st.booleans())
    R = [[draw(SCORE) if i <= t else draw(st.none() | SCORE) if full else None for i in range(T)]
         for t in range(T)]
    b = draw(st.none() | st.lists(st.none() | SCORE, min_size=T, max_size=T))
    return tasks, R, b


def _close(got, want) -> bool:
    return len(got) == len(want) and all(
        (g is None) == (w is None) and (w is None or abs(g - w) <= 1e-9)
        for g, w in zip(got, want, strict=True))


def _mixed_looking(rows, T) -> bool:
    """Some row or column's nonzero values are all <= 1 while another value exceeds 1 (auto refuses it)."""
    values = [v for row in rows for v in row if v is not None]
    if not any(v > 1 for v in values):
        return False
    lines = [*rows, *([row[i] for row in rows] for i in range(T))]
    return any(nz and max(nz) <= 1 for nz in ([v for v in line if v] for line in lines))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=matrices(), scale=st.sampled_from([1, 100]), fmt=st.sampled_from(["csv", "json"]),
       header=st.booleans(), labelled=st.booleans(), by_name=st.booleans(), pass_tasks=st.booleans(),
       data=st.data())
def test_never_a_wrong_read(tmp_path_factory, case, scale, fmt, header, labelled, by_name, pass_tasks, data):
    """A random matrix written as users write it reads back exactly, or is refused; never read wrongly."""
    tasks, R, b = case
    T = len(tasks)
    path = tmp_path_factory.mktemp("m") / f"m.{fmt}"
    up = (lambda v: v * 100) if scale == 100 else (lambda v: v)
    written_R = [[None if v is None else up(v) for v in row] for row in R]
    written_b = None if b is None else [None if v is None else up(v) for v in b]
    given_tasks = data.draw(st.permutations(tasks)) if pass_tasks else None
    must_refuse = False
    if fmt == "json":
        path.write_text(json.dumps({"tasks": tasks, "R": written_R, **({"b": written_b} if b else {})}))
    else:
        if not header:
            given_tasks = list(tasks)  # a headerless file needs tasks=, in training order
        labelled = labelled or header
        b_labels = [x for x in ("initial", "Initial", "b", "B") if x.lower() not in tasks]
        if b is not None and labelled and not b_labels:
            b = written_b = None  # every initial-scores label is a task name: such a file cannot hold b
        if b is not None and not labelled and all(v is None for v in b):
            b = written_b = None  # an unlabelled row of empty cells is a blank line
        stages = [(str(t + 1) if not by_name else tasks[t], row) for t, row in enumerate(written_R)]
        if b is not None:
            stages.append((data.draw(st.sampled_from(b_labels or ["initial"])), written_b))
        rows = stages
        if labelled:
            rows = data.draw(st.permutations(rows))
        else:
            must_refuse = b is not None  # T+1 unlabelled rows: which is b?
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if header:
                w.writerow(["after", *tasks])
            for label, row in rows:  # as users write them: 0.9 or 90.0, empty cells for None
                w.writerow([*([label] if labelled else []), *("" if v is None else repr(v) for v in row)])
    in_file = [*written_R, *([written_b] if b is not None else [])]

    def exact(m, divisor):
        assert m.scale == divisor and m[0] == tasks
        assert all(_close(g, w) for g, w in zip(m[1], R, strict=True)) and len(m[1]) == T
        assert (m[2] is None) == (b is None) and (b is None or _close(m[2], b))
        got, want = compute_all(m[1], m[2]), compute_all(R, b)
        assert got.keys() == want.keys()
        assert all((want[k] is None) == (got[k] is None) and (want[k] is None or math.isclose(
            got[k], want[k], abs_tol=1e-9)) for k in want)

    if must_refuse:
        with pytest.raises(AglclError):
            read_matrix(path, tasks=given_tasks, scale=scale)
        return
    exact(read_matrix(path, tasks=given_tasks, scale=scale), scale)  # an explicit scale always reads exactly
    if scale == 100 and all(v <= 1 for row in in_file for v in row if v is not None):
        # Genuinely ambiguous: a percent file whose values are all <= 1 is also a valid 0-1 file, so auto
        # reads it as 0-1 (and says so); only an explicit scale=100 reads it right, as checked just above.
        assert read_matrix(path, tasks=given_tasks).scale == 1
        assume(False)
    if scale == 100 and _mixed_looking(in_file, T):  # e.g. one task below 1% throughout: auto cannot tell
        with pytest.raises(AglclError, match="mixed scales"):
            read_matrix(path, tasks=given_tasks)
        return
    exact(read_matrix(path, tasks=given_tasks), scale)
