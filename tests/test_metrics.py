"""Regression metrics: tau-b against scipy and a brute-force pair count, the others against
scipy/numpy or hand-computed values, and the per-group table."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from core.metrics import grouped_metrics, kendall_tau_b, mae, r2, score_metrics, spearman


def sample(n: int, ties: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correlated pairs: ``none`` continuous, ``heavy`` a handful of levels, ``one`` ties in
    the predictions only."""
    rng = np.random.default_rng(seed)
    true = rng.normal(size=n)
    pred = true + rng.normal(size=n)
    if ties == "heavy":
        return np.round(pred), np.round(true)
    if ties == "one":
        return np.round(pred * 2) / 2, true
    return pred, true


def brute_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """The tau-b definition, pair by pair."""
    concordant = discordant = x_only = y_only = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
        if dx and dy:
            concordant += dx == dy
            discordant += dx != dy
        elif dx:
            x_only += 1
        elif dy:
            y_only += 1
    pairs = concordant + discordant
    return (concordant - discordant) / math.sqrt((pairs + x_only) * (pairs + y_only))


@pytest.mark.parametrize("ties", ["none", "heavy", "one"])
@pytest.mark.parametrize("n", [2, 3, 16, 17, 500, 3001])
def test_kendall_tau_b_matches_scipy(n, ties):
    pred, true = sample(n, ties, seed=n)
    expected = stats.kendalltau(pred, true).statistic
    assert kendall_tau_b(pred, true) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("ties", ["none", "heavy"])
def test_kendall_tau_b_matches_pair_count(ties):
    pred, true = sample(60, ties, seed=3)
    assert kendall_tau_b(pred, true) == pytest.approx(brute_tau_b(pred, true), rel=1e-12)


def test_kendall_tau_b_extremes():
    x = np.arange(10.0)
    assert kendall_tau_b(x, x) == pytest.approx(1.0)
    assert kendall_tau_b(x, -x) == pytest.approx(-1.0)
    assert kendall_tau_b([1, 1, 2, 2], [1, 1, 2, 2]) == pytest.approx(1.0)


def test_constant_input_gives_nan_like_scipy():
    pred = np.array([1.0, 2.0, 3.0, 4.0])
    constant = np.full(4, 4.2)
    assert math.isnan(stats.kendalltau(pred, constant).statistic)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN, not scipy's constant-input or small-sample warnings
        assert math.isnan(kendall_tau_b(pred, constant))
        assert math.isnan(kendall_tau_b(constant, pred))
        assert math.isnan(spearman(pred, constant))
        assert math.isnan(spearman(constant, pred))
        assert math.isnan(r2(pred, constant))
        assert math.isnan(kendall_tau_b([1.0], [2.0]))
        assert math.isnan(spearman([1.0], [2.0]))
        assert math.isnan(kendall_tau_b([], []))
        assert math.isnan(spearman([], []))
        assert spearman([1.0, 2.0], [3.0, 5.0]) == pytest.approx(1.0)


@pytest.mark.parametrize("ties", ["none", "heavy"])
def test_spearman_matches_scipy(ties):
    pred, true = sample(500, ties, seed=1)
    assert spearman(pred, true) == pytest.approx(stats.spearmanr(pred, true).statistic, rel=1e-12)


def test_r2_and_mae_by_hand_and_numpy():
    true = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.0, 2.0, 3.0, 5.0])
    assert r2(pred, true) == pytest.approx(1 - 1 / 5)  # SS_res 1, SS_tot 5
    assert r2(np.full(4, 2.5), true) == pytest.approx(0.0)  # the mean scores zero
    assert mae(pred, true) == pytest.approx(0.25)
    pred, true = sample(500, "none")
    assert mae(pred, true) == pytest.approx(np.mean(np.abs(pred - true)))
    assert r2(pred, true) == pytest.approx(1 - np.var(true - pred, mean=0) / np.var(true))


def test_score_metrics_keys_and_values():
    pred, true = sample(200, "none")
    result = score_metrics(pred, true)
    assert list(result) == ["kendall_tau", "spearman", "r2", "mae", "n"]
    assert result["n"] == 200
    assert result["kendall_tau"] == pytest.approx(stats.kendalltau(pred, true).statistic)
    assert result["mae"] == pytest.approx(mae(pred, true))


def test_score_metrics_small_input_is_nan_with_n():
    result = score_metrics([1.0, 2.0], [2.0, 1.0])
    assert result["n"] == 2
    assert all(math.isnan(result[k]) for k in ("kendall_tau", "spearman", "r2", "mae"))
    assert score_metrics([], [])["n"] == 0


def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"pred: 2 of 4 values are NaN or inf"):
        score_metrics([1.0, np.nan, np.nan, 2.0], [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match=r"true: 1 of 3 values are NaN"):
        kendall_tau_b([1.0, 2.0, 3.0], [1.0, np.inf, 3.0])
    with pytest.raises(ValueError, match=r"differ in length \(3 vs 2\)"):
        spearman([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        mae(np.ones((2, 2)), np.ones((2, 2)))


def test_grouped_metrics_per_group():
    pred, true = sample(300, "heavy", seed=5)
    districts = np.array(["Noord", "Zuid", "West"])[np.arange(300) % 3]
    districts[:2] = "Weesp"  # a group too small for metrics
    frame = pd.DataFrame({"district": districts, "p": pred, "t": true})
    table = grouped_metrics(frame, "district", pred="p", true="t")
    assert list(table.columns) == ["district", "kendall_tau", "spearman", "r2", "mae", "n"]
    assert list(table["district"]) == ["Noord", "Weesp", "West", "Zuid"]
    for row in table.itertuples():
        part = frame[frame["district"] == row.district]
        assert row.n == len(part)
        if row.district == "Weesp":
            assert math.isnan(row.kendall_tau)
            continue
        assert row.kendall_tau == pytest.approx(stats.kendalltau(part.p, part.t).statistic)
        assert row.spearman == pytest.approx(stats.spearmanr(part.p, part.t).statistic)
        assert row.mae == pytest.approx(np.mean(np.abs(part.p - part.t)))


def test_grouped_metrics_keeps_rows_without_group():
    frame = pd.DataFrame({"district": ["Zuid"] * 3 + [None] * 4, "predicted": range(7)})
    frame["true"] = frame["predicted"] * 2.0
    table = grouped_metrics(frame, "district")
    assert table["n"].tolist() == [3, 4]  # the rows outside any district are a group, last
    assert table["district"].isna().tolist() == [False, True]


def test_grouped_metrics_errors():
    frame = pd.DataFrame({"split": ["a", "b", "b"], "predicted": [1.0, np.nan, 2.0]})
    with pytest.raises(ValueError, match=r"missing columns \['true'\]"):
        grouped_metrics(frame, "split")
    frame["true"] = 1.0
    with pytest.raises(ValueError, match="predicted: 1 of 3 values are NaN"):
        grouped_metrics(frame, "split")
