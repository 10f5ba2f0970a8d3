"""faiss indexes: exact below the threshold, IVF above it, and the cache beside a run's embeddings."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from core import search
from core.neighbours import EmbeddingIndex
from core.runs import INDEX_FILE
from core.search import VectorIndex, plan_index


def clustered(rows: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """A mixture of Gaussians with unequal weights and spreads, each varying mostly along a few
    directions of its own, as embeddings do."""
    rng = np.random.default_rng(0)  # the same mixture for every seed
    centres = rng.standard_normal((clusters, dim))
    weights = rng.dirichlet(np.ones(clusters))
    directions = rng.standard_normal((clusters, 6, dim)) * rng.uniform(0.2, 0.6, (clusters, 1, 1))
    rng = np.random.default_rng(seed)
    label = rng.choice(clusters, rows, p=weights)
    within = np.einsum("nr,nrd->nd", rng.standard_normal((rows, 6)), directions[label])
    noise = 0.05 * rng.standard_normal((rows, dim))
    return (centres[label] + within + noise).astype(np.float32)


def brute_force(database: np.ndarray, queries: np.ndarray, k: int) -> tuple:
    """Cosine top-k by numpy alone: (similarities, rows), best first."""
    unit = database / np.linalg.norm(database, axis=1, keepdims=True)
    asked = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    similarity = asked @ unit.T
    rows = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarity, rows, 1), rows


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def test_the_plan_is_exact_up_to_the_threshold_and_ivf_above():
    assert plan_index(100_000, 128).kind == "flat"
    spec = plan_index(3_400_000, 128)
    assert (spec.kind, spec.nlist, spec.nprobe) == ("ivf-sq8", 1024, 32)
    assert plan_index(10_000_000, 128, kind="ivf-sq8").nlist == 2048
    assert plan_index(20_000, 32, exact_max=1000) == search.IndexSpec("ivf-sq8", 128, 16)
    # The stated memory of 10 M x 128-d codes: SQ8 one byte a dimension plus an 8-byte id.
    sq8 = plan_index(10_000_000, 128, kind="ivf-sq8").memory_bytes(10_000_000, 128)
    assert 1.36e9 < sq8 < 1.37e9


def test_the_exact_index_equals_numpy_brute_force():
    database, queries = clustered(3000), clustered(50, seed=1)
    index = VectorIndex.build(database * np.linspace(0.1, 10, 3000)[:, None])
    assert index.spec.exact
    similarity, rows = index.search(queries, 10, batch=16)  # several batches
    unit = database / np.linalg.norm(database, axis=1, keepdims=True)
    expected_similarity, expected_rows = brute_force(unit, queries, 10)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(similarity, expected_similarity, rtol=1e-5)
    similarity, rows = index.search(queries[:2], 3005)  # more than there are
    assert (rows[:, 3000:] == -1).all() and np.isneginf(similarity[:, 3000:]).all()


def test_ivf_above_a_lowered_threshold_finds_most_true_neighbours():
    database, queries = clustered(20_000), clustered(200, seed=1)
    index = EmbeddingIndex(np.arange(20_000) + 7, database, exact_max=1000)
    assert not index.exact and index.index.spec.kind == "ivf-sq8"
    assert index.cache_status == "memory"
    _, truth = brute_force(database, queries, 10)
    found = [index.search(q, 10)["cell_id"].to_numpy() - 7 for q in queries]
    assert recall(found, truth) >= 0.9
    # Candidates are re-ranked by the exact cosine: the similarities shown are exact.
    one = index.search(queries[0], 10)
    unit = database / np.linalg.norm(database, axis=1, keepdims=True)
    expected = unit[one["cell_id"] - 7] @ (queries[0] / np.linalg.norm(queries[0]))
    np.testing.assert_allclose(one["similarity"], expected, rtol=1e-5)
    nearest = index.neighbours(7, 5)
    assert 7 not in nearest["cell_id"].tolist() and len(nearest) == 5
    np.testing.assert_allclose(index.vector(7), unit[0], rtol=1e-6)


def test_a_compressed_index_built_in_chunks_still_finds_neighbours():
    database, queries = clustered(20_000, dim=64), clustered(200, dim=64, seed=1)
    _, truth = brute_force(database, queries, 10)
    spec = plan_index(len(database), 64, exact_max=1000, kind="ivf-sq8")
    index = VectorIndex.empty(spec, 64)
    index.train(search.training_sample(database, spec))
    index.add(np.array_split(database, 7))
    assert len(index) == 20_000
    _, rows = index.search(queries, 10)
    assert recall(rows, truth) >= 0.9
    assert index.memory_bytes() < database.nbytes / 3


def files(folder) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def test_the_cache_is_written_once_reused_and_rebuilt_when_the_embeddings_change(tmp_path):
    ids, vectors = np.arange(20_000), clustered(20_000)
    cache = tmp_path / INDEX_FILE
    first = EmbeddingIndex(ids, vectors, cache=cache, exact_max=1000)
    assert first.cache_status == "built"
    written = files(tmp_path)
    assert set(written) == {INDEX_FILE, INDEX_FILE + ".json"}
    record = json.loads((tmp_path / (INDEX_FILE + ".json")).read_text())
    assert record["rows"] == 20_000 and record["spec"]["kind"] == "ivf-sq8"

    again = EmbeddingIndex(ids, vectors, cache=cache, exact_max=1000)
    assert again.cache_status == "loaded"
    assert files(tmp_path) == written  # nothing rewritten
    assert again.neighbours(3, 10).equals(first.neighbours(3, 10))

    changed = vectors.copy()
    changed[5] += 1.0
    rebuilt = EmbeddingIndex(ids, changed, cache=cache, exact_max=1000)
    assert rebuilt.cache_status == "built"
    assert json.loads((tmp_path / (INDEX_FILE + ".json")).read_text())["sha256"] != record["sha256"]
    assert EmbeddingIndex(ids, changed, cache=cache, exact_max=1000).cache_status == "loaded"

    # Another threshold with the same plan reuses it; other vectors, a damaged file, or an index
    # file replaced behind the record's back are rebuilt.
    assert EmbeddingIndex(ids, changed, cache=cache, exact_max=100).cache_status == "loaded"
    assert EmbeddingIndex(ids, changed[:, :16], cache=cache, exact_max=1000).cache_status == "built"
    cache.write_bytes(b"not a faiss index")
    assert EmbeddingIndex(ids, changed, cache=cache, exact_max=1000).cache_status == "built"
    stamp = search.file_stamp(cache)
    os.utime(cache, ns=(stamp["mtime_ns"] + 10**9,) * 2)
    assert EmbeddingIndex(ids, changed, cache=cache, exact_max=1000).cache_status == "built"


def test_an_exact_index_writes_nothing(tmp_path):
    index = EmbeddingIndex(np.arange(500), clustered(500), cache=tmp_path / INDEX_FILE)
    assert index.exact and index.cache_status == "exact"
    assert not list(tmp_path.iterdir())


def test_a_read_only_run_folder_gets_an_index_in_memory(tmp_path, monkeypatch):
    ids, vectors = np.arange(20_000), clustered(20_000)
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: fail writes the way a read-only file system does

        def read_only(path, write):
            raise PermissionError(30, "Read-only file system", str(path))

        monkeypatch.setattr(search, "write_atomic", read_only)
    try:
        index = EmbeddingIndex(ids, vectors, cache=run / INDEX_FILE, exact_max=1000)
        assert index.cache_status == "unwritable"
        assert not list(run.iterdir())
        assert len(index.neighbours(0, 10)) == 10
        # A cache written earlier is still read from a read-only folder.
        monkeypatch.undo()
        run.chmod(0o755)
        EmbeddingIndex(ids, vectors, cache=run / INDEX_FILE, exact_max=1000)
        run.chmod(0o555)
        assert EmbeddingIndex(
            ids, vectors, cache=run / INDEX_FILE, exact_max=1000
        ).cache_status == ("loaded")
    finally:
        run.chmod(0o755)


def test_the_thread_count_is_configurable(monkeypatch):
    monkeypatch.setenv(search.THREADS_ENV, "3")
    assert search.threads() == 3
    search.set_threads(1)
    try:
        assert search.threads() == 1
    finally:
        search.set_threads(None)
    monkeypatch.setenv(search.THREADS_ENV, "many")
    with pytest.raises(ValueError, match="positive integer"):
        search.threads()
    monkeypatch.delenv(search.THREADS_ENV)
    assert search.threads() >= 1
