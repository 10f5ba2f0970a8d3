"""Regression metrics for score prediction: Kendall's tau-b (the fusion paper's primary metric),
Spearman's rho, R^2 and MAE, overall and per group (district, split, ...).

The rank correlations are scipy's (``kendalltau`` is Knight's O(n log n) algorithm, so 100k
cells take milliseconds); the inputs are checked here first, so a NaN is an error naming the
array, and a constant input gives NaN without a warning. No torch.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

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


def _constant(values: np.ndarray) -> bool:
    return bool(values.size) and bool((values == values[0]).all())


def kendall_tau_b(pred: ArrayLike, true: ArrayLike) -> float:
    """Kendall's tau-b between two 1-D arrays, with the tie correction (``scipy.stats.kendalltau``,
    variant ``b``).

    Returns:
        tau-b in [-1, 1]; NaN when either input is constant or has fewer than 2 items.

    Raises:
        ValueError: for NaN/inf values, arrays of different length or not 1-D.
    """
    x, y = _pair(pred, true)
    if x.size < 2 or _constant(x) or _constant(y):
        return math.nan
    return float(stats.kendalltau(x, y, variant="b").statistic)


def spearman(pred: ArrayLike, true: ArrayLike) -> float:
    """Spearman's rho (``scipy.stats.spearmanr``): the Pearson correlation of average ranks.

    Returns:
        rho in [-1, 1]; NaN when either input is constant or has fewer than 2 items.

    Raises:
        ValueError: for NaN/inf values, arrays of different length or not 1-D.
    """
    x, y = _pair(pred, true)
    if x.size < 2 or _constant(x) or _constant(y):
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


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
