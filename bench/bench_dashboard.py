"""Dashboard benchmarks on the whole demo city: map payload size and time, neighbour queries.

Both run the real pages through Streamlit's AppTest (server-side time of a rerun, no browser)
on a scratch data root that links the city's inputs and holds its own runs, so the user's runs
are never touched. Build the city first: ``python -m train demo --out data/demo``.
"""

from __future__ import annotations

import gzip
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydeck as pdk

from bench.common import measure, register
from core.dataroot import DataRoot
from core.grid import read_grid
from core.neighbours import EmbeddingIndex
from core.runs import RunWriter

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
_LINKED = ("grid.parquet", "labels", "aerial", "street", "context")


def scratch_root(city: Path, folder: Path) -> Path:
    """A data root whose inputs are links to ``city``'s and whose runs folder is empty."""
    if not (city / "grid.parquet").is_file():
        raise FileNotFoundError(
            f"{city}: no demo city; build it with `python -m train demo --out {city}`"
        )
    root = folder / "root"
    root.mkdir()
    for name in _LINKED:
        if (city / name).exists():
            (root / name).symlink_to((city / name).resolve())
    return root


def _app(root: Path):
    from streamlit.testing.v1 import AppTest

    os.environ.update({"STADSBEELD_DATA": str(root), "STADSBEELD_START_WORKER": "0"})
    os.environ.pop("STADSBEELD_RETRAIN", None)
    return AppTest.from_file(APP, default_timeout=600)


def _timed_run(app, action=None) -> float:
    start = time.perf_counter()
    (action(app) if action else app).run()
    elapsed = time.perf_counter() - start
    if app.exception:
        raise RuntimeError(f"dashboard raised: {app.exception[0].value}")
    return elapsed


def _naive_geojson(root: Path, spec: dict) -> str:
    """The same cells and tooltip fields as a GeoJSON polygon per cell, pydeck's default JSON."""
    records = pd.DataFrame(
        next(layer for layer in spec["layers"] if layer.get("id") == "cells")["data"]
    )
    cells = (
        read_grid(DataRoot(root).grid).set_index("cell_id").loc[records["i"]].to_crs("EPSG:4326")
    )
    properties = records.drop(columns=["p"]).rename(
        columns={
            "i": "cell_id",
            "b": "buurt_naam",
            "d": "district",
            "v": "value",
            "t": "true",
            "y": "predicted",
            "r": "residual",
            "g": "gsv_images",
            "f": "flickr_images",
            "c": "fill",
        }
    )
    features = cells[["geometry"]].reset_index(drop=True).join(properties)
    layer = pdk.Layer(
        "GeoJsonLayer",
        json.loads(features.to_json()),
        get_fill_color="properties.fill",
        pickable=True,
    )
    return pdk.Deck(layers=[layer], map_style=None).to_json()


def _map_page(
    app, page: str | None, key: str, values: tuple[str, str], repeat: int
) -> dict[str, Any]:
    """Cold first run of a map page, then warm reruns switching its layer between two values."""
    cold = _timed_run(app, (lambda a: a.switch_page(page)) if page else None)
    for value in values:  # fill the layer cache
        _timed_run(app, lambda a, v=value: a.selectbox(key=key).set_value(v))
    warm = [
        _timed_run(app, lambda a, v=values[i % 2]: a.selectbox(key=key).set_value(v))
        for i in range(repeat)
    ]
    slim = app.get("deck_gl_json_chart")[0].proto.json
    spec = json.loads(slim)
    return {"spec": spec, "json": slim, "cold": cold, "warm": warm}


def _sizes(measured: dict[str, Any], root: Path) -> dict[str, Any]:
    slim = measured["json"]
    t_naive, naive = measure(lambda: _naive_geojson(root, measured["spec"]), 1)
    cells = next(layer for layer in measured["spec"]["layers"] if layer.get("id") == "cells")[
        "data"
    ]
    return {
        "cells": len(cells),
        "grid_layer_bytes": len(slim),
        "grid_layer_gzip_bytes": len(gzip.compress(slim.encode())),
        "geojson_layer_bytes": len(naive),
        "geojson_layer_gzip_bytes": len(gzip.compress(naive.encode())),
        "bytes_ratio": len(slim) / len(naive),
        "cold_first_run_s": measured["cold"],
        "warm_rerun_median_s": statistics.median(measured["warm"]),
        "warm_rerun_max_s": max(measured["warm"]),
        "geojson_build_s": t_naive["median_s"],
    }


@register("dashboard_map", repeat=7, city="data/demo")
def bench_dashboard_map(repeat: int, city: str) -> dict[str, Any]:
    """Map payload bytes of the grid layer vs a GeoJSON polygon layer of the same cells and
    tooltip fields, and the server time of a cold first run and of warm reruns (layer switches
    on cached data): the city map (scored cells) and the coverage map (every grid cell)."""
    with tempfile.TemporaryDirectory() as folder:
        root = scratch_root(Path(city), Path(folder))
        app = _app(root)
        scored = _sizes(_map_page(app, None, "map_layer", ("won", "lbm"), repeat), root)
        every = _sizes(
            _map_page(app, "views/coverage.py", "coverage_layer", ("gsv", "gap"), repeat), root
        )
    return {
        "city_map": scored,
        "coverage_map": every,
        "targets": {"bytes_ratio_max": 0.2, "warm_rerun_s_max": 0.5},
    }


@register("dashboard_neighbours", repeat=10, city="data/demo", k=50, dim=128)
def bench_dashboard_neighbours(repeat: int, city: str, k: int, dim: int) -> dict[str, Any]:
    """Neighbour query on every grid cell's embedding: the index search alone, and the whole
    neighbours page rerun after choosing another cell (search, table, map payload)."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        root = scratch_root(Path(city), Path(folder))
        ids = read_grid(DataRoot(root).grid)["cell_id"].to_numpy()
        vectors = rng.standard_normal((len(ids), dim)).astype(np.float32)
        with RunWriter(DataRoot(root).runs, "probe", {"label": "random embedding"}) as run:
            run.write_metrics({})
            run.write_predictions(
                pd.DataFrame({"cell_id": ids, "split": "test", "true": 0.0, "predicted": 0.0})
            )
            run.write_embeddings(ids, vectors)
        index = EmbeddingIndex(ids, vectors)
        queries = rng.choice(ids, repeat + 1, replace=False)
        t_search, _ = measure(lambda: index.neighbours(int(rng.choice(ids)), k), repeat)

        app = _app(root)
        app.session_state["selected_cell"] = int(queries[0])
        _timed_run(app)
        _timed_run(app, lambda a: a.switch_page("views/neighbours.py"))
        _timed_run(app, lambda a: a.slider(key="nb_k").set_value(k))
        page = []
        for cell in queries[1:]:

            def choose(a, c=int(cell)):
                a.session_state["selected_cell"] = c
                return a

            page.append(_timed_run(app, choose))
        shown = len(app.dataframe[0].value)
    return {
        "cells": len(ids),
        "dim": dim,
        "k": k,
        "rows_shown": shown,
        "search_median_s": t_search["median_s"],
        "page_rerun_median_s": statistics.median(page),
        "page_rerun_max_s": max(page),
        "targets": {"page_rerun_s_max": 0.2},
    }
