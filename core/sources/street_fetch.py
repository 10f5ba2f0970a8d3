"""What the street-level download clients (Flickr, Google Street View) share.

The result of a fetch (:class:`StreetFetch`), API keys from the environment, the JPEG check
of downloaded and cached images, WGS84 <-> RD positions, the catalog-relative image paths
(``images/<source>/<1 km block>/<id>.jpg``) and the resumable, validated image download.
Catalog rows are written with :func:`core.sources.catalog.merge_catalog`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from pyproj import Transformer

from core.grid import RD_NEW, cell_id, cell_index, read_grid
from core.sources.catalog import WGS84
from core.sources.http import DownloadReport, HttpClient

log = logging.getLogger(__name__)

#: WGS84 (min lon, min lat, max lon, max lat).
BBox = tuple[float, float, float, float]


@dataclass
class StreetFetch:
    """What a street-level fetch did.

    Attributes:
        rows: the catalog rows of this fetch (stored form: paths relative to the catalog).
        report: downloads fetched, skipped (already on disk) and failed.
        catalog: the catalog file written.
    """

    rows: pd.DataFrame
    report: DownloadReport
    catalog: Path


def env_secret(name: str, what: str) -> str:
    """The value of environment variable ``name``; a clear error naming it when unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        raise ValueError(f"{what} needs an API key: set the environment variable {name}")
    return value


def _jpeg_problem(head: bytes, tail: bytes) -> str | None:
    if not head.startswith(b"\xff\xd8\xff"):
        return f"not a JPEG (starts with {head[:8]!r})"
    if not tail.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    return None


def validate_jpeg(content: bytes) -> None:
    """Raise ValueError unless ``content`` is a complete JPEG (start and end markers)."""
    problem = _jpeg_problem(content[:8], content[-64:])
    if problem:
        raise ValueError(problem)


def remove_corrupt_images(paths: Iterable[Path]) -> int:
    """Delete image files on disk that are not complete JPEGs, so a fetch gets them again.

    Only the first and last bytes are read: a resumed fetch over many files stays fast.

    Returns:
        How many files were deleted.
    """
    removed = 0
    for path in paths:
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
                tail = f.read()
        except FileNotFoundError:
            continue
        problem = _jpeg_problem(head, tail)
        if problem:
            log.warning("%s: %s; fetching it again", path, problem)
            path.unlink()
            removed += 1
    return removed


def lonlat_to_rd(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """WGS84 lon/lat to RD New x/y, rounded to centimetres."""
    x, y = Transformer.from_crs(WGS84, RD_NEW, always_xy=True).transform(lon, lat)
    return np.round(np.asarray(x, dtype=np.float64), 2), np.round(
        np.asarray(y, dtype=np.float64), 2
    )


def rd_to_lonlat(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """RD New x/y to an (n, 2) array of WGS84 lon/lat."""
    lon, lat = Transformer.from_crs(RD_NEW, WGS84, always_xy=True).transform(x, y)
    return np.column_stack([lon, lat]).astype(np.float64)


def image_paths(source: str, ids: Sequence[str], x: np.ndarray, y: np.ndarray) -> list[str]:
    """Catalog-relative paths ``images/<source>/<1 km block>/<id>.jpg``, the demo's layout."""
    ix, iy = cell_index(cell_id(np.asarray(x), np.asarray(y)))
    return [
        f"images/{source}/{bx}_{by}/{i}.jpg"
        for bx, by, i in zip(np.asarray(ix) // 10, np.asarray(iy) // 10, ids, strict=True)
    ]


def safe_name(text: str) -> str:
    """``text`` with every character other than letters, digits, ``-`` and ``_`` replaced."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def download_images(
    client: HttpClient,
    rows: pd.DataFrame,
    urls: Sequence[str],
    street: Path,
    what: str,
    show_progress: bool,
) -> DownloadReport:
    """Download ``urls`` to the catalog paths of ``rows`` (resumable, validated JPEG)."""
    dest = [street / p for p in rows["path"]]
    report = client.download_many(
        ((u, d, None) for u, d in zip(urls, dest, strict=True)),
        validate=validate_jpeg,
        desc=what,
        total=len(dest),
        show_progress=show_progress,
    )
    log.info(
        "%s: %d fetched, %d already on disk, %d failed (%.1f MB)",
        what,
        report.fetched,
        report.skipped,
        len(report.failed),
        report.bytes / 1e6,
    )
    return report


def grid_bbox_wgs84(grid: str | PathLike) -> BBox:
    """WGS84 (min lon, min lat, max lon, max lat) around every cell of a grid file."""
    x0, y0, x1, y1 = read_grid(grid).total_bounds
    xs, ys = np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1])
    corners = rd_to_lonlat(xs, ys)
    (min_lon, min_lat), (max_lon, max_lat) = corners.min(axis=0), corners.max(axis=0)
    return float(min_lon), float(min_lat), float(max_lon), float(max_lat)
