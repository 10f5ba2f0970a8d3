"""Grid benchmarks: the whole-city grid, and joining a large image catalog to it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from bench.common import measure, register
from core import grid
from core.sources import boundaries


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
    """Time core.sources.catalog.join_cells / images_per_cell when that module exists."""
    try:
        from core.sources import catalog
    except ImportError as exc:
        return {"catalog_module": f"not available ({exc})"}
    images = gpd.GeoDataFrame(
        {"image_id": np.arange(len(x)).astype(str), "x": x, "y": y},
        geometry=gpd.points_from_xy(x, y),
        crs=grid.RD_NEW,
    )
    out: dict[str, Any] = {"catalog_module": "core.sources.catalog"}
    inputs = {"images": images}
    for fn_name in ("join_cells", "images_per_cell"):
        fn = getattr(catalog, fn_name, None)
        if fn is None:
            out[fn_name] = "missing"
            continue
        errors = []
        for input_name, frame in inputs.items():  # images_per_cell may want the joined table
            try:
                out[fn_name], value = measure(lambda fn=fn, frame=frame: fn(frame, city), repeat)
            except Exception as exc:  # record, so a signature mismatch shows in the result
                errors.append(f"{input_name}: {type(exc).__name__}: {exc}"[:200])
                continue
            out[f"{fn_name}_input"] = input_name
            out[f"{fn_name}_rows"] = len(value)
            if fn_name == "join_cells":
                inputs = {"images": images, "joined": value}
            break
        else:
            out[fn_name] = "error: " + " | ".join(errors)
    return out
