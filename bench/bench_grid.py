"""Grid benchmarks: the whole-city grid, and joining a large image catalog to it."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from bench.common import measure, register
from core import grid
from core.sources import boundaries, catalog


def _load_outline() -> tuple[gpd.GeoDataFrame, Any]:
    cached = getattr(boundaries, "_read_buurten_cached", None)
    if cached is not None:  # time a cold read, not the lru_cache
        cached.cache_clear()
    buurten = boundaries.read_buurten()
    return buurten, boundaries.municipality_outline(buurten)


@register("grid", repeat=5, block_size=1000.0, seed=0)
def bench_grid(repeat: int, block_size: float, seed: int) -> dict[str, Any]:
    """Whole-city grid: load outline (reported apart), grid_for_boundary, assign_buurten, split."""
    t_outline, (buurten, outline) = measure(_load_outline, repeat)
    t_grid, ids = measure(lambda: grid.grid_for_boundary(outline), repeat)
    t_buurten, table = measure(lambda: boundaries.assign_buurten(ids, buurten), repeat)
    t_split, split = measure(
        lambda: grid.spatial_split(ids, block_size=block_size, seed=seed), repeat
    )
    cells = grid.to_geodataframe(ids, split=split)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.parquet"
        t_write, _ = measure(lambda: grid.write_grid(cells, path), repeat)
        t_read, _ = measure(lambda: grid.read_grid(path), repeat)
        parquet_kb = path.stat().st_size / 1024
    return {
        "cells": len(ids),
        "cells_with_buurt": int((table["buurt_code"] != "").sum()),
        "blocks": len(np.unique(grid.block_id(ids, block_size))),
        "outline_load": t_outline,
        "grid_for_boundary": t_grid,
        "assign_buurten": t_buurten,
        "spatial_split": t_split,
        "build_total": {k: t_grid[k] + t_buurten[k] + t_split[k] for k in t_grid},
        "write_grid": t_write,
        "read_grid": t_read,
        "grid_parquet_kb": round(parquet_kb, 1),
    }


def _count_per_cell_numpy(x: np.ndarray, y: np.ndarray, city: np.ndarray) -> tuple:
    ids = grid.cell_id(x, y)
    ids = ids[np.isin(ids, city)]
    return np.unique(ids, return_counts=True)


@register("catalog_join", n_points=1_000_000, repeat=5, seed=0)
def bench_catalog_join(n_points: int, repeat: int, seed: int) -> dict[str, Any]:
    """Random RD points in the city bbox -> cell ids -> keep city cells -> count per cell."""
    outline = boundaries.municipality_outline()
    city = grid.grid_for_boundary(outline)  # sorted
    minx, miny, maxx, maxy = outline.bounds
    rng = np.random.default_rng(seed)
    x = rng.uniform(minx, maxx, n_points)
    y = rng.uniform(miny, maxy, n_points)

    t_cell_id, ids = measure(lambda: grid.cell_id(x, y), repeat)
    t_isin, inside = measure(lambda: np.isin(ids, city), repeat)
    kept = ids[inside]

    def searchsorted_mask() -> np.ndarray:
        pos = np.minimum(np.searchsorted(city, ids), len(city) - 1)
        return city[pos] == ids

    t_search, inside2 = measure(searchsorted_mask, repeat)
    if not np.array_equal(inside, inside2):
        raise AssertionError("searchsorted and isin disagree")
    t_unique, (cells, counts) = measure(lambda: np.unique(kept, return_counts=True), repeat)
    t_pandas, per_cell = measure(lambda: pd.Series(kept).value_counts(), repeat)
    if len(per_cell) != len(cells):
        raise AssertionError("pandas and numpy counts disagree")
    t_total, _ = measure(lambda: _count_per_cell_numpy(x, y, city), repeat)
    results: dict[str, Any] = {
        "points": n_points,
        "points_in_city": int(inside.sum()),
        "city_cells": len(city),
        "cells_with_points": len(cells),
        "cell_id": t_cell_id,
        "isin": t_isin,
        "searchsorted_mask": t_search,
        "np_unique_counts": t_unique,
        "pandas_value_counts": t_pandas,
        "numpy_total": t_total,
    }
    results.update(_bench_catalog_module(x, y, city, repeat))
    return results


def _bench_catalog_module(
    x: np.ndarray, y: np.ndarray, city: np.ndarray, repeat: int
) -> dict[str, Any]:
    """The real path: a 1M-row catalog file read, joined to the city grid, counted per cell."""
    n = len(x)
    images = pd.DataFrame(
        {
            "id": np.char.add("img", np.arange(n).astype(str)),
            "source": np.where(np.arange(n) % 3 == 0, "flickr", "gsv"),
            "path": np.char.add(np.char.add("images/", np.arange(n).astype(str)), ".jpg"),
            "x": x,
            "y": y,
            "heading": np.zeros(n),
            "captured_at": pd.Timestamp("2020-06-01"),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "catalog.parquet"
        images["path"] = [str(Path(tmp) / p) for p in images["path"]]
        catalog.write_catalog(images, path)
        t_read, read = measure(lambda: catalog.read_catalog(path, check_files=False), repeat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # join_cells warns about the points outside the city
        t_join, joined = measure(lambda: catalog.join_cells(read.images, city), repeat)
    t_count, counts = measure(lambda: catalog.images_per_cell(joined, city), repeat)
    return {
        "read_catalog_1m": t_read,
        "join_cells": t_join,
        "images_per_cell": t_count,
        "joined_rows": len(joined),
        "cells_counted": int((counts.sum(axis=1) > 0).sum()),
    }
