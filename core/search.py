"""Nearest-neighbour search over embeddings by cosine similarity, with faiss.

Vectors are L2-normalised, so the inner product is the cosine. Up to :data:`EXACT_MAX` rows the
index is exact (``IndexFlatIP``: the same neighbours a numpy matrix product finds); above it an
inverted-file index (IVF: k-means cells, a search visits the ``nprobe`` nearest cells) keeps one
query within milliseconds at national size. :func:`plan_index` picks the kind and its sizes, and
:class:`IndexSpec` states what it holds in memory.

An approximate index takes minutes of k-means to build at millions of rows, so
:func:`cached_index` keeps it in a file beside the embeddings it was built from, with a JSON
sidecar recording the build's parameters and the SHA-256 of the vectors; a stale, damaged or
foreign cache is rebuilt, and a folder that cannot be written gets an index in memory only.

faiss runs its batched work on OpenMP threads: :func:`threads` says how many (the environment
variable ``STADSBEELD_FAISS_THREADS``, else the CPUs this process may use), :func:`set_threads`
changes it. A search of fewer than :data:`ONE_THREAD_BELOW` queries runs on the calling thread
alone: waking a thread team costs more than it saves for one query, a lot more on a busy machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from core.io import utc_now, write_atomic

#: Rows up to which an index is exact: one query then scans them all in about 10 ms (128-d, one
#: core); above, an IVF index answers in a few ms at millions of rows.
EXACT_MAX = 100_000
#: Environment variable with faiss's thread count for batched work (default: usable CPUs).
THREADS_ENV = "STADSBEELD_FAISS_THREADS"
#: Searches of fewer queries run on one thread.
ONE_THREAD_BELOW = 16
#: Rows normalised and added at once (bounds the temporary copy while building).
ADD_CHUNK = 65_536
#: Version of the cache sidecar's layout; another version is rebuilt.
CACHE_FORMAT = 1

Kind = Literal["flat", "ivf-sq8"]

_threads: int | None = None


def threads() -> int:
    """faiss's OpenMP threads for batched work: :func:`set_threads`, else ``$STADSBEELD_FAISS_THREADS``,
    else the CPUs this process may run on.

    Raises:
        ValueError: for an environment value that is not a positive integer.
    """
    if _threads is not None:
        return _threads
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{THREADS_ENV}={value!r}: expected a positive integer")
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(count: int | None) -> None:
    """Use ``count`` threads for faiss's batched work from now on (None: back to the default)."""
    global _threads
    if count is not None and count < 1:
        raise ValueError(f"faiss threads: expected a positive count, got {count}")
    _threads = count


def _use_threads(queries: int) -> None:
    # OpenMP's thread count is per calling thread, so every call sets it (Streamlit sessions
    # each run on their own thread).
    faiss.omp_set_num_threads(1 if queries < ONE_THREAD_BELOW else threads())


@dataclass(frozen=True)
class IndexSpec:
    """What index to build: ``flat`` (exact) or ``ivf-sq8``, an IVF index with ``nlist`` cells
    storing one byte a dimension (a quarter of float32; similarities off by about 0.0005, at
    most 0.005 on clustered 128-d data), of which a search visits ``nprobe``.
    """

    kind: Kind = "flat"
    nlist: int = 0
    nprobe: int = 0

    @property
    def exact(self) -> bool:
        """Whether a search returns the true nearest neighbours."""
        return self.kind == "flat"

    def factory(self) -> str:
        """The faiss ``index_factory`` string."""
        return "Flat" if self.exact else f"IVF{self.nlist},SQ8"

    def memory_bytes(self, rows: int, dim: int) -> int:
        """Bytes the built index holds for ``rows`` vectors of width ``dim``: the codes, an IVF
        index's row ids, centroids and quantiser tables. Its lists grow by doubling, so the resident
        memory of the codes and ids can reach twice this while they are added."""
        if self.exact:
            return rows * dim * 4
        return rows * (dim + 8) + self.nlist * dim * 4 + 2 * dim * 4


