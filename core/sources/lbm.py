"""Leefbaarometer 3.0 labels on the 100 m grid.

The release format is two files: a table of scores (``grid_id, jaar, lbm, afw, fys, onv, soc,
vrz, won``; one row per cell and year) and a GeoPackage of 100 m squares in EPSG:28992 keyed
by ``grid_id``. The public WFS (``lbm3:clippedgridscore{YY}``) serves both in one layer, with
the squares clipped to the built-up area. :func:`read_lbm` reads either form and returns one
row per cell and year, keyed by the project's own :func:`core.grid.cell_id`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from core.grid import CELL_SIZE, RD_NEW, cell_id, cell_origin, to_geodataframe
from core.io import read_table, require_columns, write_atomic

SCORE_COLUMNS = ("lbm", "afw", "fys", "onv", "soc", "vrz", "won")
DIMENSIONS = ("fys", "onv", "soc", "vrz", "won")
KEY_COLUMNS = ("grid_id", "jaar")
#: The published overall class 1..9 of a cell (the WFS's and the release's ``kscore``):
#: optional in a score table; 0 or empty means no class.
CLASS_COLUMN = "kscore"
LABEL_COLUMNS = (
    "grid_id",
    "cell_id",
    "jaar",
    *SCORE_COLUMNS,
    "lbm_class",
    "lbm_class_published",
    "geometry",
)

#: National mean of ``lbm``, so ``afw = lbm - NATIONAL_MEAN``. Approximate: the LBM 3.0
#: documentation puts it at about 4.1; the exact value differs per edition (one 2024 WFS
#: record, lbm 4.5682 with afw 0.5226, implies 4.046). Real files carry ``afw`` themselves.
NATIONAL_MEAN = 4.1

CLASS_NAMES = (
    "zeer onvoldoende",
    "ruim onvoldoende",
    "onvoldoende",
    "zwak",
    "voldoende",
    "ruim voldoende",
    "goed",
    "zeer goed",
    "uitstekend",
)

#: Upper edges of classes 1..8 on ``afw`` (lbm minus NATIONAL_MEAN); class 9 is open-ended.
#: Only the fallback where labels carry no published class (:data:`CLASS_COLUMN`). The
#: official LBM 3.0 boundaries could not be verified from the sources at hand, so these
#: are approximate: equal 0.1-wide bands with "voldoende" centred on the national mean. They
#: agree with the one published record found (afw +0.52 -> "uitstekend").
AFW_CLASS_EDGES = (-0.35, -0.25, -0.15, -0.05, 0.05, 0.15, 0.25, 0.35)
#: The same edges on ``lbm``.
LBM_CLASS_EDGES = tuple(NATIONAL_MEAN + edge for edge in AFW_CLASS_EDGES)

#: Plausible range of each score column, inclusive, checked when reading (a data contract, not a
#: statistic). Leefbaarometer 3.0 scores are deviations from the national mean on a scale
#: where the nine classes are 0.1 wide (:data:`AFW_CLASS_EDGES`): published grid scores of
#: ``lbm`` lie within about 3.3..5.0 (``afw`` about -0.8..+0.9) and the five dimensions
#: within about -0.6..+0.6. The bounds are several times wider than that, so no real cell
#: is refused, yet a wrong column, a unit error (a percentage, a class number, a mark out of
#: 10) or a fill value (-999, 99) cannot pass as a score: ``lbm`` 2..6, ``afw`` -2..2 (the
#: same window around :data:`NATIONAL_MEAN`), each dimension -1.5..1.5.
SCORE_RANGES: dict[str, tuple[float, float]] = {
    "lbm": (2.0, 6.0),
    "afw": (-2.0, 2.0),
    **{dimension: (-1.5, 1.5) for dimension in DIMENSIONS},
}
#: First plausible label year: Leefbaarometer editions reach back to 1998 at most (3.0 is
#: backcast to 2002); 1990 leaves room and still refuses typos such as 20200 or 202.
FIRST_YEAR = 1990


def last_year() -> int:
    """Last plausible label year: next year (an edition may be dated ahead of its release)."""
    return datetime.now(UTC).year + 1


# Reprojected squares carry millimetre errors; a real misalignment is tens of metres.
_SQUARE_TOLERANCE_M = 1.0
_EXAMPLES = 5


def _examples(values: Sequence | np.ndarray) -> list:
    return [v.item() if isinstance(v, np.generic) else v for v in list(values)[:_EXAMPLES]]


# --- classes and targets ---------------------------------------------------------------------


def stored_columns(table: pd.DataFrame) -> list[str]:
    """The release columns of a score table: keys, scores and the published class if it has
    one."""
    return [*KEY_COLUMNS, *SCORE_COLUMNS, *([CLASS_COLUMN] if CLASS_COLUMN in table else [])]


def lbm_class(lbm: np.ndarray | pd.Series | float) -> np.ndarray:
    """Approximate Leefbaarometer class 1..9 (:data:`CLASS_NAMES`) of overall scores, the
    fallback for labels without a published class.

    Classes are bands of ``lbm - NATIONAL_MEAN`` with edges :data:`AFW_CLASS_EDGES`
    (approximate, see there), i.e. :data:`LBM_CLASS_EDGES` on ``lbm``; a value on an edge
    belongs to the higher class.

    Returns:
        int64 array shaped like ``lbm``; 0 where ``lbm`` is NaN (no class).
    """
    lbm = np.asarray(lbm, dtype=np.float64)
    classes = np.digitize(lbm, LBM_CLASS_EDGES) + 1
    return np.where(np.isnan(lbm), 0, classes).astype(np.int64)


def target(labels: pd.DataFrame, column: str) -> pd.Series:
    """One label column as a training target indexed by ``cell_id``.

    Cells without a value (NaN, or class 0 for ``lbm_class``) are not an error when reading
    (the Leefbaarometer leaves some dimensions empty); they are dropped here with a warning
    that says how many.

    Args:
        labels: one year of :func:`read_lbm` output.
        column: a score column (:data:`SCORE_COLUMNS`) or ``"lbm_class"``.

    Raises:
        ValueError: for an unknown column, or if a cell occurs twice (several years).
    """
    valid = (*SCORE_COLUMNS, "lbm_class")
    if column not in valid:
        raise ValueError(f"unknown target column {column!r}; valid columns: {list(valid)}")
    require_columns(labels, ("cell_id", column), "labels")
    ids = labels["cell_id"].to_numpy(dtype=np.int64)
    repeated = pd.Index(ids).duplicated()
    if repeated.any():
        years = sorted(labels["jaar"].unique().tolist()) if "jaar" in labels.columns else "?"
        raise ValueError(
            f"labels: cell_id {ids[repeated][0]} occurs more than once (years {years}); "
            "select one year first, e.g. read_lbm(..., year=2022)"
        )
    values = labels[column].to_numpy(dtype=np.float64)
    missing = np.isnan(values) | ((values == 0) if column == "lbm_class" else False)
    if missing.any():
        warnings.warn(
            f"target {column!r}: dropped {int(missing.sum())} of {len(values)} cells without "
            "a value",
            stacklevel=2,
        )
    dtype = np.int64 if column == "lbm_class" else np.float64
    return pd.Series(
        values[~missing].astype(dtype), index=pd.Index(ids[~missing], name="cell_id"), name=column
    )


# --- reading ---------------------------------------------------------------------------------


def read_lbm(
    scores: str | PathLike, grid: str | PathLike | None = None, year: int | None = None
) -> gpd.GeoDataFrame:
    """Read Leefbaarometer 3.0 scores and their grid as one row per cell and year.

    ``cell_id`` comes from the geometry (an interior point of each polygon), not from
    ``grid_id``, so it agrees with every other source whatever the file's id scheme. Squares
    clipped to the built-up area (as the WFS serves them) are rebuilt to the full 100 m cell.
    NaN scores are kept; :func:`target` drops them.

    Args:
        scores: score table (CSV or Parquet), or a GeoPackage/GeoParquet/GeoJSON holding
            scores and geometry together.
        grid: GeoPackage (or GeoParquet) of squares keyed by ``grid_id``, any CRS; required
            when ``scores`` has no geometry, and preferred over it when given.
        year: keep only this ``jaar``; None keeps all years.

    Returns:
        GeoDataFrame in EPSG:28992 with columns :data:`LABEL_COLUMNS`, sorted by ``jaar`` and
        ``cell_id``; ``grid_id`` is a string, ``geometry`` the full square of ``cell_id``.

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: naming the file, for missing columns, non-numeric scores, duplicate
            (grid_id, jaar) rows, grid_ids absent from the grid, geometries that are not
            squares on the 100 m grid, two grid_ids in one cell, or an absent ``year``.
    """
    scores = Path(scores)
    table = read_table(scores, "Leefbaarometer scores")
    require_columns(table, (*KEY_COLUMNS, *SCORE_COLUMNS), scores)
    table = _validated_scores(table, scores)
    if year is not None:
        available = sorted(table["jaar"].unique().tolist())
        if year not in available:
            raise ValueError(f"{scores}: no scores for year {year}; available years: {available}")
        table = table[table["jaar"] == year]

    if grid is not None:
        grid = Path(grid)
        cells = _grid_cells(grid)
        table = table.merge(cells, on="grid_id", how="left")
        absent = table.loc[table["cell_id"].isna(), "grid_id"].unique()
        if len(absent):
            raise ValueError(
                f"{scores}: {len(absent)} grid_ids are absent from the grid {grid}, "
                f"e.g. {_examples(absent)}"
            )
        geometry_file = grid
    elif isinstance(table, gpd.GeoDataFrame):
        table = table.assign(cell_id=_cells_of(table.geometry, table["grid_id"], scores))
        geometry_file = scores
    else:
        raise ValueError(
            f"{scores}: the scores have no geometry; pass grid= (a GeoPackage of 100 m "
            "squares keyed by grid_id)"
        )

    ids = table["cell_id"].to_numpy(dtype=np.int64)
    clash = table.duplicated(["cell_id", "jaar"], keep=False).to_numpy()
    if clash.any():
        first = ids[clash][0]
        raise ValueError(
            f"{geometry_file}: grid_ids {_examples(table.loc[ids == first, 'grid_id'].unique())} "
            f"all lie in the same 100 m cell {first}"
        )
    # _validated_scores made the published classes int64, 0 where none
    published = table[CLASS_COLUMN] if CLASS_COLUMN in table else np.zeros(len(table), np.int64)
    labels = to_geodataframe(
        ids,
        grid_id=table["grid_id"],
        jaar=table["jaar"],
        **{c: table[c] for c in SCORE_COLUMNS},
        lbm_class=np.where(published > 0, published, lbm_class(table["lbm"])),
        lbm_class_published=published > 0,
    )
    return labels[list(LABEL_COLUMNS)].sort_values(["jaar", "cell_id"], ignore_index=True)


def _validated_scores(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Scores with a string ``grid_id``, integer ``jaar`` and float scores, or a ValueError."""
    table = table.copy()
    for column in KEY_COLUMNS:
        missing = table[column].isna().to_numpy()
        if missing.any():
            raise ValueError(
                f"{path}: {int(missing.sum())} rows have no {column}, "
                f"e.g. row {int(np.flatnonzero(missing)[0]) + 1}"
            )
    for column in ("jaar", *SCORE_COLUMNS):
        numbers = pd.to_numeric(table[column], errors="coerce")
        bad = (numbers.isna() & table[column].notna()).to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{path}: column {column!r} has {int(bad.sum())} non-numeric values, e.g. row "
                f"{row + 1} (grid_id {table['grid_id'].iloc[row]!r}): {table[column].iloc[row]!r}"
            )
        table[column] = numbers.astype(np.float64)
    if CLASS_COLUMN in table:
        classes = pd.to_numeric(table[CLASS_COLUMN], errors="coerce")
        empty = table[CLASS_COLUMN].isna() | (table[CLASS_COLUMN].astype(str).str.strip() == "")
        bad = ~(empty | classes.isin(range(10))).to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{path}: column {CLASS_COLUMN!r} holds {int(bad.sum())} values that are no "
                f"class 1..9 (or 0/empty for none), e.g. row {row + 1}: "
                f"{table[CLASS_COLUMN].iloc[row]!r}"
            )
        table[CLASS_COLUMN] = classes.fillna(0).astype(np.int64)
    fractional = (table["jaar"] % 1 != 0).to_numpy()
    if fractional.any():
        raise ValueError(
            f"{path}: jaar must be a whole year, found {table['jaar'][fractional].iloc[0]}"
        )
    table["jaar"] = table["jaar"].astype(np.int64)
    table["grid_id"] = _grid_id_text(table["grid_id"])
    _check_ranges(table, path)
    repeated = table.duplicated(list(KEY_COLUMNS), keep=False).to_numpy()
    if repeated.any():
        pairs = table.loc[repeated, list(KEY_COLUMNS)].drop_duplicates()
        raise ValueError(
            f"{path}: {len(pairs)} (grid_id, jaar) pairs occur more than once, "
            f"e.g. {_examples(list(pairs.itertuples(index=False, name=None)))}"
        )
    return table


