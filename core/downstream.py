"""The three downstream evaluations of street-view encoders (UrbanSTCL), on fixed embeddings.

- Visual place recognition: a database of one capture year, queries from another; a query is
  recognised at K when one of its K nearest database images (cosine) lies within ``radius_m``.
  The search is faiss's (:mod:`core.search`), in query batches: exact up to a million database
  images, IVF-SQ8 beyond (built from the array, or built chunk by chunk and passed in).
- Socioeconomic estimation: mean image embedding per neighbourhood, standardised, PCA keeping
  99% of the variance, LASSO with 5-fold cross-validated alpha; R² of out-of-fold predictions.
- Perception: Place Pulse 2 style pairwise votes; a logistic regression on the difference of the
  two images' embeddings predicts the winner; cross-validated accuracy and ROC AUC.

Numpy, scipy, scikit-learn and faiss only, so the same numbers come out whatever produced the
embeddings.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from scipy.spatial import cKDTree
from sklearn.decomposition import PCA
from sklearn.linear_model import LassoCV, LogisticRegression
from sklearn.metrics import accuracy_score, r2_score, roc_auc_score
from sklearn.model_selection import KFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.search import VectorIndex, plan_index

#: Database images up to which :func:`recall_at_k` searches exactly: a batched evaluation scans a
#: million 128-d vectors for ten thousand queries in a minute or two on two cores.
EXACT_EVAL_MAX = 1_000_000


def recall_at_k(
    database: np.ndarray | VectorIndex,
    database_xy: np.ndarray,
    queries: np.ndarray,
    queries_xy: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    radius_m: float = 25.0,
    batch: int = 2048,
    exact_max: int = EXACT_EVAL_MAX,
) -> dict[str, float]:
    """Recall@K of place recognition by cosine similarity.

    Queries with no database image within ``radius_m`` cannot be recognised and are left out
    (reported as ``queries``).

    Args:
        database: ``(n, dim)`` embeddings searched, or a :class:`core.search.VectorIndex` of
            them (rows in the order of ``database_xy``), e.g. one built chunk by chunk for a
            database too large to hold as one array.
        database_xy: ``(n, 2)`` their positions in metres.
        queries: ``(m, dim)`` embeddings looked up.
        queries_xy: ``(m, 2)`` their positions in metres.
        ks: the K values.
        radius_m: how close a retrieved image must be to count as the same place.
        batch: queries searched at once (bounds the memory of one search step).
        exact_max: an array database with more rows gets an approximate index (IVF-SQ8).

    Returns:
        ``recall@K`` per K, and ``queries`` (the number evaluated).
    """
    if isinstance(database, VectorIndex):
        index = database
    else:
        database = np.asarray(database, np.float32)
        spec = plan_index(len(database), database.shape[1], exact_max, kind="ivf-sq8")
        index = VectorIndex.build(database, spec)
    if len(index) != len(database_xy):
        raise ValueError(f"{len(index)} database embeddings but {len(database_xy)} positions")
    tree = cKDTree(np.asarray(database_xy, float))
    positives = tree.query_ball_point(np.asarray(queries_xy, float), r=radius_m)
    keep = np.array([len(p) > 0 for p in positives], bool)
    positives = [set(p) for p, k in zip(positives, keep, strict=True) if k]
    _, ranked = index.search(np.asarray(queries, np.float32)[keep], max(ks), batch=batch)
    return recall_of_ranking(ranked, positives, ks)


def recall_of_ranking(
    ranked: np.ndarray, positives: Sequence[set[int]], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K from each query's retrieved database rows, best first.

    Args:
        ranked: ``(m, >= max(ks))`` database rows per query (-1: nothing retrieved).
        positives: per query, the database rows of the same place.
        ks: the K values.

    Returns:
        ``recall@K`` per K, and ``queries``.
    """
    hits = np.zeros((len(positives), len(ks)), bool)
    for row, (retrieved, right) in enumerate(zip(ranked, positives, strict=True)):
        found = np.array([index in right for index in retrieved], bool)
        hits[row] = [found[:k].any() for k in ks]
    result = {
        f"recall@{k}": float(hits[:, i].mean()) if len(hits) else float("nan")
        for i, k in enumerate(ks)
    }
    return result | {"queries": int(len(hits))}


def region_means(embeddings: np.ndarray, regions: Sequence[str]) -> pd.DataFrame:
    """Mean embedding per region (e.g. per buurt ``cbsCode``), indexed by region."""
    frame = pd.DataFrame(np.asarray(embeddings, np.float32))
    return frame.groupby(np.asarray(regions)).mean()


