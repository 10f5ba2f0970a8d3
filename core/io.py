"""Table I/O shared by the readers and writers: one reader for every table format, column
checks that name the file, atomic writes (temp file + rename) of files and of whole folders, and
the UTC timestamps and JSON-safe values of the files that record what was done."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


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
    # Imported here: the job queue uses this module's helpers and must start in a blink.
    import geopandas as gpd
    import pandas as pd
    import pyarrow.parquet as pq

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


def move_folder(src: str | PathLike, dst: str | PathLike, *, replace: bool = False) -> Path:
    """Rename the folder ``src`` to ``dst`` (on the same file system); returns ``dst``.

    An existing ``dst`` is an error (``os.rename`` would silently replace an empty folder). With
    ``replace`` it is renamed aside, ``src`` renamed in, then the old one deleted: a reader finds
    the old folder or the new one, never a mix, and if the second rename fails the old folder is
    put back.

    Raises:
        FileExistsError: if ``dst`` exists and ``replace`` is false.
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.rename(src, dst)
        return dst
    if not replace:
        raise FileExistsError(f"{dst}: already exists; {src} left in place")
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old)
    return dst


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (``os.kill(pid, 0)``; a zombie counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_stale_siblings(out: str | PathLike, keep: Sequence[str] = ()) -> list[Path]:
    """Delete the temporary siblings of ``out`` that dead processes left behind.

    They are the ``.<name>.building-<pid>`` folders of :func:`building` and the
    ``.<name>.old-<pid>`` folders of :func:`move_folder` whose ``<pid>`` no longer runs (a
    build killed by SIGKILL, a power cut). A build killed in the middle of the swap, with
    ``out`` renamed aside and the new one not yet in, gets its old ``out`` back; entries named
    in ``keep`` that a killed build had already moved out of ``out`` are moved back, when ``out``
    lacks them.

    Args:
        out: the folder whose siblings to clean.
        keep: names of entries :func:`building` carries over from the old ``out``.

    Returns:
        The folders deleted.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    removed = []
    stale = []
    for sibling in out.parent.iterdir():
        stem, _, pid = sibling.name.rpartition("-")
        if stem not in (f".{out.name}.building", f".{out.name}.old") or not pid.isdigit():
            continue
        if int(pid) != os.getpid() and not pid_alive(int(pid)) and sibling.is_dir():
            stale.append((stem.endswith(".building"), sibling))  # the old ones first
    for is_build, sibling in sorted(stale):
        if not is_build and not out.exists():
            os.rename(sibling, out)
            continue
        for name in keep:
            if (sibling / name).exists() and out.is_dir() and not (out / name).exists():
                os.rename(sibling / name, out / name)
        shutil.rmtree(sibling, ignore_errors=True)
        removed.append(sibling)
    return removed


@contextmanager
def building(
    out: str | PathLike, *, replace: bool = False, keep: Sequence[str] = ()
) -> Iterator[Path]:
    """Build the folder ``out`` atomically: ``with building(out) as tmp:`` writes into ``tmp``.

    ``tmp`` is a new, empty folder beside ``out`` (``.<name>.building-<pid>``); when the block
    ends normally it is renamed to ``out`` (:func:`move_folder`), when it raises it is deleted,
    so nothing that looks like a finished ``out`` is ever half-written. Before it starts, the
    temporary folders of builds whose process died are deleted (:func:`remove_stale_siblings`).

    Args:
        out: the folder to build; its parent is created if missing.
        replace: replace an existing ``out`` (renamed aside, then deleted once the new one is in
            place); without it an existing ``out`` is an error, before the build and after it.
        keep: names of entries of an existing ``out`` (e.g. ``runs``) moved into the new folder
            just before it replaces the old one, replacing what the build wrote under those
            names; moved back if the swap fails.

    Raises:
        FileExistsError: if ``out`` exists and ``replace`` is false.
    """
    out = Path(out)
    if out.exists() and not replace:
        raise FileExistsError(f"{out}: already exists")
    remove_stale_siblings(out, keep)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    moved: list[str] = []
    try:
        yield tmp
        for name in keep:
            if (out / name).exists():
                if (tmp / name).is_dir() and not (tmp / name).is_symlink():
                    shutil.rmtree(tmp / name)
                else:
                    (tmp / name).unlink(missing_ok=True)
                os.rename(out / name, tmp / name)
                moved.append(name)
        move_folder(tmp, out, replace=replace)
    except BaseException:
        for name in moved:  # the swap failed: the old folder is back in place
            if (tmp / name).exists() and out.is_dir() and not (out / name).exists():
                os.rename(tmp / name, out / name)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def utc_now(timespec: str = "seconds") -> str:
    """The current time in UTC as ISO 8601 text, e.g. ``2024-05-01T12:00:00+00:00``.

    Args:
        timespec: the finest unit shown, as :meth:`datetime.isoformat` takes it
            (``"seconds"``, ``"milliseconds"``, ...).
    """
    return datetime.now(UTC).isoformat(timespec=timespec)


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON values, recursively.

    Mappings become dicts with text keys, tuples and numpy arrays lists, numpy scalars Python
    scalars, paths text, and NaN and inf None (JSON null); anything else is returned as is.
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