def _check_ranges(table: pd.DataFrame, path: Path) -> None:
    """ValueError naming the file and column when a year or score is out of its range.

    A whole file is refused rather than its odd rows: a score out of range means a wrong
    column, unit or fill value, which no row of that file can be trusted to be free of.
    """
    ranges = {"jaar": (FIRST_YEAR, last_year()), **SCORE_RANGES}
    for column, (low, high) in ranges.items():
        values = table[column].to_numpy(dtype=np.float64)
        bad = ~np.isnan(values) & ((values < low) | (values > high))
        if bad.any():
            rows = table.loc[bad, ["grid_id", column]]
            examples = list(zip(_examples(rows["grid_id"]), _examples(rows[column]), strict=True))
            raise ValueError(
                f"{path}: column {column!r} has {int(bad.sum())} values outside the plausible "
                f"range {low:g}..{high:g}, e.g. (grid_id, {column}) {_examples(examples)}; "
                "a wrong column, unit or fill value? (see core.sources.lbm.SCORE_RANGES)"
            )


def _grid_id_text(ids: pd.Series) -> pd.Series:
    """Ids as text: they may be int in the scores and text in the grid, or the other way."""
    return ids.astype(str)


def _grid_cells(path: Path) -> pd.DataFrame:
    """``grid_id`` -> ``cell_id`` of a grid file, validated."""
    grid = read_table(path, "Leefbaarometer grid")
    if not isinstance(grid, gpd.GeoDataFrame):
        raise ValueError(f"{path}: the grid file has no geometry")
    require_columns(grid, ("grid_id",), path)
    ids = _grid_id_text(grid["grid_id"])
    repeated = ids[ids.duplicated()].unique()
    if len(repeated):
        raise ValueError(
            f"{path}: {len(repeated)} grid_ids occur more than once, e.g. {_examples(repeated)}"
        )
    return pd.DataFrame({"grid_id": ids, "cell_id": _cells_of(grid.geometry, ids, path)})