def plan_index(
    rows: int,
    dim: int,
    exact_max: int = EXACT_MAX,
    kind: Kind = "ivf-sq8",
    nprobe: int | None = None,
) -> IndexSpec:
    """The index for ``rows`` vectors: exact up to ``exact_max`` rows, else ``kind``.

    An IVF index gets the power of two nearest below sqrt(rows) as its cell count (k-means and
    the assignment of every row stay minutes at 10 million rows on two cores) and visits 1/32 of
    the cells per query, at least 16 (bench/README.md, ``faiss``, measures recall and latency).

    Args:
        rows: how many vectors will be added.
        dim: their width.
        exact_max: the largest exact index.
        kind: the approximate kind above ``exact_max``.
        nprobe: cells visited per query (default as above).
    """
    if rows <= exact_max or kind == "flat":
        return IndexSpec("flat")
    nlist = int(min(65_536, max(16, 2 ** math.floor(math.log2(max(math.sqrt(rows), 1))))))
    probes = nprobe if nprobe is not None else max(16, nlist // 32)
    return IndexSpec(kind, nlist=nlist, nprobe=min(probes, nlist))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """A float32 copy of ``vectors`` with rows of length 1 (zero rows stay zero)."""
    out = np.array(vectors, dtype=np.float32, copy=True, ndmin=2)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def fingerprint(vectors: np.ndarray) -> str:
    """SHA-256 of a float32 matrix's shape and bytes (what a cached index was built from)."""
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    digest = hashlib.sha256(repr(matrix.shape).encode())
    for start in range(0, len(matrix), ADD_CHUNK * 4):
        digest.update(memoryview(matrix[start : start + ADD_CHUNK * 4]).cast("B"))
    return digest.hexdigest()


class VectorIndex:
    """A faiss index over L2-normalised vectors, searched by cosine similarity.

    Rows are numbered in the order they were added. Searches may run concurrently from several
    threads; building (``train``, ``add``) may not.

    Args:
        index: the faiss index (inner-product metric).
        spec: how it was built.
    """

    def __init__(self, index: faiss.Index, spec: IndexSpec) -> None:
        self.faiss = index
        self.spec = spec
        if not spec.exact:
            faiss.extract_index_ivf(index).nprobe = spec.nprobe

    @classmethod
    def empty(cls, spec: IndexSpec, dim: int) -> VectorIndex:
        """An index with nothing added (an IVF one still to :meth:`train`)."""
        return cls(faiss.index_factory(dim, spec.factory(), faiss.METRIC_INNER_PRODUCT), spec)

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        spec: IndexSpec | None = None,
        exact_max: int = EXACT_MAX,
        seed: int = 0,
    ) -> VectorIndex:
        """Index the rows of ``vectors`` (normalised here, chunk by chunk).

        Args:
            vectors: ``(n, dim)``.
            spec: the index (default :func:`plan_index` of the shape and ``exact_max``).
            exact_max: see :func:`plan_index`.
            seed: draws an IVF index's training sample.
        """
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"expected an (n, dim) matrix, got shape {vectors.shape}")
        spec = spec or plan_index(len(vectors), vectors.shape[1], exact_max)
        index = cls.empty(spec, vectors.shape[1])
        if not spec.exact:
            index.train(training_sample(vectors, spec, seed))
        index.add(vectors)
        return index

    def train(self, sample: np.ndarray) -> None:
        """Fit an IVF index's cells (and codes) to a sample of the vectors (normalised here)."""
        _use_threads(len(sample))
        self.faiss.train(unit_rows(sample))

    def add(self, vectors: np.ndarray | Iterable[np.ndarray]) -> None:
        """Append rows (a matrix, or an iterable of matrices), normalised chunk by chunk."""
        chunks = [vectors] if isinstance(vectors, np.ndarray) else vectors
        for chunk in chunks:
            for start in range(0, len(chunk), ADD_CHUNK):
                part = unit_rows(chunk[start : start + ADD_CHUNK])
                _use_threads(len(part))
                self.faiss.add(part)

    def __len__(self) -> int:
        return int(self.faiss.ntotal)

    @property
    def dim(self) -> int:
        """The vector width."""
        return int(self.faiss.d)

    def memory_bytes(self) -> int:
        """What the index holds, by :meth:`IndexSpec.memory_bytes`."""
        return self.spec.memory_bytes(len(self), self.dim)

    def search(
        self, queries: np.ndarray, k: int, batch: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` rows most similar to each query, best first.

        Args:
            queries: ``(m, dim)`` (normalised here).
            k: neighbours per query.
            batch: queries searched at once (bounds the memory of one step).

        Returns:
            ``(similarity, rows)``, both ``(m, k)``: cosine similarity (float32) and row number
            (int64); rows past the last one found are -1 with similarity -inf.
        """
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (m, {self.dim}), got shape {queries.shape}")
        m, k = len(queries), max(0, int(k))
        similarity = np.full((m, k), -np.inf, np.float32)
        rows = np.full((m, k), -1, np.int64)
        if k == 0 or len(self) == 0:
            return similarity, rows
        for start in range(0, m, batch):
            part = unit_rows(queries[start : start + batch])
            _use_threads(len(part))
            found_similarity, found_rows = self.faiss.search(part, k)
            similarity[start : start + len(part)] = found_similarity
            rows[start : start + len(part)] = found_rows
        similarity[rows < 0] = -np.inf
        return similarity, rows

    def save(self, path: str | PathLike) -> dict[str, int]:
        """Write the index atomically to ``path``; returns :func:`file_stamp` of what was written."""
        stamp: dict[str, int] = {}

        def write(tmp: Path) -> None:
            faiss.write_index(self.faiss, str(tmp))
            stamp.update(file_stamp(tmp))  # before the rename, which keeps inode and mtime

        write_atomic(path, write)
        return stamp

    @classmethod
    def load(cls, path: str | PathLike, spec: IndexSpec) -> VectorIndex:
        """Read an index written by :meth:`save` (searched with ``spec.nprobe``)."""
        return cls(faiss.read_index(str(path)), spec)


def training_sample(vectors: np.ndarray, spec: IndexSpec, seed: int = 0) -> np.ndarray:
    """Rows to train an IVF index on: 64 per cell (faiss wants >= 39), drawn without repeats."""
    size = min(len(vectors), 64 * spec.nlist)
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size, replace=False))
    return np.asarray(vectors[rows], dtype=np.float32)


def file_stamp(path: str | PathLike) -> dict[str, int]:
    """A file's size, modification time (ns) and inode: any replacement changes one of them."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def sidecar(path: str | PathLike) -> Path:
    """The JSON file describing the cached index at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


#: How an index was got: ``exact`` (never cached), ``memory`` (approximate, no cache asked
#: for), ``loaded`` from the cache, ``built`` and written to it, or ``unwritable``: built, and
#: kept in memory only because the cache could not be written.
CacheStatus = Literal["exact", "memory", "loaded", "built", "unwritable"]


def cached_index(
    vectors: np.ndarray, spec: IndexSpec, path: str | PathLike, seed: int = 0
) -> tuple[VectorIndex, CacheStatus]:
    """The index of ``vectors`` from the cache file ``path``, built and written when missing.

    The sidecar ``<path>.json`` records the layout version, the faiss version, the spec, the
    vectors' shape and :func:`fingerprint`, and the :func:`file_stamp` of the index file; a
    cache whose record differs (other vectors, another spec, a replaced or unreadable file) is
    rebuilt. The index is written first and the record last, each atomically, so a reader never
    trusts a half-written pair. An exact spec is never cached (building it is a copy).

    Returns:
        The index and how it was got: ``exact`` (no cache), ``loaded``, ``built`` (and written),
        ``unwritable`` (built; the folder could not be written, so it lives in memory only).
    """
    if spec.exact:
        return VectorIndex.build(vectors, spec), "exact"
    path = Path(path)
    expected = {
        "format": CACHE_FORMAT,
        "spec": {k: v for k, v in asdict(spec).items() if k != "nprobe"},
        "rows": int(len(vectors)),
        "dim": int(vectors.shape[1]),
        "sha256": fingerprint(vectors),
    }
    index = _read_cache(path, expected, spec)
    if index is not None:
        return index, "loaded"
    index = VectorIndex.build(vectors, spec, seed=seed)
    record = expected | {"faiss": faiss.__version__, "built": utc_now()}
    try:
        record["index_file"] = index.save(path)
        write_atomic(sidecar(path), lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    except (OSError, RuntimeError):  # faiss reports a file it cannot open as a RuntimeError
        return index, "unwritable"
    return index, "built"


def _read_cache(path: Path, expected: dict[str, Any], spec: IndexSpec) -> VectorIndex | None:
    try:
        record = json.loads(sidecar(path).read_text(encoding="utf-8"))
        if not isinstance(record, dict) or any(record.get(k) != v for k, v in expected.items()):
            return None
        if record.get("index_file") != file_stamp(path):
            return None
        index = VectorIndex.load(path, spec)
    except (OSError, ValueError, RuntimeError):  # missing, not JSON, or not a faiss file
        return None
    if len(index) != expected["rows"] or index.dim != expected["dim"]:
        return None
    return index
