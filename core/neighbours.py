"""Nearest cells in embedding space (cosine similarity), through a faiss index.

At city scale (~22k cells) the index is exact (``core.search.EXACT_MAX``): one query scans every
cell in about a millisecond. A national grid (3.4 million cells) gets a compressed IVF index
(``ivf-sq8``) whose candidates are re-ranked by their exact cosine, built once and cached beside
the run's embeddings (``embeddings.faiss``); see :mod:`core.search`.
"""

from __future__ import annotations

from os import PathLike

import numpy as np
import pandas as pd

from core.search import EXACT_MAX, CacheStatus, VectorIndex, cached_index, plan_index, unit_rows

#: An approximate search fetches this many candidates per cell asked for (at least
#: :data:`MIN_CANDIDATES`) and keeps the best by exact cosine.
CANDIDATES_PER_RESULT = 4
MIN_CANDIDATES = 40


class EmbeddingIndex:
    """Per-cell embeddings, L2-normalised once, queried by cell id or by vector.

    Exact up to ``exact_max`` cells. Above, an IVF-SQ8 index (one byte a dimension) proposes
    candidates and the normalised vectors, kept here, re-rank them by their exact cosine: the
    similarities shown are exact, and a query scans a quarter of the bytes an uncompressed IVF
    index would. Only the IVF index is cached, in ``cache`` when given.

    Args:
        cell_ids: ``(n,)`` unique integer cell ids.
        matrix: ``(n, dim)`` embeddings, one row per cell id.
        cache: the index file to reuse or write (a run's ``core.runs.INDEX_FILE``); None keeps
            the index in memory.
        exact_max: the most cells searched exactly.
        nprobe: IVF cells visited per query (default: :func:`core.search.plan_index`'s).

    Raises:
        ValueError: for mismatched shapes, duplicate ids or an empty index.

    Attributes:
        index: the :class:`core.search.VectorIndex` searched.
        vectors: the normalised embeddings, one row per cell id.
        cache_status: how it was got (:data:`core.search.CacheStatus`).
    """

    def __init__(
        self,
        cell_ids: np.ndarray,
        matrix: np.ndarray,
        cache: str | PathLike | None = None,
        exact_max: int = EXACT_MAX,
        nprobe: int | None = None,
    ) -> None:
        ids = np.asarray(cell_ids, dtype=np.int64)
        vectors = np.asarray(matrix, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(ids) or len(ids) == 0:
            raise ValueError(
                f"embeddings: expected ({len(ids)}, dim) rows for {len(ids)} cell ids, "
                f"got {vectors.shape}"
            )
        if len(np.unique(ids)) != len(ids):
            raise ValueError("embeddings: duplicate cell ids")
        spec = plan_index(len(ids), vectors.shape[1], exact_max, nprobe=nprobe)
        if cache is None or spec.exact:
            self.index = VectorIndex.build(vectors, spec)
            self.cache_status: CacheStatus = "exact" if spec.exact else "memory"
        else:
            self.index, self.cache_status = cached_index(vectors, spec, cache)
        self.vectors = unit_rows(vectors)
        self.cell_ids = ids
        self._rows = pd.Index(ids)

    def __len__(self) -> int:
        return len(self.cell_ids)

    @property
    def dim(self) -> int:
        """The embedding width."""
        return self.index.dim

    @property
    def exact(self) -> bool:
        """Whether searches return the true nearest cells (else an IVF index's)."""
        return self.index.spec.exact

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
        if not np.isfinite(query).all():  # nothing is similar to NaN
            k = 0
        skip = self._rows.get_loc(int(exclude)) if exclude is not None and exclude in self else -1
        k = max(0, min(int(k), len(self) - (skip >= 0)))
        wanted = k + (skip >= 0)
        if not self.exact and k:
            wanted = max(wanted * CANDIDATES_PER_RESULT, MIN_CANDIDATES)
        _, rows = self.index.search(query[None], wanted)
        rows = rows[0][(rows[0] >= 0) & (rows[0] != skip)]
        similarity = self.vectors[rows] @ (query / max(float(np.linalg.norm(query)), 1e-12))
        order = np.argsort(-similarity, kind="stable")[:k]
        similarity, rows = similarity[order], rows[order]
        k = len(rows)
        return pd.DataFrame(
            {
                "rank": np.arange(1, k + 1),
                "cell_id": self.cell_ids[rows],
                "similarity": similarity.astype(float),
            }
        )

    def neighbours(self, cell_id: int, k: int) -> pd.DataFrame:
        """The ``k`` cells nearest to ``cell_id`` (itself excluded); see :meth:`search`."""
        return self.search(self.vector(cell_id), k, exclude=cell_id)