def _cells_of(geometry: gpd.GeoSeries, grid_ids: pd.Series, path: Path) -> np.ndarray:
    """Cell id of each polygon, checking it fits in one 100 m cell of the grid.

    A polygon may be smaller than its cell (clipped) but never extend beyond the cell that
    contains its interior point: that would be a shifted or non-100 m grid.
    """
    if geometry.crs is None:
        raise ValueError(f"{path}: the geometry has no CRS; expected EPSG:28992 (RD New)")
    shapes = np.asarray(geometry.to_crs(RD_NEW).array, dtype=object)
    grid_ids = grid_ids.to_numpy()
    polygonal = np.isin(shapely.get_type_id(shapes), (3, 6)) & ~shapely.is_empty(shapes)
    if not polygonal.all():
        bad = ~polygonal
        raise ValueError(
            f"{path}: {int(bad.sum())} geometries are missing, empty or not polygons, "
            f"e.g. grid_id {_examples(grid_ids[bad])}"
        )
    points = shapely.point_on_surface(shapes)
    try:
        ids = cell_id(shapely.get_x(points), shapely.get_y(points))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    x0, y0 = cell_origin(ids)
    bounds = shapely.bounds(shapes)
    tol = _SQUARE_TOLERANCE_M
    outside = (
        (bounds[:, 0] < x0 - tol)
        | (bounds[:, 1] < y0 - tol)
        | (bounds[:, 2] > x0 + CELL_SIZE + tol)
        | (bounds[:, 3] > y0 + CELL_SIZE + tol)
    )
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"{path}: {int(outside.sum())} geometries are not 100 m squares aligned to the "
            f"100 m grid (they extend beyond their cell), e.g. grid_id {grid_ids[i]!r} with "
            f"bounds {tuple(round(float(b), 1) for b in bounds[i])}"
        )
    return ids


