"""Table I/O shared by the readers and writers: one reader for every table format, column
checks that name the file, and atomic writes (temp file + rename)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pyarrow.parquet as pq


def read_table(path: str | PathLike, what: str) -> pd.DataFrame:
    """Read a CSV, Parquet, GeoParquet, GeoPackage or GeoJSON file.

    Args:
        path: the file; its extension picks the reader.
        what: what the file holds, for error messages (e.g. ``"image catalog"``).

    Returns:
        A GeoDataFrame for files with geometry, else a DataFrame.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: for an unknown extension or an unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".geoparquet", ".gpkg", ".geojson"):
        raise ValueError(
            f"{path}: unknown {what} file type {suffix!r}; "
            "expected .csv, .parquet, .geoparquet, .gpkg or .geojson"
        )
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix in (".gpkg", ".geojson"):
            return gpd.read_file(path)
        if b"geo" in (pq.read_schema(path).metadata or {}):
            return gpd.read_parquet(path)
        return pd.read_parquet(path)
    except Exception as exc:  # pandas, pyarrow and pyogrio raise many types for a bad file
        raise ValueError(f"{path}: not a readable {suffix} {what} file ({exc})") from exc


def require_columns(table: pd.DataFrame, columns: Sequence[str], source: str | PathLike) -> None:
    """Raise a ValueError naming ``source`` and every column of ``columns`` it lacks."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{source}: missing columns {missing} (found {list(table.columns)})")


def write_atomic(path: str | PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``.

    Readers never see a half-written file: the rename is atomic within a folder. The temporary
    name keeps the extension because some drivers (GeoPackage) check it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    tmp.unlink(missing_ok=True)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
