"""National scale, synthesised: the Netherlands' 100 m grid and Leefbaarometer sizes.

About 3.4 million 100 m cells cover the Dutch land area; the Leefbaarometer scores about 0.4
million of them (where people live) in each release. The benchmark draws a land mask of that
many cells inside the RD New bounds from smooth random noise (blobs the size of provinces and
towns), scores the most "urban" 0.4 million over five release years, and times the code paths
a national data root goes through: the grid's build, write and read, the labels' write and read
in the release format, and the city map's payload for the scored cells (which the map draws as
blocks: see ``dashboard.maps.view_block_size``). Peak memory is the benchmark process's
resident set, sampled while each step runs.

The neighbour index and place recognition at national sizes are not measured here but by
``python -m bench faiss`` (:mod:`bench.bench_faiss`), at the same sizes: kNN build and query
over 3.4 million 128-d cell embeddings against exact search, and Recall@K with its memory and
time over 10 million simulated street images (README, the ``faiss`` rows of the benchmark
table).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import geopandas as gpd
import numpy as np
import pandas as pd
import psutil

from bench.bench_load import MemorySampler
from bench.common import register
from core.dataroot import DataRoot
from core.grid import (
    RD_NEW,
    cell_index,
    cell_polygons,
    ids_from_index,
    read_grid,
    spatial_split,
    to_geodataframe,
    write_grid,
)
from core.sources.catalog import write_catalog
from core.sources.lbm import SCORE_COLUMNS, read_lbm, write_lbm

#: RD New cell indices (100 m) of a box around the Netherlands' land.
X_CELLS, Y_CELLS = (130, 2780), (3060, 6200)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scales: tuple[int, ...]):
    """Sum of nearest-upsampled uniform noise at several block sizes (cells), in [0, 1]."""
    field = np.zeros(shape, np.float32)
    for scale in scales:
        coarse = rng.random((shape[0] // scale + 1, shape[1] // scale + 1), dtype=np.float32)
        field += np.kron(coarse, np.ones((scale, scale), np.float32))[: shape[0], : shape[1]]
    return field / len(scales)


def national_cells(cells: int, scored: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``cells`` land cell ids and the ``scored`` most urban of them."""
    rng = np.random.default_rng(seed)
    shape = (X_CELLS[1] - X_CELLS[0], Y_CELLS[1] - Y_CELLS[0])
    land = _smooth_noise(rng, shape, (400, 100, 25))
    flat = land.ravel()
    keep = np.argpartition(-flat, cells - 1)[:cells]
    urban = _smooth_noise(rng, shape, (60, 12, 3)).ravel()[keep]
    ix, iy = np.unravel_index(keep, shape)
    ids = ids_from_index(ix + X_CELLS[0], iy + Y_CELLS[0])
    order = np.argsort(ids)
    ids, urban = ids[order], urban[order]
    return ids, np.sort(ids[np.argpartition(-urban, scored - 1)[:scored]])


def _step(fn: Callable[..., Any], *args: Any) -> tuple[dict[str, float], Any]:
    """Wall time and the process's peak resident memory (MB) while ``fn(*args)`` runs."""
    sampler = MemorySampler(psutil.Process().pid, interval=0.05)
    sampler.start()
    start = time.perf_counter()
    value = fn(*args)
    seconds = time.perf_counter() - start
    samples = sampler.stop() or [psutil.Process().memory_info().rss]
    return {"s": seconds, "peak_rss_mb": max(samples) / 2**20}, value


def _labels(scored: np.ndarray, years: tuple[int, ...], seed: int) -> gpd.GeoDataFrame:
    """Release-format labels of the scored cells for every year (plausible score ranges)."""
    rng = np.random.default_rng(seed)
    n = len(scored)
    frames = []
    for year in years:
        table = {"grid_id": scored, "jaar": np.full(n, year)}
        table["lbm"] = rng.normal(4.1, 0.25, n).round(4)
        table["afw"] = (table["lbm"] - 4.1).round(4)
        for column in SCORE_COLUMNS:
            table.setdefault(column, rng.normal(0.0, 0.1, n).round(4))
        frames.append(pd.DataFrame(table))
    labels = pd.concat(frames, ignore_index=True)
    polygons = dict(zip(scored, cell_polygons(scored), strict=True))
    return gpd.GeoDataFrame(labels, geometry=labels["grid_id"].map(polygons).to_list(), crs=RD_NEW)


