"""Confidence intervals and paired tests (aglcl.metrics.stats) on hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aglcl.metrics.stats import bootstrap_run, excludes_zero, paired, sign_flip_p, t_interval


def _t2_quantile(p):
    """Student t with 2 degrees of freedom has F(t) = 1/2 + t / (2 sqrt(t^2 + 2)): solved for t by hand."""
    r = 2 * p - 1
    return math.sqrt(2 * r * r / (1 - r * r))


def _t2_sf(t):
    return 0.5 * (1 - t / math.sqrt(t * t + 2))


def test_t_interval_by_hand():
    ci = t_interval([1.0, 2.0, 3.0])
    half = _t2_quantile(0.975) * 1.0 / math.sqrt(3)  # sd = 1 (ddof 1), t_{0.975, 2} = 4.3027
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(2.0) and ci["sd"] == pytest.approx(1.0)
    assert (ci["lo"], ci["hi"]) == pytest.approx((2 - half, 2 + half))
    assert half == pytest.approx(2.48414, abs=1e-5)
    assert t_interval([0.5, None, float("nan")]) == {"mean": 0.5, "lo": None, "hi": None, "sd": None, "n": 1}
    assert t_interval([])["mean"] is None


def test_paired_by_hand():
    out = paired([3.0, 5.0, 4.0], [1.0, 2.0, 4.0])  # differences 2, 3, 0
    sd = math.sqrt(((2 - 5 / 3) ** 2 + (3 - 5 / 3) ** 2 + (0 - 5 / 3) ** 2) / 2)
    t = (5 / 3) / (sd / math.sqrt(3))
    assert out["n"] == 3 and out["mean"] == pytest.approx(5 / 3)
    assert out["p_t"] == pytest.approx(2 * _t2_sf(t), rel=1e-9)
    half = _t2_quantile(0.975) * sd / math.sqrt(3)
    assert (out["lo"], out["hi"]) == pytest.approx((5 / 3 - half, 5 / 3 + half))
    # sign flips of (2, 3, 0): sums ±2 ±3 -> |5| in 4 of the 8 patterns
    assert out["p_sign"] == pytest.approx(0.5)
    assert not excludes_zero(out["lo"], out["hi"])


def test_sign_flip_exact_p_values():
    assert sign_flip_p([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)  # only all-plus and all-minus reach |6|
    assert sign_flip_p([0.1] * 5) == pytest.approx(2 / 32)  # the smallest two-sided p with 5 pairs
    assert sign_flip_p([1.0, -1.0]) == pytest.approx(1.0)
    assert sign_flip_p([0.0, 0.0]) == pytest.approx(1.0)
    # (3, -1, 1, 1): |sum| = 4; patterns reaching |4|: ±(3,-1,1,1), ±(3,1,-1,1), ±(3,1,1,-1), ±(3,1,1,1) -> 8 of 16
    assert sign_flip_p([3.0, -1.0, 1.0, 1.0]) == pytest.approx(8 / 16)
    assert sign_flip_p([]) is None


def test_paired_drops_incomplete_pairs_and_handles_equal_differences():
    out = paired([0.5, 0.6, None, 0.7], [0.4, 0.5, 0.1, 0.6])
    assert out["n"] == 3 and out["mean"] == pytest.approx(0.1)
    assert out["p_t"] is None and out["lo"] == out["hi"] == pytest.approx(0.1)  # sd 0: t undefined
    assert out["p_sign"] == pytest.approx(2 / 8)
    assert excludes_zero(0.01, 0.2) and excludes_zero(-0.3, -0.1) and not excludes_zero(-0.1, 0.1)
    assert not excludes_zero(None, 0.2)


def test_bootstrap_resamples_the_same_examples_at_every_stage():
    """A task nobody forgets (the same per-example scores after every stage) has BWT exactly 0 in every
    replicate: the stages are resampled together. Its OP interval still has the width of the test sample."""
    rng = np.random.default_rng(1)
    a = (rng.random(200) < 0.5).astype(float)
    b = (rng.random(200) < 0.7).astype(float)
    scores = {1: {"a": a, "b": b}, 2: {"a": a, "b": b}}
    ci = bootstrap_run(scores, {"a": a * 0, "b": b * 0}, ["a", "b"], resamples=500)
    assert ci["bwt"] == [0.0, 0.0] and ci["forgetting"] == [0.0, 0.0]
    op = (a.mean() + b.mean()) / 2
    se = math.sqrt(a.var() / 200 + b.var() / 200) / 2  # normal approximation of the OP interval
    assert ci["op"][0] == pytest.approx(op - 1.96 * se, abs=0.015)
    assert ci["op"][1] == pytest.approx(op + 1.96 * se, abs=0.015)
    assert ci["fwt"][0] < ci["fwt"][1]  # b = 0 everywhere, so fwt = R[0][1]: its interval is b's task's
    same = bootstrap_run(scores, {"a": a * 0, "b": b * 0}, ["a", "b"], resamples=500)
    assert same == ci  # seeded


def test_bootstrap_of_a_constant_task_is_a_point_and_missing_cells_stay_none():
    ones = np.ones(50)
    scores = {1: {"a": ones}, 2: {"a": ones * 0, "b": ones}}  # R[0][1] not scored (evaluation.tasks=past)
    ci = bootstrap_run(scores, {"a": ones * 0, "b": ones * 0}, ["a", "b"], resamples=50)
    assert ci["bwt"] == [-1.0, -1.0] and ci["op"] == [0.5, 0.5]
    assert ci["fwt"] is None
    with pytest.raises(ValueError, match="same test examples"):
        bootstrap_run({1: {"a": ones}, 2: {"a": ones[:10]}}, None, ["a"], resamples=2)
