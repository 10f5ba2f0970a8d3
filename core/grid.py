"""The Leefbaarometer 100 m grid in EPSG:28992 (RD New).

Cells are 100 m squares aligned to multiples of 100 m. A cell is identified by its lower-left
corner: ``cell_id = (x0 // 100) * 10_000 + (y0 // 100)``, so a point, a polygon from the
Leefbaarometer GeoPackage and a pixel of an aerial raster all map to the same id. For RD New
(x in 0..300 km, y in 289..629 km) the id is a positive int64 such as ``12134872`` for the cell
whose lower-left corner is (121300, 487200).

All functions are vectorised over numpy arrays; a whole-city grid is a few milliseconds.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from shapely.geometry.base import BaseGeometry

from core.io import write_atomic

CELL_SIZE = 100.0
RD_NEW = "EPSG:28992"
_ROW_FACTOR = 10_000  # iy must stay below this: RD y < 1000 km

Bounds = tuple[float, float, float, float]


def cell_id(x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
    """Ids of the cells containing RD points (points on an edge belong to the cell above/right).

    Args:
        x: RD New easting(s) in metres.
        y: RD New northing(s) in metres.

    Returns:
        int64 array of cell ids, shaped like the broadcast of ``x`` and ``y``.

    Raises:
        ValueError: if a coordinate is not finite or lies outside the id range.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("cell_id: coordinates must be finite (got NaN or inf)")
    if ((np.abs(x) <= 180) & (np.abs(y) <= 90)).any():
        raise ValueError(
            "cell_id: coordinates look like lon/lat degrees; project them to EPSG:28992 metres"
        )
    ix = np.floor(x / CELL_SIZE).astype(np.int64)
    iy = np.floor(y / CELL_SIZE).astype(np.int64)
    if (ix < 0).any() or (iy < 0).any() or (iy >= _ROW_FACTOR).any():
        raise ValueError(
            "cell_id: coordinates outside the RD New id range (0 <= x, 0 <= y < 1,000,000 m); "
            "are they lon/lat instead of EPSG:28992 metres?"
        )
    return ix * _ROW_FACTOR + iy


