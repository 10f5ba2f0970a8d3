"""Nearest cells in embedding space (cosine similarity), brute force with numpy.

At city scale (~22k cells x a few hundred dimensions) one query is a single matrix-vector
product of a few milliseconds; a national grid would switch to a FAISS index behind the same
interface.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


class EmbeddingIndex:
    """Per-cell embeddings, L2-normalised once, queried by cell id or by vector.

    Args:
        cell_ids: ``(n,)`` unique integer cell ids.
        matrix: ``(n, dim)`` embeddings, one row per cell id.

    Raises:
        ValueError: for mismatched shapes, duplicate ids or an empty index.
    """

    def __init__(self, cell_ids: np.ndarray, matrix: np.ndarray) -> None:
        ids = np.asarray(cell_ids, dtype=np.int64)
        vectors = np.asarray(matrix, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(ids) or len(ids) == 0:
            raise ValueError(
                f"embeddings: expected ({len(ids)}, dim) rows for {len(ids)} cell ids, "
                f"got {vectors.shape}"
            )
        if len(np.unique(ids)) != len(ids):
            raise ValueError("embeddings: duplicate cell ids")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.cell_ids = ids
        self.vectors = vectors / np.maximum(norms, 1e-12)
        self._rows = pd.Index(ids)

    def __len__(self) -> int:
        return len(self.cell_ids)

    @property
    def dim(self) -> int:
        """The embedding width."""
        return self.vectors.shape[1]

    def __contains__(self, cell_id: int) -> bool:
        return int(cell_id) in self._rows

    def vector(self, cell_id: int) -> np.ndarray:
        """The normalised embedding of one cell.

        Raises:
            KeyError: if the cell has no embedding.
        """
        if cell_id not in self:
            raise KeyError(f"cell {cell_id} has no embedding in this run")
        return self.vectors[self._rows.get_loc(int(cell_id))]

    def search(self, query: np.ndarray, k: int, exclude: int | None = None) -> pd.DataFrame:
        """The ``k`` cells most similar to a query vector.

        Args:
            query: ``(dim,)`` vector (normalised here).
            k: how many cells to return (fewer when the index is smaller).
            exclude: a cell id to leave out (the query cell itself).

        Returns:
            DataFrame ``rank`` (1 = most similar), ``cell_id``, ``similarity`` (cosine).
        """
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if query.shape[0] != self.dim:
            raise ValueError(f"query has {query.shape[0]} dimensions, the embeddings {self.dim}")
        similarity = self.vectors @ (query / max(float(np.linalg.norm(query)), 1e-12))
        if exclude is not None and exclude in self:
            similarity[self._rows.get_loc(int(exclude))] = -np.inf
        available = int(np.isfinite(similarity).sum())
        k = max(0, min(int(k), available))
        top = np.argpartition(-similarity, k - 1)[:k] if 0 < k < len(similarity) else np.arange(k)
        top = top[np.argsort(-similarity[top], kind="stable")]
        return pd.DataFrame(
            {
                "rank": np.arange(1, k + 1),
                "cell_id": self.cell_ids[top],
                "similarity": similarity[top].astype(float),
            }
        )

    def neighbours(self, cell_id: int, k: int) -> pd.DataFrame:
        """The ``k`` cells nearest to ``cell_id`` (itself excluded); see :meth:`search`."""
        return self.search(self.vector(cell_id), k, exclude=cell_id)
