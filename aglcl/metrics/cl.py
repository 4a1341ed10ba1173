"""Continual-learning metrics: pure functions of the accuracy matrix (docs/design.md, "Metric definitions").

``R`` is T x T (list of lists or numpy array): ``R[t][i]`` is the score on task i after training
task t. The formulas below number tasks 1..T; the code indexes from 0. Cells may be ``None`` or NaN
where unknown (typically above the diagonal); a metric raises :class:`AglclError` naming the first
cell it needs that is missing. ``b[i]`` is the initial model's score on task i.
"""

from __future__ import annotations

import math

import numpy as np

from aglcl.errors import AglclError

KEYS = ("op", "bwt", "fwt", "forgetting", "aia", "plasticity")


def _matrix(R) -> np.ndarray:
    """R as a square float array with NaN for missing cells."""
    try:
        rows = [[np.nan if v is None else float(v) for v in row] for row in R]
        M = np.array(rows, dtype=float)
    except (TypeError, ValueError) as e:
        raise AglclError(f"accuracy matrix R must be a T x T table of numbers or None: {e}") from None
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise AglclError(f"accuracy matrix R must be square T x T with T >= 1, got shape {M.shape}")
    return M


def _cell(M: np.ndarray, t: int, i: int) -> float:
    v = M[t, i]
    if math.isnan(v):
        raise AglclError(f"accuracy matrix cell R[{t}][{i}] (after task {t + 1}, on task {i + 1}) is missing")
    return float(v)


def _need_two(M: np.ndarray, name: str) -> int:
    T = M.shape[0]
    if T < 2:
        raise AglclError(f"{name} needs at least 2 tasks, got T={T}")
    return T


def op(R) -> float:
    """Overall performance (average accuracy): OP = (1/T) Σ_i R[T][i]."""
    M = _matrix(R)
    T = M.shape[0]
    return sum(_cell(M, T - 1, i) for i in range(T)) / T


def bwt(R) -> float:
    """Backward transfer: BWT = 1/(T-1) Σ_{i<T} (R[T][i] - R[i][i]).

    Divides by T-1 (GEM, TRACE convention). Negative means forgetting.
    """
    M = _matrix(R)
    T = _need_two(M, "BWT")
    return sum(_cell(M, T - 1, i) - _cell(M, i, i) for i in range(T - 1)) / (T - 1)


def fwt(R, b=None) -> float | None:
    """Forward transfer: FWT = 1/(T-1) Σ_{i>=2} (R[i-1][i] - b[i]).

    Returns None when ``b`` is missing or any needed cell R[i-1][i] or b[i] is missing.
    """
    M = _matrix(R)
    T = _need_two(M, "FWT")
    if b is None:
        return None
    if len(b) != T:
        raise AglclError(f"initial scores b must have one entry per task ({T}), got {len(b)}")
    total = 0.0
    for i in range(1, T):
        r, bi = M[i - 1, i], b[i]
        if bi is None or math.isnan(r) or math.isnan(float(bi)):
            return None
        total += r - float(bi)
    return total / (T - 1)


def forgetting(R) -> float:
    """Average forgetting: F = 1/(T-1) Σ_{i<T} (max_{l<T} R[l][i] - R[T][i]).

    The max runs over the stages at or after training task i (i <= l < T), so cells above the
    diagonal (scores before a task was learned) are never needed.
    """
    M = _matrix(R)
    T = _need_two(M, "forgetting")
    total = 0.0
    for i in range(T - 1):
        best = max(_cell(M, stage, i) for stage in range(i, T - 1))
        total += best - _cell(M, T - 1, i)
    return total / (T - 1)


def aia(R) -> float:
    """Average incremental accuracy: AIA = (1/T) Σ_t OP_t, where OP_t = (1/t) Σ_{i<=t} R[t][i]."""
    M = _matrix(R)
    T = M.shape[0]
    return sum(sum(_cell(M, t, i) for i in range(t + 1)) / (t + 1) for t in range(T)) / T


def plasticity(R) -> float:
    """Plasticity (accuracy just after learning each task): P = (1/T) Σ_i R[i][i]."""
    M = _matrix(R)
    T = M.shape[0]
    return sum(_cell(M, i, i) for i in range(T)) / T


def available(R, b=None, diagonal_only: bool = False) -> tuple[dict, dict]:
    """``(metrics, unavailable)``: the metrics of :func:`compute_all`, None where a cell a metric needs is
    missing (e.g. a run with ``evaluation.tasks=past``), and ``{metric: why}`` for each such None.

    ``fwt`` is None (with a reason) when ``b`` or a cell R[i-1][i] is missing; with a single task (T=1)
    ``bwt``, ``fwt`` and ``forgetting`` are None (no reason: they are undefined). ``diagonal_only`` (a reference
    whose rows are different single-task models, ``method=single``): only ``plasticity`` means anything.
    """
    M = _matrix(R)
    if diagonal_only:
        return {"op": None, "bwt": None, "fwt": None, "forgetting": None, "aia": None, "plasticity": plasticity(M)}, {}
    many = M.shape[0] >= 2
    metrics, why = {}, {}
    for key, func in (("op", op), ("bwt", bwt), ("fwt", fwt), ("forgetting", forgetting), ("aia", aia),
                      ("plasticity", plasticity)):
        if not many and key in ("bwt", "fwt", "forgetting"):
            metrics[key] = None
            continue
        try:
            metrics[key] = func(M, b) if key == "fwt" else func(M)
        except AglclError as e:
            metrics[key], why[key] = None, str(e)
        if key == "fwt" and metrics[key] is None:
            why[key] = ("needs the initial scores b" if b is None else
                        "needs R[i-1][i] (each task scored just before it is trained) and b")
    return metrics, why


def compute_all(R, b=None, diagonal_only: bool = False) -> dict:
    """All metrics as ``{"op","bwt","fwt","forgetting","aia","plasticity"}`` (:func:`available`), raising
    :class:`AglclError` naming the first missing cell a metric other than ``fwt`` needs."""
    metrics, why = available(R, b, diagonal_only)
    strict = [reason for key, reason in why.items() if key != "fwt"]
    if strict:
        raise AglclError(strict[0])
    return metrics