def cell_index(ids: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Column and row indices (``x0 // 100``, ``y0 // 100``) of cell ids."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids // _ROW_FACTOR, ids % _ROW_FACTOR


def ids_from_index(ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Cell ids from column and row indices."""
    return np.asarray(ix, dtype=np.int64) * _ROW_FACTOR + np.asarray(iy, dtype=np.int64)


def cell_origin(ids: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Lower-left corners (x0, y0) of cells, in RD metres."""
    ix, iy = cell_index(ids)
    return ix * CELL_SIZE, iy * CELL_SIZE


def cell_center(ids: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """Centres (cx, cy) of cells, in RD metres."""
    x0, y0 = cell_origin(ids)
    return x0 + CELL_SIZE / 2, y0 + CELL_SIZE / 2


def cell_polygons(ids: np.ndarray) -> np.ndarray:
    """Square shapely polygons of cells (vectorised)."""
    x0, y0 = cell_origin(ids)
    return shapely.box(x0, y0, x0 + CELL_SIZE, y0 + CELL_SIZE)


def cells_in_bounds(bounds: Bounds) -> np.ndarray:
    """Ids of all cells intersecting a (minx, miny, maxx, maxy) box in RD metres, row-major."""
    minx, miny, maxx, maxy = bounds
    if not (maxx > minx and maxy > miny):
        raise ValueError(f"cells_in_bounds: empty bounds {bounds}")
    ix = np.arange(np.floor(minx / CELL_SIZE), np.ceil(maxx / CELL_SIZE), dtype=np.int64)
    iy = np.arange(np.floor(miny / CELL_SIZE), np.ceil(maxy / CELL_SIZE), dtype=np.int64)
    gx, gy = np.meshgrid(ix, iy)
    return ids_from_index(gx.ravel(), gy.ravel())


def clip_cells(ids: np.ndarray, boundary: BaseGeometry, predicate: str = "center") -> np.ndarray:
    """Keep the cells that belong to a boundary polygon in RD metres.

    Args:
        ids: candidate cell ids.
        boundary: polygon or multipolygon in EPSG:28992.
        predicate: ``"center"`` keeps cells whose centre lies inside (a partition: every
            point belongs to one cell and adjacent boundaries never share one);
            ``"intersects"`` keeps every cell that touches the boundary's interior.

    Returns:
        The kept ids, in their input order.
    """
    ids = np.asarray(ids, dtype=np.int64)
    shapely.prepare(boundary)
    if predicate == "center":
        cx, cy = cell_center(ids)
        keep = shapely.contains_xy(boundary, cx, cy)
    elif predicate == "intersects":
        squares = cell_polygons(ids)
        keep = shapely.intersects(boundary, squares) & ~shapely.touches(boundary, squares)
    else:
        raise ValueError(
            f"clip_cells: predicate must be 'center' or 'intersects', got {predicate!r}"
        )
    return ids[keep]


def grid_for_boundary(boundary: BaseGeometry, predicate: str = "center") -> np.ndarray:
    """All cells of a boundary polygon (e.g. the municipality), sorted by id."""
    return np.sort(clip_cells(cells_in_bounds(boundary.bounds), boundary, predicate))


def neighbours(ids: np.ndarray, queen: bool = True, within: np.ndarray | None = None) -> np.ndarray:
    """Neighbouring cell ids of each cell.

    Args:
        ids: cells to find neighbours of, shape (n,).
        queen: 8-neighbourhood when True, 4 (rook) when False.
        within: if given, neighbours not in this set are replaced by -1 (e.g. the city grid).

    Returns:
        int64 array (n, 8) or (n, 4); column order is W, E, S, N then the diagonals.
    """
    offsets = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if queen:
        offsets += [(-1, -1), (1, -1), (-1, 1), (1, 1)]
    ix, iy = cell_index(ids)
    out = np.stack([ids_from_index(ix + dx, iy + dy) for dx, dy in offsets], axis=1)
    if within is not None:
        out = np.where(np.isin(out, within), out, -1)
    return out


def block_id(ids: np.ndarray, block_size: float = 1000.0) -> np.ndarray:
    """Id of the square spatial block (``block_size`` metres, a multiple of 100) of each cell."""
    per_block = int(round(block_size / CELL_SIZE))
    if per_block < 1 or abs(per_block * CELL_SIZE - block_size) > 1e-6:
        raise ValueError(f"block_size must be a positive multiple of 100 m, got {block_size}")
    ix, iy = cell_index(ids)
    return ids_from_index(ix // per_block, iy // per_block)


def spatial_split(
    ids: np.ndarray,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    block_size: float = 1000.0,
    seed: int = 0,
) -> np.ndarray:
    """Assign cells to train/val/test by whole spatial blocks, never per cell.

    Neighbouring cells share images and context, so a random per-cell split leaks. Blocks are
    shuffled with ``seed`` and filled greedily until each split holds its share of *cells*.

    Returns:
        Array of ``"train"``, ``"val"`` or ``"test"`` aligned with ``ids``.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1, got {fractions}"
        )
    blocks = block_id(ids, block_size)
    unique, counts = np.unique(blocks, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    cumulative = np.cumsum(counts[order]) / counts.sum()
    # A block goes to the split whose cumulative share its midpoint falls in.
    midpoints = cumulative - counts[order] / counts.sum() / 2
    edges = np.cumsum(fractions)[:2]
    split_of_block = np.empty(len(unique), dtype=object)
    split_of_block[order] = np.array(["train", "val", "test"], dtype=object)[
        np.searchsorted(edges, midpoints, side="right")
    ]
    return split_of_block[np.searchsorted(unique, blocks)].astype(str)


def to_geodataframe(ids: np.ndarray, **columns: np.ndarray | pd.Series) -> gpd.GeoDataFrame:
    """A GeoDataFrame of cell squares in EPSG:28992 with ``cell_id`` and extra columns."""
    ids = np.asarray(ids, dtype=np.int64)
    data = {"cell_id": ids, **{k: np.asarray(v) for k, v in columns.items()}}
    return gpd.GeoDataFrame(data, geometry=cell_polygons(ids), crs=RD_NEW)


def write_grid(cells: gpd.GeoDataFrame, path: str | PathLike) -> Path:
    """Write a cell GeoDataFrame as GeoParquet, atomically (temp file + rename)."""
    path = Path(path)
    if "cell_id" not in cells.columns:
        raise ValueError(f"{path}: a grid table needs a 'cell_id' column")
    return write_atomic(path, lambda tmp: cells.to_parquet(tmp, index=False))


def read_grid(path: str | PathLike) -> gpd.GeoDataFrame:
    """Read a cell GeoParquet written by :func:`write_grid`, checking it is a 100 m grid."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: grid file not found")
    try:
        cells = gpd.read_parquet(path)
    except Exception as exc:  # pyarrow/geopandas raise several types for a bad file
        raise ValueError(f"{path}: not a readable GeoParquet file ({exc})") from exc
    if "cell_id" not in cells.columns:
        raise ValueError(f"{path}: missing column 'cell_id'")
    if cells.crs is None or cells.crs.to_epsg() != 28992:
        raise ValueError(f"{path}: grid must be in EPSG:28992, found {cells.crs}")
    return cells