def _grid(ids: np.ndarray, seed: int) -> gpd.GeoDataFrame:
    """The grid as a data root holds it; each cell's "district" is its 50 km square, standing
    in for the municipality, so the page's per-district table has a national size too."""
    ix, iy = cell_index(ids)
    district = pd.Series(ix // 500).astype(str) + "-" + pd.Series(iy // 500).astype(str)
    return to_geodataframe(
        ids,
        split=spatial_split(ids, seed=seed),
        buurt_naam=np.full(len(ids), ""),
        district=("square " + district).to_numpy(),
    )


def _city_map_page(root: Path) -> dict[str, Any]:
    """The city map page on the national root, run by Streamlit's AppTest as a session would:
    the first run (every file read, the layer aggregated), a warm rerun, a switch to a new
    layer and back to the first (cached), and the deck it sends."""
    from streamlit.testing.v1 import AppTest

    import dashboard

    write_catalog(
        pd.DataFrame(columns=["id", "source", "path", "heading", "captured_at", "x", "y"]),
        root / "street" / "catalog.parquet",
    )
    settings = {
        "STADSBEELD_DATA": str(root),
        "STADSBEELD_RETRAIN": "0",
        "STADSBEELD_START_WORKER": "0",
    }
    with mock.patch.dict(os.environ, settings):
        app = AppTest.from_file(
            str(Path(dashboard.__file__).parent / "app.py"), default_timeout=3600
        )
        first, _ = _step(app.run)
        warm, _ = _step(app.run)
        layer = next(box for box in app.selectbox if box.label == "Layer")
        new_layer, _ = _step(lambda: layer.set_value("afw").run())
        back, _ = _step(
            lambda: (
                next(box for box in app.selectbox if box.label == "Layer").set_value("lbm").run()
            )
        )
        spec = app.get("deck_gl_json_chart")[0].proto.json
        errors = [str(e.value) for e in app.exception]
        metrics = {m.label: m.value for m in app.metric}
    return {
        "first_run": first,
        "warm_rerun": warm,
        "new_layer": new_layer,
        "back_to_cached_layer": back,
        "deck_mb": len(spec) / 1e6,
        "deck_cells": len(
            next(x for x in json.loads(spec)["layers"] if x["id"] == "cells")["data"]
        ),
        "deck_gzip_mb": len(gzip.compress(spec.encode())) / 1e6,
        "metrics": metrics,
        "errors": errors,
    }


def _map_payload(scored: np.ndarray, seed: int) -> dict[str, Any]:
    """The city map's deck for the scored cells, as the page builds it (blocks), and its size."""
    from dashboard import maps

    rng = np.random.default_rng(seed)
    shown = pd.DataFrame({"cell_id": scored, "value": rng.normal(4.1, 0.25, len(scored))})
    shown["district"] = ""

    def build() -> tuple[list[dict], float]:
        block = maps.view_block_size(shown["cell_id"].to_numpy())
        blocks = maps.aggregate_blocks(shown, block)
        colours, _ = maps.sequential(blocks["value"].to_numpy(float), "lbm")
        return maps.cell_payload(blocks, colours, blocks["value"]), block

    cold, (payload, block) = _step(build)
    view = maps.fit_view((3.3, 50.7, 7.3, 53.6))

    def deck() -> str:
        return maps.city_deck(payload, {"view": view}, "lbm", cell_size=block).to_json()

    first, text = _step(deck)
    warm, _ = _step(deck)
    return {
        "block_m": block,
        "blocks": len(payload),
        "payload_mb": len(text) / 1e6,
        "payload_gzip_mb": len(gzip.compress(text.encode())) / 1e6,
        "aggregate": cold,
        "deck_json_first": first,
        "deck_json_warm": warm,
    }


@register(
    "national",
    cells=3_400_000,
    scored=400_000,
    years=(2014, 2016, 2018, 2020, 2022),
    seed=0,
    page=True,
)
def bench_national(
    cells: int, scored: int, years: tuple[int, ...], seed: int, page: bool
) -> dict[str, Any]:
    """Grid, labels, map payload and (``page``) the city map page at the Netherlands' sizes
    (see the module; the neighbour index and Recall@K at these sizes are ``bench faiss``)."""
    results: dict[str, Any] = {}
    results["synthesise_cells"], (ids, scored_ids) = _step(
        lambda: national_cells(cells, scored, seed)
    )
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        paths = DataRoot(root)
        results["grid_build"], grid = _step(lambda: _grid(ids, seed))
        results["grid_write"], _ = _step(write_grid, grid, paths.grid)
        del grid
        results["grid_read"], grid = _step(lambda: read_grid(paths.grid))
        results["grid_parquet_mb"] = paths.grid.stat().st_size / 1e6
        del grid
        labels = _labels(scored_ids, years, seed)
        paths.scores.parent.mkdir(parents=True)
        results["labels_write"], _ = _step(write_lbm, labels, paths.scores, paths.lbm_grid)
        del labels
        results["labels_read"], labels = _step(lambda: read_lbm(paths.scores, paths.lbm_grid))
        results["label_rows"] = len(labels)
        del labels
        results["map"] = _map_payload(scored_ids, seed)
        if page:
            results["page"] = _city_map_page(root)
    results |= {"cells": len(ids), "scored_cells": len(scored_ids), "years": len(years)}
    results["targets"] = {"map_payload_mb_max": 10.0, "map_warm_rerun_s_max": 1.0}
    return results
