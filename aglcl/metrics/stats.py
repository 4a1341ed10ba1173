"""Confidence intervals and paired tests for continual-learning results (docs/statistics.md).

    t_interval([0.61, 0.65, 0.58])                  # mean and 95% Student-t CI over seeds
    paired([0.61, 0.65, 0.58], [0.55, 0.60, 0.57])  # a - b per seed: mean, t CI, t-test p, exact sign-flip p
    bootstrap_run(scores, b_scores)                 # one run: 95% CI of each metric over its test examples

Two sources of noise, two intervals:

* **Test sampling** (one run): :func:`bootstrap_run` resamples each task's test examples with replacement,
  the *same* draw at every stage (the stages score the same examples, so their errors are paired), and
  recomputes R, b and the metrics; the interval is the percentile interval of the replicates.
* **Training noise** (seeds, orders): :func:`t_interval` over the runs of a sweep row, and :func:`paired` for
  a row against a baseline, run for run with the same seed (and order): the paired t-test's interval and
  p-value, and the exact sign-flip permutation test's p-value (all 2^n sign patterns; no normality assumed,
  which matters at n = 3-5).
"""

from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.95


def _clean(values) -> np.ndarray:
    return np.array([float(v) for v in values if v is not None and not math.isnan(float(v))], dtype=float)


def t_interval(values, confidence: float = CONFIDENCE) -> dict:
    """``{"mean", "lo", "hi", "sd", "n"}`` of ``values`` (None/NaN skipped): Student-t interval for the mean,
    ``mean ± t_{(1+c)/2, n-1} · sd / √n`` with the sample sd (ddof=1). ``lo``/``hi``/``sd`` are None for n < 2;
    everything is None for n = 0."""
    from scipy import stats

    x = _clean(values)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "sd": None, "n": 0}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None, "sd": None, "n": 1}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "n": n}


def sign_flip_p(diffs) -> float | None:
    """Two-sided p-value of the exact sign-flip permutation test of mean(diffs) = 0: the share of the 2^n
    sign patterns whose |mean| is at least the observed |mean| (the observed pattern and its mirror
    included, so p >= 2^(1-n); p = 1 when every difference is 0). None for n = 0; at most n = 24."""
    d = _clean(diffs)
    n = int(d.size)
    if n == 0:
        return None
    if n > 24:
        raise ValueError(f"sign_flip_p: n={n} is too many pairs for the exact test (at most 24)")
    observed = abs(d.sum())
    patterns = np.arange(1 << n, dtype=np.int64)[:, None]
    signs = 1.0 - 2.0 * ((patterns >> np.arange(n)) & 1)  # (2^n, n) of ±1
    sums = np.abs(signs @ d)
    return float(np.mean(sums >= observed - 1e-12 * max(1.0, observed)))


def paired(a, b, confidence: float = CONFIDENCE) -> dict:
    """``a − b`` over pairs (the same seed / order): ``{"n", "mean", "lo", "hi", "p_t", "p_sign"}``.

    ``lo``/``hi``: the paired t interval of the mean difference; ``p_t``: the two-sided paired t-test;
    ``p_sign``: the exact sign-flip test (:func:`sign_flip_p`). Pairs with a None on either side are dropped.
    With n < 2, or all differences equal (sd = 0), the t quantities are None (the sign-flip p stays defined).
    """
    from scipy import stats

    pairs = [(float(x), float(y)) for x, y in zip(a, b, strict=True) if x is not None and y is not None
             and not math.isnan(float(x)) and not math.isnan(float(y))]
    diffs = [x - y for x, y in pairs]
    ci = t_interval(diffs, confidence)
    out = {"n": ci["n"], "mean": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "p_t": None,
           "p_sign": sign_flip_p(diffs)}
    if ci["n"] >= 2 and ci["sd"]:
        t = ci["mean"] / (ci["sd"] / math.sqrt(ci["n"]))
        out["p_t"] = float(2 * stats.t.sf(abs(t), ci["n"] - 1))
    elif ci["n"] >= 2:  # every difference equal: the interval is that value, t is undefined
        out["lo"] = out["hi"] = ci["mean"]
    return out


def excludes_zero(lo, hi) -> bool:
    """Whether the interval [lo, hi] lies wholly on one side of 0."""
    return lo is not None and hi is not None and (lo > 0 or hi < 0)


def bootstrap_run(scores: dict, b_scores: dict | None, tasks: list[str], *, resamples: int = 1000,
                  confidence: float = CONFIDENCE, seed: int = 0, metrics=None) -> dict:
    """Percentile bootstrap CI of each metric of one run, over its test examples.

    ``scores[stage][task]`` (stage 1..T) and ``b_scores[task]``: the per-example scores of a task's test
    split, in the same order at every stage (a task not scored at a stage is absent). Each replicate
    draws, per task, n_task indices with replacement, applies them at every stage and to b, and computes
    ``metrics(R, b)`` (default :func:`aglcl.metrics.cl.available`'s metrics). Returns
    ``{metric: [lo, hi]}`` for the metrics defined on the data (None where the metric itself is None).
    """
    from aglcl.metrics.cl import available

    compute = metrics or (lambda R, b: available(R, b)[0])
    T = len(tasks)
    rng = np.random.default_rng(seed)
    arrays = {(s, t): np.asarray(v, dtype=float) for s, row in scores.items() for t, v in row.items()}
    sizes = {}
    for (_, task), v in arrays.items():
        sizes.setdefault(task, v.size)
        if v.size != sizes[task]:
            raise ValueError(f"bootstrap_run: task {task!r} has {v.size} scores at one stage and {sizes[task]} at "
                             "another; every stage must score the same test examples")
    base = {t: np.asarray(v, dtype=float) for t, v in (b_scores or {}).items()}
    replicates: dict[str, list[float]] = {}
    for _ in range(resamples):
        draw = {t: rng.integers(0, n, n) for t, n in sizes.items() if n}
        R = [[float(arrays[s, t][draw[t]].mean()) if (s, t) in arrays and t in draw else None for t in tasks]
             for s in range(1, T + 1)]
        b = [float(base[t][draw[t]].mean()) if t in base and t in draw and base[t].size == sizes[t] else None
             for t in tasks] if b_scores is not None else None
        for key, value in compute(R, b).items():
            replicates.setdefault(key, []).append(value)
    alpha = (1 - confidence) / 2
    out = {}
    for key, values in replicates.items():
        known = [v for v in values if v is not None]
        out[key] = (None if len(known) < len(values) or not known else
                    [float(np.quantile(known, alpha)), float(np.quantile(known, 1 - alpha))])
    return out
