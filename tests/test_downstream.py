"""The downstream evaluations on constructed embeddings with known answers."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from core.downstream import (
    paired_difference,
    perception_probe,
    recall_at_k,
    region_means,
    socioeconomic_r2,
)
from core.search import IndexSpec, VectorIndex


def test_recall_at_k_on_a_constructed_case():
    # Database: 4 places 100 m apart on a line, embedded as one-hot vectors.
    database = np.eye(4)
    database_xy = np.array([[0, 0], [100, 0], [200, 0], [300, 0]], float)
    # Query 0 is place 0 seen again (its embedding nearest place 0): a hit at 1.
    # Query 1 stands at place 1 but looks most like place 3, then place 1: a miss at 1, hit at 2.
    # Query 2 stands 60 m from every place: no positive within 25 m, left out.
    queries = np.array([[1, 0.1, 0, 0], [0, 0.5, 0, 1], [1, 1, 1, 1]], float)
    queries_xy = np.array([[3, 0], [101, 4], [50, 60]], float)
    result = recall_at_k(database, database_xy, queries, queries_xy, ks=(1, 2, 4), radius_m=25)
    assert result == {"recall@1": 0.5, "recall@2": 1.0, "recall@4": 1.0, "queries": 2}


def test_recall_counts_any_positive_within_the_radius():
    database = np.array([[1.0, 0], [0, 1.0]])
    database_xy = np.array([[0, 0], [20, 0]], float)  # both within 25 m of the query
    result = recall_at_k(database, database_xy, np.array([[0, 1.0]]), np.array([[10, 0]]), ks=(1,))
    assert result["recall@1"] == 1.0
    far = recall_at_k(
        database, database_xy + 1000, np.array([[0, 1.0]]), np.array([[10, 0]]), ks=(1,)
    )
    assert far["queries"] == 0


def brute_force_recall(database, database_xy, queries, queries_xy, ks, radius_m):
    """Recall@K written out with numpy alone: full cosine matrix, full sort, pairwise distances."""
    unit = database / np.linalg.norm(database, axis=1, keepdims=True)
    asked = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    order = np.argsort(-(asked @ unit.T), axis=1, kind="stable")
    distance = np.linalg.norm(queries_xy[:, None] - database_xy[None], axis=2)
    recognisable = (distance <= radius_m).any(axis=1)
    near = np.take_along_axis(distance, order, 1)[recognisable] <= radius_m
    return {f"recall@{k}": float(near[:, :k].any(axis=1).mean()) for k in ks} | {
        "queries": int(recognisable.sum())
    }


def place_recognition_case(images=3000, queries=400, dim=32, seed=0):
    """Images along streets whose embeddings vary smoothly with position (nearby ones alike)."""
    rng = np.random.default_rng(seed)
    frequencies = rng.standard_normal((dim, 2)) / 40.0
    phases = rng.uniform(0, 2 * np.pi, dim)

    def draw(n):
        xy = rng.uniform(0, 1500, (n, 2))
        xy[: n // 2, 1] = np.round(xy[: n // 2, 1] / 100) * 100  # half on east-west streets
        embedding = np.cos(xy @ frequencies.T + phases) + 0.8 * rng.standard_normal((n, dim))
        return embedding.astype(np.float32), xy

    return (*draw(images), *draw(queries))


def test_recall_at_k_equals_an_independent_brute_force():
    database, database_xy, queries, queries_xy = place_recognition_case()
    ks = (1, 5, 10)
    expected = brute_force_recall(database, database_xy, queries, queries_xy, ks, 25.0)
    assert 0 < expected["recall@1"] < expected["recall@10"] < 1  # neither trivial nor hopeless
    result = recall_at_k(database, database_xy, queries, queries_xy, ks=ks, batch=64)
    assert result == pytest.approx(expected, abs=1e-12)
    # The same through an index built beforehand in chunks (how a 10 M database is searched).
    index = VectorIndex.empty(IndexSpec("flat"), database.shape[1])
    index.add(np.array_split(database, 5))
    assert recall_at_k(index, database_xy, queries, queries_xy, ks=ks) == result
    # Above a (lowered) threshold the compressed IVF index loses little.
    approximate = recall_at_k(database, database_xy, queries, queries_xy, ks=ks, exact_max=500)
    for k in ks:
        assert approximate[f"recall@{k}"] == pytest.approx(expected[f"recall@{k}"], abs=0.05)


def test_lasso_recovers_a_linear_target():
    rng = np.random.default_rng(0)
    features = pd.DataFrame(
        rng.standard_normal((200, 12)), index=[f"BU{i:04d}" for i in range(200)]
    )
    weights = rng.standard_normal(12)
    targets = pd.DataFrame(
        {
            "income": features.to_numpy() @ weights + 0.01 * rng.standard_normal(200),
            "noise": rng.standard_normal(200),
        },
        index=features.index,
    )
    scores = socioeconomic_r2(features, targets)
    assert scores["income"] > 0.98
    assert scores["noise"] < 0.1


def test_region_means_average_per_region():
    means = region_means(np.array([[1.0, 2], [3, 4], [10, 10]]), ["a", "a", "b"])
    assert means.loc["a"].tolist() == [2.0, 3.0] and means.loc["b"].tolist() == [10.0, 10.0]


def test_perception_probe_reads_a_linear_preference():
    rng = np.random.default_rng(1)
    left, right = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
    direction = rng.standard_normal(8)
    wins = (left - right) @ direction > 0
    result = perception_probe(left, right, wins)
    assert result["accuracy"] > 0.95 and result["auc"] > 0.99 and result["votes"] == 400
    chance = perception_probe(left, right, rng.random(400) > 0.5)
    assert chance["accuracy"] == pytest.approx(0.5, abs=0.1)


def bootstrap_by_hand(before, after, resamples=2000, seed=0):
    """The paired percentile bootstrap written out: resample the queries, take the mean change,
    read the 2.5% and 97.5% quantiles (the hand-written version scipy's replaced)."""
    delta = np.asarray(after, float) - np.asarray(before, float)
    draws = np.random.default_rng(seed).integers(0, delta.size, (resamples, delta.size))
    means = delta[draws].mean(axis=1)
    return delta.mean(), np.quantile(means, 0.025), np.quantile(means, 0.975)


@pytest.mark.parametrize("seed", [0, 3])
def test_paired_difference_matches_the_bootstrap_by_hand(seed):
    # UGBench-like: reciprocal ranks among 10 candidates over 3000 queries, before and after.
    rng = np.random.default_rng(seed)
    rank = rng.integers(1, 11, 3000)
    better = np.maximum(1, rank - rng.integers(-2, 4, 3000))
    for before, after in ((1.0 / rank, 1.0 / better), (rank == 1, better == 1)):
        got = paired_difference(before, after, seed=seed)
        # Same draws from the same generator; only the quantile arithmetic may differ (~1e-15).
        np.testing.assert_allclose(got, bootstrap_by_hand(before, after, seed=seed), atol=1e-12)
        assert got[1] < got[0] < got[2]


def test_paired_difference_edge_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert paired_difference(np.zeros(200), np.full(200, 0.1)) == pytest.approx((0.1,) * 3)
        assert paired_difference([0.5], [1.0]) == (0.5, 0.5, 0.5)
        assert all(np.isnan(paired_difference([], [])))
        assert all(np.isnan(paired_difference([0.0, np.nan, 1.0], [1.0, 1.0, 1.0])))
