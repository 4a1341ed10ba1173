"""Continual-learning metrics on hand-computed matrices (formulas in docs/design.md, "Metric definitions")."""

import numpy as np
import pytest

from aglcl.errors import AglclError
from aglcl.metrics.cl import aia, bwt, compute_all, forgetting, fwt, op, plasticity

# R[t][i]: score on task i after training task t. R[1][0] > R[0][0], so forgetting != -BWT.
R3 = [
    [0.80, 0.10, None],
    [0.85, 0.90, 0.30],
    [0.50, 0.70, 0.60],
]
B3 = [0.10, 0.20, 0.10]


def test_three_tasks_by_hand():
    assert op(R3) == pytest.approx((0.5 + 0.7 + 0.6) / 3)  # 0.6
    assert bwt(R3) == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)  # -0.25
    assert fwt(R3, B3) == pytest.approx(((0.1 - 0.2) + (0.3 - 0.1)) / 2)  # 0.05
    assert forgetting(R3) == pytest.approx(((0.85 - 0.5) + (0.9 - 0.7)) / 2)  # 0.275
    assert aia(R3) == pytest.approx((0.8 + (0.85 + 0.9) / 2 + 0.6) / 3)  # 0.758333
    assert plasticity(R3) == pytest.approx((0.8 + 0.9 + 0.6) / 3)


def test_numpy_input_with_nan_matches_lists():
    M = np.array([[np.nan if v is None else v for v in row] for row in R3])
    assert compute_all(M, B3) == pytest.approx(compute_all(R3, B3))


def test_paper_style_table_lower_triangle_in_percent():
    # A table as printed in papers: percentages, nothing above the diagonal.
    R = [
        [70.0, None, None, None],
        [62.0, 80.0, None, None],
        [72.0, 74.0, 66.0, None],
        [50.0, 71.0, 60.0, 90.0],
    ]
    m = compute_all(R)
    assert m["op"] == pytest.approx(271 / 4)  # 67.75
    assert m["bwt"] == pytest.approx((-20 - 9 - 6) / 3)  # -11.667
    assert m["forgetting"] == pytest.approx((22 + 9 + 6) / 3)  # max of task 1 is 72, after task 3
    assert m["aia"] == pytest.approx((70 + 71 + 212 / 3 + 271 / 4) / 4)  # 3353/48
    assert m["plasticity"] == pytest.approx(306 / 4)
    assert m["fwt"] is None
    assert fwt(R, [10.0, 20.0, 30.0, 40.0]) is None  # R[i-1][i] unknown


def test_compute_all_keys_and_fwt_none_without_b():
    m = compute_all(R3)
    assert set(m) == {"op", "bwt", "fwt", "forgetting", "aia", "plasticity"}
    assert m["fwt"] is None
    assert fwt(R3) is None
    assert fwt(R3, [0.1, None, 0.1]) is None


def test_single_task():
    for metric in (bwt, forgetting):
        with pytest.raises(AglclError, match="T=1"):
            metric([[0.5]])
    with pytest.raises(AglclError, match="T=1"):
        fwt([[0.5]], [0.1])
    assert op([[0.5]]) == plasticity([[0.5]]) == aia([[0.5]]) == 0.5
    assert compute_all([[0.5]])["bwt"] is None


def test_missing_cell_is_named():
    R = [[None, None], [0.5, None]]
    with pytest.raises(AglclError, match=r"R\[0\]\[0\]"):
        bwt(R)
    with pytest.raises(AglclError, match=r"R\[1\]\[1\]"):
        op(R)
    with pytest.raises(AglclError, match=r"R\[0\]\[0\]"):
        forgetting(R)
    assert bwt([[0.8, None], [0.5, None]]) == pytest.approx(-0.3)  # R[1][1] is not needed


def test_bad_shapes():
    with pytest.raises(AglclError, match="square"):
        op([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    with pytest.raises(AglclError):
        op([[0.1, 0.2], [0.3]])
    with pytest.raises(AglclError, match="one entry per task"):
        fwt(R3, [0.1, 0.2])


def test_diagonal_only_keeps_plasticity_alone():
    from aglcl.metrics.cl import compute_all

    out = compute_all([[0.5, 0.1], [0.2, 0.7]], [0.0, 0.0], diagonal_only=True)
    assert out["plasticity"] == pytest.approx(0.6)
    assert all(out[k] is None for k in ("op", "bwt", "fwt", "forgetting", "aia"))
