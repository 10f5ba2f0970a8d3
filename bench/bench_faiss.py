"""faiss at national scale: the neighbour index of 3.4 M cells, and place recognition over 10 M
street images in bounded memory.

Each part runs in a child process of its own, so its peak resident memory is its own.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from scipy.spatial import cKDTree

from bench.common import register
from core import search
from core.downstream import recall_at_k, recall_of_ranking
from core.neighbours import CANDIDATES_PER_RESULT, MIN_CANDIDATES, EmbeddingIndex
from core.runs import INDEX_FILE
from core.search import VectorIndex, plan_index, unit_rows

GB = 1e9


def _rss() -> int:
    """This process's resident memory now, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's peak resident memory so far, in bytes: ``VmHWM``, the high-water mark of
    its own address space (``ru_maxrss`` would also count the parent's memory at the fork that
    started this child)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


class Mixture:
    """Clustered embeddings: a mixture of Gaussians with unequal weights and spreads, varying
    along a shared low-rank basis with a decaying spectrum, plus isotropic noise. Its rows are
    unit length, as the index stores them."""

    def __init__(self, dim: int, clusters: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        rank = min(24, dim)
        self.centres = rng.standard_normal((clusters, dim)).astype(np.float32)
        basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0] / np.sqrt(np.arange(1, rank + 1))
        self.basis = basis.T.astype(np.float32)
        weights = rng.zipf(1.5, clusters).astype(float)
        self.weights = 0.5 * weights / weights.sum() + 0.5 / clusters
        self.spread = rng.uniform(1.0, 3.0, clusters).astype(np.float32)

    def draw(self, rows: int, rng: np.random.Generator) -> np.ndarray:
        """``rows`` unit vectors."""
        label = rng.choice(len(self.centres), rows, p=self.weights)
        within = rng.standard_normal((rows, len(self.basis)), dtype=np.float32)
        out = self.centres[label] + (within * self.spread[label, None]) @ self.basis
        out += 0.3 * rng.standard_normal(out.shape, dtype=np.float32)
        return unit_rows(out)


def exact_top_k(
    database: np.ndarray, queries: np.ndarray, k: int, chunk: int = 65_536
) -> np.ndarray:
    """Rows of the ``k`` largest inner products per query, by numpy in database chunks."""
    best_similarity = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(database), chunk):
        similarity = queries @ database[start : start + chunk].T
        top = np.argpartition(-similarity, min(k, similarity.shape[1] - 1), axis=1)[:, :k]
        best_similarity, best_rows = _merge(
            best_similarity, best_rows, np.take_along_axis(similarity, top, 1), top + start, k
        )
    return best_rows


def _merge(similarity_a, rows_a, similarity_b, rows_b, k):
    similarity = np.concatenate([similarity_a, similarity_b], axis=1)
    rows = np.concatenate([rows_a, rows_b], axis=1)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarity, order, 1), np.take_along_axis(rows, order, 1)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def _ms(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1e3
    return {
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
    }


def batched_search(index: EmbeddingIndex, queries: np.ndarray, k: int) -> np.ndarray:
    """Rows of the ``k`` nearest per query, all queries at once: the candidates of
    :meth:`EmbeddingIndex.search` from one batched call, re-ranked by exact cosine."""
    wanted = k if index.exact else max(k * CANDIDATES_PER_RESULT, MIN_CANDIDATES)
    _, rows = index.index.search(queries, wanted)
    similarity = np.einsum("mkd,md->mk", index.vectors[np.maximum(rows, 0)], unit_rows(queries))
    similarity[rows < 0] = -np.inf
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rows, order, 1)


