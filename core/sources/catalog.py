"""Street-level image catalogs: one table of images with position, source and file path.

A catalog is a CSV, Parquet or GeoParquet file with columns ``id, source, path, heading,
captured_at``, a position (``lon, lat`` in WGS84, ``x, y`` in RD New, or a point geometry in
any CRS) and optionally ``pano_id, title, tags, license``. ``path`` is relative to the
catalog's folder or absolute. Bad rows are rejected but always reported, never dropped quietly.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from PIL import Image
from pyproj import CRS, Transformer

from core.grid import RD_NEW, cell_id
from core.io import read_table, require_columns, write_atomic
from core.sources import SOURCE_NAME

#: The sources every count lists (0 where absent), then any other :data:`SOURCE_NAME` a
#: catalog holds (:func:`source_names`).
SOURCES = ("gsv", "flickr", "amsterdam_panorama", "mapillary", "other")
REQUIRED_COLUMNS = ("id", "source", "path", "heading", "captured_at")
OPTIONAL_COLUMNS = ("pano_id", "title", "tags", "license")
IMAGE_COLUMNS = (
    *REQUIRED_COLUMNS[:3],
    "x",
    "y",
    *REQUIRED_COLUMNS[3:],
    *OPTIONAL_COLUMNS,
    "cell_id",
    "geometry",
)
PROBLEM_COLUMNS = ("id", "row", "kind", "problem")

#: (min lon, min lat, max lon, max lat) of the Netherlands, WGS84.
NL_LONLAT_BOUNDS = (3.2, 50.7, 7.3, 53.6)
WGS84 = "EPSG:4326"

#: Headings are compass bearings in degrees; 0..360 inclusive (360 is north again).
HEADING_RANGE = (0.0, 360.0)
#: Earliest plausible capture time per source: Google Street View launched in May 2007 (in
#: the Netherlands from 2008), Flickr in February 2004 (older "taken" dates are scans or
#: unset camera clocks, and say nothing about today's street), the City of Amsterdam's
#: panoramas in 2014 (its own camera from 2016); other sources from 1990, the
#: first plausible label year (core.sources.lbm.FIRST_YEAR).
FIRST_CAPTURE = {
    "gsv": "2007-01-01",
    "flickr": "2004-01-01",
    "amsterdam_panorama": "2014-01-01",
    "other": "1990-01-01",
}
#: Slack on "not in the future" for clocks and time zones.
_FUTURE_SLACK = pd.Timedelta(days=1)
#: A JPEG ends in an end-of-image marker; a valid file may carry a short trailer after it.
_JPEG_END = b"\xff\xd9"
_JPEG_TAIL_BYTES = 4096

# Rows failing a position check, and how to describe row i.
PositionCheck = tuple[np.ndarray, Callable[[int], str]]


@dataclass
class Catalog:
    """A read catalog.

    Attributes:
        images: accepted images, EPSG:28992 points with columns :data:`IMAGE_COLUMNS`;
            ``path`` is absolute, ``captured_at`` is UTC (timezone-aware; values without a
            zone are taken as UTC; NaT where empty), ``heading`` is float (NaN allowed).
        problems: one row per problem of a rejected image, columns :data:`PROBLEM_COLUMNS`;
            ``row`` is the 0-based row in the file.
        path: the catalog file.
    """

    images: gpd.GeoDataFrame
    problems: pd.DataFrame
    path: Path

    def summary(self) -> str:
        """One line: images per source (GSV and Flickr always, others where present), cells
        covered and rejected rows by problem."""
        per_source = self.images["source"].value_counts()
        sources = ", ".join(
            f"{s} {int(per_source.get(s, 0))}"
            for s in source_names(self.images["source"])
            if s in ("gsv", "flickr") or s in per_source.index
        )
        text = (
            f"{self.path.name}: {len(self.images)} images ({sources}) in "
            f"{self.images['cell_id'].nunique()} cells; "
            f"{self.problems['row'].nunique()} rejected"
        )
        return text + (f" ({_kind_counts(self.problems)})" if len(self.problems) else "")


def source_names(sources: pd.Series) -> list[str]:
    """:data:`SOURCES`, then the other source names in ``sources``, sorted: the columns of
    every per-source count."""
    return [*SOURCES, *sorted(set(sources.dropna().astype(str)) - set(SOURCES))]


def read_catalog(
    path: str | PathLike,
    check_files: bool = True,
    check_images: bool = False,
    root: str | PathLike | None = None,
    sources: Collection[str] | None = None,
) -> Catalog:
    """Read and check an image catalog.

    Rows are rejected, listed in ``problems`` and counted in one warning (which names the
    first row of each kind of problem, with its file: :func:`problem_examples`) when: the id is
    missing or duplicated (every row of a duplicated id), the source is not a name
    (:data:`SOURCE_NAME`: gsv, flickr, amsterdam_panorama, mapillary, other, ...),
    the path is missing, lies outside ``root`` (``/etc/passwd``, ``../../x.jpg``; with
    ``check_files`` also through symlinks) or (with ``check_files``) the file does not exist,
    (with ``check_images``) the file is not a readable image, heading is not a number or not
    within :data:`HEADING_RANGE`, captured_at is not an ISO 8601 time (empty is allowed), is
    in the future or before its source existed (:data:`FIRST_CAPTURE`), or the position is
    missing, outside the Netherlands or has its two axes swapped.

    Args:
        path: a .csv, .parquet or .geoparquet catalog.
        check_files: check that every image file exists (and resolve symlinks for ``root``).
        check_images: also open every image's header (PIL ``verify``) and check that a JPEG
            is not truncated, so that no unreadable image reaches training; implies
            ``check_files``. About a millisecond per image.
        root: the folder every image must lie in; default the catalog's folder.
        sources: read and check only the rows of these sources (a trainer of one source
            need not open every other source's image files).

    Raises:
        FileNotFoundError: if the catalog does not exist.
        ValueError: naming the file, for an unknown extension, an unreadable file, missing
            required columns or no position columns.
    """
    path = Path(path)
    table = read_table(path, "image catalog")
    require_columns(table, REQUIRED_COLUMNS, path)
    if sources is not None:
        table = table[table["source"].astype(str).str.strip().str.lower().isin(list(sources))]
    table = table.reset_index(drop=True)
    ids = table["id"]
    id_text = ids.astype(str).str.strip().to_numpy()
    found: list[tuple[int, str, str]] = []

    def flag(mask: np.ndarray, kind: str, describe: Callable[[int], str]) -> None:
        found.extend((int(i), kind, describe(int(i))) for i in np.flatnonzero(mask))

    no_id = _blank(ids)
    flag(no_id, "missing id", lambda i: "missing id")
    counts = (
        pd.Series(id_text).map(pd.Series(id_text[~no_id]).value_counts()).fillna(0).astype(int)
    ).to_numpy()
    duplicated = ~no_id & (counts > 1)
    flag(duplicated, "duplicate id", lambda i: f"duplicate id {id_text[i]!r} ({counts[i]} rows)")

    source = table["source"].astype(str).str.strip().str.lower()
    flag(
        ~source.str.fullmatch(SOURCE_NAME).to_numpy(),
        "bad source",
        lambda i: (
            f"bad source {table['source'][i]!r} (expected a name of lower-case letters, "
            "digits and _, such as gsv, flickr, mapillary or other)"
        ),
    )

    no_path = _blank(table["path"])
    flag(no_path, "missing path", lambda i: "missing path")
    folder = path.resolve().parent
    text = table["path"].astype(str)
    files = np.where(text.str.startswith(os.sep), text, str(folder) + os.sep + text).astype(object)
    check_files = check_files or check_images
    base = os.path.realpath(folder if root is None else root)
    resolve = os.path.realpath if check_files else os.path.normpath
    escaped = ~no_path & np.array([not _inside(resolve(f), base) for f in files], dtype=bool)
    flag(escaped, "path outside root", lambda i: f"image path {text[i]!r} lies outside {base}")
    absent = np.zeros(len(table), dtype=bool)
    if check_files:
        absent = ~no_path & ~escaped & np.array([not os.path.isfile(f) for f in files], dtype=bool)
        flag(absent, "missing file", lambda i: f"image file not found: {files[i]}")
    if check_images:
        reasons = {
            i: reason
            for i in np.flatnonzero(~no_path & ~escaped & ~absent)
            if (reason := _checked_problem(files[i])) is not None
        }
        unreadable = np.zeros(len(table), dtype=bool)
        unreadable[list(reasons)] = True
        flag(unreadable, "unreadable image", lambda i: f"{files[i]}: {reasons[i]}")

    heading = pd.to_numeric(table["heading"], errors="coerce")
    flag(
        (heading.isna() & ~_blank(table["heading"])).to_numpy(),
        "bad heading",
        lambda i: f"heading {table['heading'][i]!r} is not a number",
    )
    low, high = HEADING_RANGE
    flag(
        ((heading < low) | (heading > high)).to_numpy(),
        "heading out of range",
        lambda i: f"heading {heading[i]:g} is not a bearing within {low:g}..{high:g} degrees",
    )

    captured = _utc_times(table["captured_at"])
    flag(
        (captured.isna() & ~_blank(table["captured_at"])).to_numpy(),
        "bad captured_at",
        lambda i: f"captured_at {table['captured_at'][i]!r} is not an ISO 8601 time",
    )
    now = pd.Timestamp.now(tz="UTC")
    first = pd.to_datetime(source.map(FIRST_CAPTURE).fillna(FIRST_CAPTURE["other"]), utc=True)
    flag(
        (captured > now + _FUTURE_SLACK).to_numpy(),
        "captured_at out of range",
        lambda i: f"captured_at {captured[i]} is in the future",
    )
    flag(
        (captured < first).to_numpy(),
        "captured_at out of range",
        lambda i: (
            f"captured_at {captured[i]} is before {source[i]} images existed ({first[i].date()})"
        ),
    )

    x, y, position_problems = _rd_positions(table, path)
    for kind, (mask, describe) in position_problems.items():
        flag(mask, kind, describe)

    problems = pd.DataFrame(
        [(id_text[i] if not no_id[i] else "", i, kind, text) for i, kind, text in found],
        columns=list(PROBLEM_COLUMNS),
    ).sort_values(["row", "kind"], ignore_index=True)
    problems["row"] = problems["row"].astype(np.int64)
    keep = np.ones(len(table), dtype=bool)
    keep[problems["row"].to_numpy()] = False
    if len(problems):
        warnings.warn(
            f"{path}: rejected {len(table) - int(keep.sum())} of {len(table)} images "
            f"({_kind_counts(problems)}): {problem_examples(problems)}; see Catalog.problems",
            stacklevel=2,
        )

    columns = {
        "id": id_text,
        "source": source.to_numpy(),
        "path": files.astype(str),
        "x": x,
        "y": y,
        "heading": heading.to_numpy(dtype=np.float64),
        "captured_at": captured,
    }
    for name in OPTIONAL_COLUMNS:
        columns[name] = (
            table[name] if name in table.columns else pd.Series(pd.NA, index=table.index)
        )
    images = pd.DataFrame(columns)[keep].reset_index(drop=True)
    images["cell_id"] = cell_id(images["x"].to_numpy(), images["y"].to_numpy())
    images = gpd.GeoDataFrame(
        images, geometry=gpd.points_from_xy(images["x"], images["y"]), crs=RD_NEW
    )
    return Catalog(images=images[list(IMAGE_COLUMNS)], problems=problems, path=path)


def _inside(file: str, base: str) -> bool:
    """Whether the (resolved or normalised) ``file`` lies in the folder ``base``."""
    return os.path.commonpath([file, base]) == base


def image_problem(file: str | PathLike) -> str | None:
    """Why ``file`` is not a readable image, or None: missing, empty, unparseable or truncated.

    The one check of every image file whose pixels a trainer will read (``read_catalog``
    with ``check_images``, and the UGData reader). PIL's ``verify`` parses the headers
    without decoding; a JPEG must also end in an end-of-image marker, and only one that does
    not is decoded in full to be sure. Well under a millisecond per image (0.2 ms for the
    demo city's JPEGs in the page cache).

    Args:
        file: the image file.

    Returns:
        A short reason (``"file not found"``, ``"empty file"``, ``"not a readable image
        (...)"``), or None when the file is a readable image.
    """
    if not os.path.isfile(file):
        return "file not found"
    try:
        if os.path.getsize(file) == 0:
            return "empty file"
        with Image.open(file) as image:
            image.verify()
            is_jpeg = image.format == "JPEG"
        if is_jpeg:
            with open(file, "rb") as handle:
                handle.seek(max(0, os.path.getsize(file) - _JPEG_TAIL_BYTES))
                ended = _JPEG_END in handle.read()
            if not ended:
                with Image.open(file) as image:
                    image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"not a readable image ({exc})"
    return None


#: Files this process found readable, with the (size, mtime_ns) they had then. One command
#: reads a catalog's images several times (``demo-runs``: the scene filter and a Flickr fusion
#: run, perception and a GSV fusion run); a file unchanged since its check is not parsed again.
_READABLE: dict[str, tuple[int, int]] = {}


def _checked_problem(file: str) -> str | None:
    """:func:`image_problem`, skipped for a file found readable before and unchanged since."""
    try:
        status = os.stat(file)
    except OSError:
        return image_problem(file)
    stamp = (status.st_size, status.st_mtime_ns)
    if _READABLE.get(file) == stamp:
        return None
    reason = image_problem(file)
    if reason is None:
        _READABLE[file] = stamp
    return reason


def _blank(values: pd.Series) -> np.ndarray:
    """True where a value is missing or an empty string."""
    return (values.isna() | (values.astype(str).str.strip() == "")).to_numpy()


def _utc_times(values: pd.Series) -> pd.Series:
    """Times as timezone-aware UTC; NaT where empty or unparseable."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return pd.to_datetime(values, utc=True)
    return pd.to_datetime(values, utc=True, errors="coerce", format="ISO8601")


def _rd_positions(
    table: pd.DataFrame, path: Path
) -> tuple[np.ndarray, np.ndarray, dict[str, PositionCheck]]:
    """RD x, y of each row and the rows whose position is missing, outside NL or swapped.

    Position comes from the point geometry if there is one, else ``x, y`` (RD New), else
    ``lon, lat`` (WGS84).
    """
    if isinstance(table, gpd.GeoDataFrame):
        if table.crs is None:
            raise ValueError(f"{path}: the geometry has no CRS")
        crs = CRS.from_user_input(table.crs)
        shapes = np.asarray(table.geometry.array, dtype=object)
        point = (shapely.get_type_id(shapes) == 0) & ~shapely.is_empty(shapes)
        a = np.full(len(table), np.nan)
        b = np.full(len(table), np.nan)
        a[point] = shapely.get_x(shapes[point])
        b[point] = shapely.get_y(shapes[point])
        names = ("lon", "lat") if crs.is_geographic else ("x", "y")
    elif {"x", "y"} <= set(table.columns):
        crs, names = CRS.from_user_input(RD_NEW), ("x", "y")
    elif {"lon", "lat"} <= set(table.columns):
        crs, names = CRS.from_user_input(WGS84), ("lon", "lat")
    else:
        raise ValueError(
            f"{path}: no position columns; need 'lon' and 'lat' (WGS84), 'x' and 'y' "
            "(EPSG:28992) or a point geometry (GeoParquet)"
        )
    if not isinstance(table, gpd.GeoDataFrame):
        a = pd.to_numeric(table[names[0]], errors="coerce").to_numpy(dtype=np.float64)
        b = pd.to_numeric(table[names[1]], errors="coerce").to_numpy(dtype=np.float64)

    to_lonlat = Transformer.from_crs(crs, WGS84, always_xy=True)
    known = np.isfinite(a) & np.isfinite(b)
    inside = known & _in_nl(*to_lonlat.transform(a, b))
    swapped = known & ~inside & _in_nl(*to_lonlat.transform(b, a))
    outside = known & ~inside & ~swapped

    def at(i: int) -> str:
        return f"{names[0]}={a[i]:.6g}, {names[1]}={b[i]:.6g}"

    x, y = Transformer.from_crs(crs, RD_NEW, always_xy=True).transform(a, b)
    x = np.where(inside, x, np.nan)
    y = np.where(inside, y, np.nan)
    swap_name = "lat/lon" if names == ("lon", "lat") else "x/y"
    return (
        x,
        y,
        {
            "missing position": (~known, lambda i: f"missing or non-numeric {names[0]}/{names[1]}"),
            "outside the Netherlands": (
                outside,
                lambda i: f"position outside the Netherlands ({at(i)})",
            ),
            "swapped position": (swapped, lambda i: f"{swap_name} swapped? ({at(i)})"),
        },
    )


def _in_nl(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    min_lon, min_lat, max_lon, max_lat = NL_LONLAT_BOUNDS
    return (lon >= min_lon) & (lon <= max_lon) & (lat >= min_lat) & (lat <= max_lat)


def problem_examples(problems: pd.DataFrame) -> str:
    """The first rejected row of each kind of problem, as text: its row and what is wrong.

    A warning lists these, so that a bad image file is named where it is reported, not only in
    ``Catalog.problems``; every other row is there.

    Args:
        problems: a ``Catalog.problems`` table (columns :data:`PROBLEM_COLUMNS`).

    Returns:
        ``"row 3: image file not found: /x.jpg; row 7: ..."``, one entry per kind in row
        order; empty for no problems.
    """
    first = problems.sort_values("row", kind="stable").drop_duplicates("kind")
    pairs = zip(first["row"], first["problem"], strict=True)
    return "; ".join(f"row {row}: {text}" for row, text in pairs)


def _kind_counts(problems: pd.DataFrame) -> str:
    counts = problems["kind"].value_counts(sort=False)
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


# --- joining to the grid ---------------------------------------------------------------------


def _in_cells(images: pd.DataFrame, cell_ids: np.ndarray) -> np.ndarray:
    """Mask of images whose ``cell_id`` is one of ``cell_ids``.

    On a regular grid the cell id of a point is its spatial join, so this is an
    ``np.isin`` on integers: a million points take milliseconds.
    """
    require_columns(images, ("cell_id",), "images")
    return np.isin(images["cell_id"].to_numpy(), np.asarray(cell_ids, dtype=np.int64))


def join_cells(images: gpd.GeoDataFrame, cell_ids: np.ndarray) -> gpd.GeoDataFrame:
    """Keep the images that lie in one of ``cell_ids`` (e.g. a city grid).

    Images in other cells are left out, and counted in a warning.

    Returns:
        The kept rows of ``images``, unchanged (no columns added).
    """
    inside = _in_cells(images, cell_ids)
    n_outside = int((~inside).sum())
    if n_outside:
        warnings.warn(
            f"join_cells: {n_outside} of {len(images)} images lie outside the "
            f"{len(cell_ids)} grid cells and were left out",
            stacklevel=2,
        )
    return images[inside]


def images_per_cell(images: pd.DataFrame, cell_ids: np.ndarray) -> pd.DataFrame:
    """Number of images per cell and source.

    Returns:
        int64 DataFrame indexed by ``cell_id`` (``cell_ids`` in their order) with one column
        per source (:func:`source_names`: every one of :data:`SOURCES`, then any other source
        of ``images``); 0 for cells without images.
    """
    inside = images[_in_cells(images, cell_ids)]
    counts = inside.groupby(["cell_id", "source"]).size().unstack(fill_value=0)
    counts = counts.reindex(
        index=pd.Index(np.asarray(cell_ids, dtype=np.int64), name="cell_id"),
        columns=source_names(images["source"]),
        fill_value=0,
    )
    counts.columns.name = None
    return counts.astype(np.int64)


# --- writing ---------------------------------------------------------------------------------


#: Columns :func:`read_catalog` derives from the position; never written to a catalog file.
DERIVED_COLUMNS = ("cell_id", "geometry")


def write_catalog(images: pd.DataFrame, path: str | PathLike) -> Path:
    """Write images as a catalog that :func:`read_catalog` reads back, atomically.

    Positions are stored as RD ``x, y`` and paths relative to the catalog's folder. The
    standard columns come first; any other columns (licence details, owner, ``lon, lat``,
    ...) are kept after them, except the derived :data:`DERIVED_COLUMNS`.

    Args:
        images: a table with :data:`REQUIRED_COLUMNS`, ``x`` and ``y`` (e.g.
            ``Catalog.images``); ``path`` absolute or relative to the working directory.
        path: ``.parquet`` or ``.csv``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ValueError(f"{path}: a catalog is written as .parquet or .csv, not {suffix!r}")
    require_columns(images, (*REQUIRED_COLUMNS, "x", "y"), "images")
    first = [*REQUIRED_COLUMNS, "x", "y", *(c for c in OPTIONAL_COLUMNS if c in images.columns)]
    rest = [c for c in images.columns if c not in first and c not in DERIVED_COLUMNS]
    table = pd.DataFrame(images[first + rest]).reset_index(drop=True)
    folder = path.parent.resolve()
    table["path"] = _relative_paths(table["path"], folder)
    if suffix == ".csv":
        return write_atomic(path, lambda tmp: table.to_csv(tmp, index=False))
    return write_atomic(path, lambda tmp: table.to_parquet(tmp, index=False))


def _relative_paths(paths: pd.Series, folder: Path) -> list:
    """``paths`` relative to ``folder``; each image's folder is resolved once, not each file
    (a catalog has many images per folder, and resolving is a few system calls a level)."""
    resolved: dict[str, str] = {}

    def relative(p: str | PathLike) -> str:
        parent, name = os.path.split(os.fspath(p))
        if parent not in resolved:
            resolved[parent] = os.path.relpath(os.path.realpath(parent or "."), folder)
        return os.path.normpath(os.path.join(resolved[parent], name))

    return [p if pd.isna(p) else relative(p) for p in paths]


def merge_catalog(rows: pd.DataFrame, catalog: str | PathLike) -> Path:
    """Write ``rows`` into a Parquet catalog, replacing its existing rows of the same ids.

    ``rows`` is in stored form (paths relative to the catalog's folder, RD ``x, y``), as the
    street-level fetches build it; the result is written by :func:`write_catalog`, so extra
    columns (licence, owner, ``lon, lat``, ...) of old and new rows are kept.

    Raises:
        ValueError: naming the file, when the existing catalog is not a table this can extend.
    """
    catalog = Path(catalog)
    if catalog.suffix.lower() != ".parquet":
        raise ValueError(f"{catalog}: street-level fetches write a .parquet catalog")
    require_columns(rows, (*REQUIRED_COLUMNS, "x", "y"), "new catalog rows")
    table = rows
    if catalog.exists():
        existing = read_table(catalog, "image catalog")
        if "geometry" in existing.columns:
            raise ValueError(
                f"{catalog}: a GeoParquet catalog cannot be extended; "
                "write it as plain Parquet with x, y columns first"
            )
        require_columns(existing, (*REQUIRED_COLUMNS, "x", "y"), catalog)
        kept = existing[~existing["id"].astype(str).isin(rows["id"].astype(str))]
        table = pd.concat([kept, rows], ignore_index=True) if len(kept) else rows
    folder = catalog.parent
    table = table.assign(path=[p if pd.isna(p) else str(folder / p) for p in table["path"]])
    return write_catalog(table, catalog)