# --- writing ---------------------------------------------------------------------------------


def write_lbm(
    labels: gpd.GeoDataFrame, scores_csv: str | PathLike, grid_gpkg: str | PathLike
) -> tuple[Path, Path]:
    """Write labels in the two-file release format that :func:`read_lbm` reads.

    Args:
        labels: GeoDataFrame with ``grid_id``, ``jaar``, the score columns and a geometry
            (any CRS; one polygon per ``grid_id``).
        scores_csv: the score table to write (``grid_id, jaar, lbm, ..., won``).
        grid_gpkg: the GeoPackage of ``grid_id`` polygons to write, in EPSG:28992.

    Returns:
        The two paths written. Each file is written atomically.
    """
    if not isinstance(labels, gpd.GeoDataFrame) or labels.crs is None:
        raise ValueError(f"{grid_gpkg}: labels must be a GeoDataFrame with a CRS to write a grid")
    require_columns(labels, (*KEY_COLUMNS, *SCORE_COLUMNS), "labels")
    grid = labels[["grid_id", labels.geometry.name]].drop_duplicates("grid_id").to_crs(RD_NEW)
    scores = pd.DataFrame(labels[stored_columns(labels)])
    if "lbm_class_published" in labels and labels["lbm_class_published"].any():
        # as read_lbm returns them: the published classes go back as kscore, 0 where none
        published = labels["lbm_class_published"].to_numpy(bool)
        scores[CLASS_COLUMN] = np.where(published, labels["lbm_class"], 0)
    return (
        write_atomic(scores_csv, lambda tmp: scores.to_csv(tmp, index=False)),
        write_atomic(grid_gpkg, lambda tmp: grid.to_file(tmp, driver="GPKG", layer="grid")),
    )