def cell_index(cells: int, dim: int, clusters: int, queries: int, k: int, seed: int) -> dict:
    """The dashboard's neighbour index over ``cells`` clustered embeddings: build, cache,
    recall@k against exact search, per-query latency (single and batched)."""
    mixture = Mixture(dim, clusters, seed)
    rng = np.random.default_rng(seed + 1)
    start = time.perf_counter()
    database = np.empty((cells, dim), np.float32)
    for first in range(0, cells, 250_000):
        database[first : first + 250_000] = mixture.draw(min(250_000, cells - first), rng)
    asked = mixture.draw(queries, np.random.default_rng(seed + 2))  # held out, not in the index
    generate_s = time.perf_counter() - start

    start = time.perf_counter()
    truth = exact_top_k(database, asked, k)
    exact_batch_s = time.perf_counter() - start
    single = []
    for query in asked[:5]:
        search._use_threads(1)
        start = time.perf_counter()
        faiss.knn(query[None], database, k, metric=faiss.METRIC_INNER_PRODUCT)
        single.append(time.perf_counter() - start)

    ids = np.arange(cells, dtype=np.int64) + 10_000_000
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / INDEX_FILE
        before = _rss()
        start = time.perf_counter()
        index = EmbeddingIndex(ids, database, cache=cache)
        build_s = time.perf_counter() - start
        index_rss = _rss() - before
        status = index.cache_status
        cache_bytes = cache.stat().st_size if cache.exists() else 0
        del index
        start = time.perf_counter()
        index = EmbeddingIndex(ids, database, cache=cache)
        load_s = time.perf_counter() - start
        reloaded = index.cache_status
    start = time.perf_counter()
    search.fingerprint(database)
    fingerprint_s = time.perf_counter() - start

    latency, found = [], []
    for query in asked:
        start = time.perf_counter()
        table = index.search(query, k)
        latency.append(time.perf_counter() - start)
        found.append(table["cell_id"].to_numpy() - ids[0])
    start = time.perf_counter()
    batched = batched_search(index, asked, k)
    batched_s = time.perf_counter() - start
    spec = index.index.spec
    _, raw = index.index.search(asked, k)  # the SQ8 index's own top k, without re-ranking
    sweep = {}
    ivf = faiss.extract_index_ivf(index.index.faiss) if not spec.exact else None
    for nprobe in (spec.nprobe // 2, spec.nprobe * 2) if ivf is not None else ():
        ivf.nprobe = nprobe
        start = time.perf_counter()
        rows = batched_search(index, asked, k)
        sweep[f"nprobe_{nprobe}"] = {
            "recall": _recall(rows, truth),
            "batched_ms_per_query": (time.perf_counter() - start) / queries * 1e3,
        }
    # The SQ8 index and the normalised vectors the candidates are re-ranked with.
    stated = spec.memory_bytes(cells, dim) + cells * dim * 4
    return {
        "cells": cells,
        "dim": dim,
        "queries": queries,
        "index": spec.factory(),
        "nprobe": spec.nprobe,
        "threads": search.threads(),
        "generate_s": generate_s,
        "build_s": build_s,
        "build_status": status,
        "cache_load_s": load_s,
        "cache_load_status": reloaded,
        "fingerprint_s": fingerprint_s,
        "cache_file_gb": cache_bytes / GB,
        "index_stated_gb": stated / GB,
        "index_rss_gb": index_rss / GB,
        f"recall@{k}": _recall(found, truth),
        f"recall@{k}_batched": _recall(batched, truth),
        f"recall@{k}_without_reranking": _recall(raw, truth),
        "candidates": max(k * CANDIDATES_PER_RESULT, MIN_CANDIDATES),
        "single_query_ms": _ms(latency),
        "batched_ms_per_query": batched_s / queries * 1e3,
        "exact_single_query_ms": statistics.median(single) * 1e3,
        "exact_batched_ms_per_query": exact_batch_s / queries * 1e3,
        "nprobe_sweep": sweep,
        "peak_rss_gb": _peak_rss() / GB,
    }


class Streets:
    """Street images on a 100 m street grid (one every ~10 m of street, a few metres off the
    centre line). An image's embedding is the look of its block (one of ``styles`` building
    styles per 400 m block), plus the detail of its place (random Fourier features of the
    position, length ``length_m``: alike a few metres apart, unrelated 50 m away), plus its own
    noise (view, season, occlusion)."""

    def __init__(
        self, images: int, dim: int, length_m: float, noise: float, styles: int, seed: int
    ) -> None:
        rng = np.random.default_rng(seed)
        self.side = float(np.sqrt(images * 500.0))  # street length 2 * side^2 / 100 = 10 m an image
        self.block = 400.0
        blocks = int(self.side // self.block) + 1
        self.styles = (rng.standard_normal((styles, dim)) / np.sqrt(dim)).astype(np.float32)
        self.style_of_block = rng.integers(0, styles, (blocks, blocks))
        self.frequencies = (rng.standard_normal((2, dim)) / length_m).astype(np.float32)
        self.phases = rng.uniform(0, 2 * np.pi, dim).astype(np.float32)
        self.noise = noise / np.sqrt(dim)

    def draw(self, rows: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings, positions in metres)`` of ``rows`` images."""
        dim = self.styles.shape[1]
        along = rng.uniform(0, self.side, rows)
        street = rng.integers(0, int(self.side // 100), rows) * 100.0 + rng.normal(0, 3, rows)
        east_west = rng.random(rows) < 0.5
        xy = np.where(east_west[:, None], np.c_[along, street], np.c_[street, along])
        xy = np.clip(xy, 0, self.side)
        block = (xy // self.block).astype(np.int64)
        embedding = self.styles[self.style_of_block[block[:, 0], block[:, 1]]]
        local = (xy - self.side / 2).astype(np.float32)  # float32 phases stay exact near 0
        embedding += np.cos(local @ self.frequencies + self.phases) / np.sqrt(dim / 2)
        embedding += self.noise * rng.standard_normal(embedding.shape, dtype=np.float32)
        return embedding, xy


def place_recognition(
    images: int,
    dim: int,
    queries: int,
    ks: tuple[int, ...],
    radius_m: float,
    chunk: int,
    seed: int,
) -> dict:
    """Recall@K over ``images`` database images through a compressed IVF index added chunk by
    chunk (never the whole database in memory), against the exact ranking."""
    streets = Streets(images, dim, length_m=15.0, noise=1.2, styles=256, seed=seed)
    rng = np.random.default_rng(seed + 1)
    asked, asked_xy = streets.draw(queries, np.random.default_rng(seed + 2))
    asked = unit_rows(asked)
    spec = plan_index(images, dim, kind="ivf-sq8")
    index = VectorIndex.empty(spec, dim)
    start = time.perf_counter()
    index.train(streets.draw(min(images, 64 * spec.nlist), np.random.default_rng(seed + 3))[0])
    train_s = time.perf_counter() - start

    database_xy = np.empty((images, 2))
    k = max(ks)
    best_similarity = np.full((queries, 0), -np.inf, np.float32)
    best_rows = np.zeros((queries, 0), np.int64)
    add_s = exact_s = 0.0
    for first in range(0, images, chunk):
        embedding, xy = streets.draw(min(chunk, images - first), rng)
        database_xy[first : first + len(xy)] = xy
        start = time.perf_counter()
        index.add(embedding)
        add_s += time.perf_counter() - start
        start = time.perf_counter()
        search._use_threads(queries)
        similarity, rows = faiss.knn(
            asked, unit_rows(embedding), k, metric=faiss.METRIC_INNER_PRODUCT
        )
        best_similarity, best_rows = _merge(best_similarity, best_rows, similarity, rows + first, k)
        exact_s += time.perf_counter() - start
        del embedding, xy
    start = time.perf_counter()
    approximate = recall_at_k(index, database_xy, asked, asked_xy, ks=ks, radius_m=radius_m)
    search_s = time.perf_counter() - start
    peak = _peak_rss()
    tree = cKDTree(database_xy)
    positives = [set(p) for p in tree.query_ball_point(asked_xy, r=radius_m) if len(p)]
    recognisable = [len(p) > 0 for p in tree.query_ball_point(asked_xy, r=radius_m)]
    exact = recall_of_ranking(best_rows[np.array(recognisable, bool)], positives, ks)
    index_bytes = index.memory_bytes()
    # What the search part holds: the index, the positions (16 B an image) and recall_at_k's
    # k-d tree over them (data copy, indices, nodes: under 40 B an image), plus one chunk being
    # generated (about 40 B per dimension and image, float64 temporaries included) and 1 GB for
    # the interpreter, numpy, scipy and faiss.
    bound = index_bytes + images * (16 + 40) + chunk * dim * 40 + 1 * GB
    return {
        "images": images,
        "dim": dim,
        "queries": queries,
        "queries_recognisable": approximate["queries"],
        "index": spec.factory(),
        "nprobe": spec.nprobe,
        "threads": search.threads(),
        "train_s": train_s,
        "add_s": add_s,
        "exact_search_s": exact_s,
        "recall_at_k_s": search_s,
        "recall": {key: value for key, value in approximate.items() if key != "queries"},
        "recall_exact": {key: value for key, value in exact.items() if key != "queries"},
        "index_stated_gb": index_bytes / GB,
        "float32_database_gb": images * dim * 4 / GB,
        "peak_rss_gb": peak / GB,
        "bound_gb": bound / GB,
    }


def _in_child(fn, **kwargs: Any) -> dict:
    """``fn(**kwargs)`` in a fresh process (spawned, so its peak memory is its own)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, **kwargs).result()


@register(
    "faiss",
    cells=3_400_000,
    dim=128,
    clusters=4000,
    queries=1000,
    k=10,
    images=10_000_000,
    place_queries=1000,
    chunk=250_000,
    seed=0,
)
def bench_faiss(
    cells: int,
    dim: int,
    clusters: int,
    queries: int,
    k: int,
    images: int,
    place_queries: int,
    chunk: int,
    seed: int,
) -> dict[str, Any]:
    """The neighbour index at national size (3.4 M cells) and place recognition at 10 M images."""
    cell = _in_child(
        cell_index, cells=cells, dim=dim, clusters=clusters, queries=queries, k=k, seed=seed
    )
    place = _in_child(
        place_recognition,
        images=images,
        dim=dim,
        queries=place_queries,
        ks=(1, 5, 10),
        radius_m=25.0,
        chunk=chunk,
        seed=seed,
    )
    return {
        f"recall@{k}": cell[f"recall@{k}"],
        "single_query_ms_median": cell["single_query_ms"]["median"],
        "batched_ms_per_query": cell["batched_ms_per_query"],
        "place_recall@1": place["recall"]["recall@1"],
        "place_recall@1_exact": place["recall_exact"]["recall@1"],
        "place_peak_rss_gb": place["peak_rss_gb"],
        "cell_index": cell,
        "place_recognition": place,
        "targets": {"recall@10_min": 0.95, "query_ms_max": 20.0, "place_peak_rss": "<= bound_gb"},
    }
