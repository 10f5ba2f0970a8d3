"""Regression metrics for score prediction: Kendall's tau-b (the fusion paper's primary metric),
Spearman's rho, R^2 and MAE, overall and per group (district, split, ...).

Pure numpy: no scipy, no torch. Kendall's tau-b is Knight's O(n log n) algorithm, so 100k
cells take about 40 ms rather than the minutes of the O(n^2) pair count.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from core.io import require_columns

METRIC_NAMES = ("kendall_tau", "spearman", "r2", "mae")
MIN_ITEMS = 3  # fewer items give NaN metrics: too few to rank or to judge a fit


def _pair(
    pred: ArrayLike, true: ArrayLike, names: tuple[str, str] = ("pred", "true")
) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as 1-D float64 arrays of one length, with no NaN or inf; ``names`` for errors."""
    arrays = []
    for name, values in zip(names, (pred, true), strict=True):
        array = np.asarray(values, dtype=np.float64)
        if array.ndim != 1:
            raise ValueError(f"{name}: expected a 1-D array, got shape {array.shape}")
        bad = int((~np.isfinite(array)).sum())
        if bad:
            raise ValueError(f"{name}: {bad} of {array.size} values are NaN or inf")
        arrays.append(array)
    pred_a, true_a = arrays
    if pred_a.size != true_a.size:
        raise ValueError(
            f"{names[0]} and {names[1]} differ in length ({pred_a.size} vs {true_a.size})"
        )
    return pred_a, true_a


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Boolean mask of the first element of each run of equal values in a sorted array."""
    return np.r_[True, sorted_values[1:] != sorted_values[:-1]]


def _tied_pairs(sizes: np.ndarray) -> int:
    """Number of pairs within groups of tied values of the given sizes."""
    return int((sizes * (sizes - 1) // 2).sum())


def _run_sizes(starts: np.ndarray) -> np.ndarray:
    """Lengths of the runs whose first elements ``starts`` (a :func:`_run_starts` mask) marks."""
    return np.diff(np.flatnonzero(np.r_[starts, True]))


def _count_inversions(ranks: np.ndarray) -> int:
    """Number of pairs i < j with ranks[i] > ranks[j] (strictly), for ranks in 0..m-1.

    A bottom-up merge sort, vectorised across all blocks of one width: a stable sort of
    ``pair * m + rank`` merges every pair of sorted blocks at once (timsort sees two runs per
    pair, so a level costs about O(n)), and an element of a right block moves left by exactly
    the number of larger elements in its left partner (equal ones stay ahead: stable sort).
    """
    n = ranks.size
    m = int(ranks.max()) + 1
    position = np.arange(n)
    ranks = ranks.astype(np.int64)
    inversions = 0
    width = 1
    while width < n:
        pair = position // (2 * width)
        key = pair * m + ranks
        order = np.argsort(key, kind="stable")  # order[new position] = old position
        inversions += int(np.maximum(order - position, 0).sum())
        ranks = key[order] - pair * m
        width *= 2
    return inversions


def kendall_tau_b(pred: ArrayLike, true: ArrayLike) -> float:
    """Kendall's tau-b between two 1-D arrays, with the tie correction (as scipy's default).

    Knight's algorithm: sort by (pred, true), count ties, and count the discordant pairs as the
    inversions of ``true`` in that order.

    Returns:
        tau-b in [-1, 1]; NaN when either input is constant or has fewer than 2 items.

    Raises:
        ValueError: for NaN/inf values, arrays of different length or not 1-D.
    """
    x, y = _pair(pred, true)
    n = x.size
    if n < 2:
        return math.nan
    order = np.lexsort((y, x))
    x, y = x[order], y[order]
    x_starts = _run_starts(x)
    total = n * (n - 1) // 2
    x_ties = _tied_pairs(_run_sizes(x_starts))
    joint_ties = _tied_pairs(_run_sizes(x_starts | _run_starts(y)))
    _, y_ranks, y_counts = np.unique(y, return_inverse=True, return_counts=True)
    y_ties = _tied_pairs(y_counts)
    if x_ties == total or y_ties == total:
        return math.nan
    # y's ties within equal x come out sorted, so only strictly discordant pairs are inversions.
    discordant = _count_inversions(y_ranks)
    numerator = total - x_ties - y_ties + joint_ties - 2 * discordant
    return numerator / math.sqrt(total - x_ties) / math.sqrt(total - y_ties)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    starts = np.flatnonzero(_run_starts(values[order]))
    ends = np.r_[starts[1:], values.size]
    ranks = np.empty(values.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else math.nan


def spearman(pred: ArrayLike, true: ArrayLike) -> float:
    """Spearman's rho: the Pearson correlation of average ranks; NaN for constant input."""
    x, y = _pair(pred, true)
    if x.size < 2:
        return math.nan
    return _pearson(_average_ranks(x), _average_ranks(y))


def r2(pred: ArrayLike, true: ArrayLike) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot``; NaN when ``true`` is constant."""
    x, y = _pair(pred, true)
    if x.size == 0:
        return math.nan
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - x) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan


def mae(pred: ArrayLike, true: ArrayLike) -> float:
    """Mean absolute error; NaN for empty input."""
    x, y = _pair(pred, true)
    return float(np.abs(x - y).mean()) if x.size else math.nan


def score_metrics(pred: ArrayLike, true: ArrayLike) -> dict[str, float | int]:
    """All metrics of one prediction set.

    Returns:
        ``{"kendall_tau", "spearman", "r2", "mae"}`` as floats and ``"n"``; the metrics are NaN
        when there are fewer than 3 items.

    Raises:
        ValueError: for NaN/inf values (the message gives how many), or mismatched arrays.
    """
    x, y = _pair(pred, true)
    if x.size < MIN_ITEMS:
        values = dict.fromkeys(METRIC_NAMES, math.nan)
    else:
        values = {
            "kendall_tau": kendall_tau_b(x, y),
            "spearman": spearman(x, y),
            "r2": r2(x, y),
            "mae": mae(x, y),
        }
    return {**values, "n": int(x.size)}


def grouped_metrics(
    frame: pd.DataFrame, group_column: str, pred: str = "predicted", true: str = "true"
) -> pd.DataFrame:
    """:func:`score_metrics` per value of ``group_column`` (district, split, ...).

    Returns:
        One row per group, sorted by group (NaN group last): ``group_column``, the metrics
        and ``n``.

    Raises:
        ValueError: for a missing column, or NaN/inf in ``pred`` or ``true``.
    """
    require_columns(frame, [group_column, pred, true], "grouped_metrics frame")
    # Checked once on the whole frame, so the message counts every bad row, not one group's.
    _pair(frame[pred].to_numpy(), frame[true].to_numpy(), names=(pred, true))
    rows = [
        {group_column: group, **score_metrics(part[pred].to_numpy(), part[true].to_numpy())}
        for group, part in frame.groupby(group_column, sort=True, dropna=False)
    ]
    return pd.DataFrame(rows, columns=[group_column, *METRIC_NAMES, "n"])