def socioeconomic_r2(
    features: pd.DataFrame, targets: pd.DataFrame, folds: int = 5, seed: int = 0
) -> dict[str, float]:
    """Out-of-fold R² of standardise -> PCA(99%) -> LassoCV per target column.

    Args:
        features: one row per region (index), e.g. :func:`region_means`.
        targets: one row per region (index) and one column per target; regions missing from
            either side are left out, as are NaN targets.
        folds: outer folds for the out-of-fold predictions (LassoCV picks alpha with 5 inner folds).
        seed: seed of the folds and of LassoCV.
    """
    joined = features.join(targets, how="inner")
    x_columns = list(features.columns)
    scores = {}
    for target in targets.columns:
        rows = joined[joined[target].notna()]
        if len(rows) < 2 * folds:
            scores[target] = float("nan")
            continue
        model = make_pipeline(
            StandardScaler(),
            PCA(n_components=0.99, svd_solver="full"),
            LassoCV(cv=5, random_state=seed, max_iter=20_000),
        )
        split = KFold(folds, shuffle=True, random_state=seed)
        predicted = cross_val_predict(
            model, rows[x_columns].to_numpy(), rows[target].to_numpy(), cv=split
        )
        scores[target] = float(r2_score(rows[target], predicted))
    return scores


def perception_probe(
    left: np.ndarray, right: np.ndarray, left_wins: np.ndarray, folds: int = 5, seed: int = 0
) -> dict[str, float]:
    """Cross-validated accuracy and ROC AUC of a linear probe on ``left - right`` embeddings.

    Both orders of every pair are used in training folds (the winner flips), so the probe has no
    side bias; each vote is scored once, in its original order.

    Args:
        left: ``(n, dim)`` embeddings of the left image of each decided vote.
        right: ``(n, dim)`` embeddings of the right image.
        left_wins: ``(n,)`` booleans.
        folds: cross-validation folds.
        seed: seed of the folds.
    """
    difference = np.asarray(left, np.float32) - np.asarray(right, np.float32)
    labels = np.asarray(left_wins, bool)
    if len(np.unique(labels)) < 2 or len(labels) < 2 * folds:
        return {"accuracy": float("nan"), "auc": float("nan"), "votes": int(len(labels))}
    probability = np.zeros(len(labels))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(
        difference, labels
    ):
        x = np.concatenate([difference[train], -difference[train]])
        y = np.concatenate([labels[train], ~labels[train]])
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, solver="newton-cholesky"))
        probe.fit(x, y)
        probability[test] = probe.predict_proba(difference[test])[:, 1]
    return {
        "accuracy": float(accuracy_score(labels, probability > 0.5)),
        "auc": float(roc_auc_score(labels, probability)),
        "votes": int(len(labels)),
    }


def candidate_sets(groups: Sequence, k: int, seed: int = 0) -> np.ndarray:
    """For each query ``i``, ``k`` candidate indices: ``i`` itself first, then ``k - 1`` others
    drawn from other groups (items of one group, e.g. one place, are not each other's negatives).

    Returns:
        ``(n, k')`` int array with ``k' = min(k, 1 + items outside the smallest group)``.
    """
    labels = pd.factorize(pd.Series(list(groups), dtype=str))[0]
    rng = np.random.default_rng(seed)
    n = len(labels)
    others_min = n - np.bincount(labels).max() if n else 0
    width = max(1, min(k, 1 + others_min))
    out = np.empty((n, width), dtype=np.int64)
    for i in range(n):
        pool = np.flatnonzero(labels != labels[i])
        out[i, 0] = i
        out[i, 1:] = rng.choice(pool, width - 1, replace=False) if width > 1 else []
    return out


def ranks(similarity: np.ndarray) -> np.ndarray:
    """Each query's rank of its right answer (column 0): 1 + the candidates scored strictly higher."""
    similarity = np.asarray(similarity, dtype=np.float64)
    return 1 + (similarity[:, 1:] > similarity[:, :1]).sum(axis=1)


def _mean_difference(before: np.ndarray, after: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(after - before, axis=axis)


def paired_difference(
    before: np.ndarray, after: np.ndarray, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``after - before`` over paired queries, with a 95% bootstrap interval.

    The interval is ``scipy.stats.bootstrap``'s paired percentile interval over ``resamples``
    resamples of the queries, drawn by ``numpy.random.default_rng(seed)``.

    Returns:
        ``(mean, low, high)``; all NaN without queries.
    """
    before = np.asarray(before, dtype=np.float64)
    after = np.asarray(after, dtype=np.float64)
    delta = after - before
    if delta.size == 0:
        return float("nan"), float("nan"), float("nan")
    if delta.size == 1:  # scipy needs two; every resample of one query is that query
        return (float(delta[0]),) * 3
    with warnings.catch_warnings():
        # NaN differences give a NaN interval, as they give a NaN mean; no warning about it.
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        interval = stats.bootstrap(
            (before, after),
            _mean_difference,
            n_resamples=resamples,
            paired=True,
            vectorized=True,
            confidence_level=0.95,
            method="percentile",
            rng=np.random.default_rng(seed),
        ).confidence_interval
    return float(delta.mean()), float(interval.low), float(interval.high)


def ranking_metrics(similarity: np.ndarray, ks: Sequence[int] = (1, 3, 5, 10)) -> dict[str, float]:
    """Hit@K and MRR when column 0 of each row of ``similarity`` is the right answer.

    The rank is 1 + the number of candidates scored strictly higher than the right one.
    """
    rank = ranks(similarity)
    result = {f"hit@{k}": float((rank <= k).mean()) for k in ks if k <= similarity.shape[1]}
    return result | {
        "mrr": float((1.0 / rank).mean()),
        "queries": int(len(rank)),
        "candidates": int(similarity.shape[1]),
    }
