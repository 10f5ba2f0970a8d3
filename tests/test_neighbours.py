"""Nearest cells in embedding space."""

from __future__ import annotations

import numpy as np
import pytest

from core.neighbours import EmbeddingIndex


def test_neighbours_follow_cosine_similarity():
    rng = np.random.default_rng(0)
    ids = np.arange(1000, 1300, dtype=np.int64)
    vectors = rng.standard_normal((len(ids), 16)).astype(np.float32) * rng.uniform(
        0.1, 10, (len(ids), 1)
    )
    index = EmbeddingIndex(ids, vectors)
    found = index.neighbours(1007, 10)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit[7]
    similarity[7] = -np.inf
    expected = ids[np.argsort(-similarity)[:10]]
    assert found["cell_id"].tolist() == expected.tolist()
    assert found["rank"].tolist() == list(range(1, 11))
    np.testing.assert_allclose(found["similarity"], np.sort(similarity)[::-1][:10], rtol=1e-5)
    assert 1007 not in found["cell_id"].tolist()


def test_k_larger_than_the_index_returns_every_other_cell():
    index = EmbeddingIndex(np.array([1, 2, 3]), np.eye(3))
    assert sorted(index.neighbours(1, 50)["cell_id"]) == [2, 3]
    assert index.search(np.array([1.0, 0, 0]), 0).empty


def test_bad_embeddings_are_refused():
    with pytest.raises(ValueError, match="duplicate"):
        EmbeddingIndex(np.array([1, 1]), np.eye(2))
    with pytest.raises(ValueError, match=r"\(3, dim\)"):
        EmbeddingIndex(np.array([1, 2, 3]), np.eye(2))
    index = EmbeddingIndex(np.array([1, 2]), np.eye(2))
    with pytest.raises(KeyError, match="cell 9 has no embedding"):
        index.neighbours(9, 1)
    with pytest.raises(ValueError, match="3 dimensions"):
        index.search(np.ones(3), 1)
