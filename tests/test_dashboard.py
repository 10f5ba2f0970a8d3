"""Every dashboard page against a real tiny demo data root (Streamlit's AppTest, no browser)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from core.dataroot import DataRoot
from core.grid import read_grid
from core.jobs import JobStore
from core.runs import RunWriter
from core.sources.lbm import read_lbm

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
PAGES = [
    "views/city_map.py",
    "views/predicted.py",
    "views/sources.py",
    "views/coverage.py",
    "views/monitor.py",
    "views/neighbours.py",
    "views/runs.py",
]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory, tiny_demo):
    """A copy of the tiny demo city with an aerial-only and an aerial+GSV run."""
    from core.configs import FusionConfig
    from train.fusion import train_fusion

    root = tmp_path_factory.mktemp("dash") / "city"
    shutil.copytree(tiny_demo, root)
    for ground in (None, "gsv"):
        train_fusion(
            FusionConfig(data=str(root), ground=ground, epochs=2, block_size=300.0, aerial_px=32),
            log=lambda _: None,
        )
    return root


@pytest.fixture
def server_address():
    """Set the address the (tested) server listens on; loopback unless a test says otherwise."""
    from streamlit import config

    before = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield lambda address: config.set_option("server.address", address)
    config.set_option("server.address", before)


@pytest.fixture
def app(demo_root, monkeypatch, server_address):
    """A fresh dashboard session on the demo root, retraining off, no worker started."""
    monkeypatch.setenv("STADSBEELD_DATA", str(demo_root))
    monkeypatch.delenv("STADSBEELD_RETRAIN", raising=False)
    monkeypatch.delenv("STADSBEELD_RETRAIN_SECRET", raising=False)
    monkeypatch.setenv("STADSBEELD_START_WORKER", "0")
    st.cache_data.clear()
    st.cache_resource.clear()
    return AppTest.from_file(APP, default_timeout=120)


def deck_spec(app: AppTest, index: int = 0) -> dict:
    return json.loads(app.get("deck_gl_json_chart")[index].proto.json)


def layer(spec: dict, layer_id: str) -> dict:
    return next(layer for layer in spec["layers"] if layer.get("id") == layer_id)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders(app, page):
    app.run()
    app.switch_page(page).run()
    assert not app.exception, app.exception
    assert app.title, f"{page} shows no title"


def test_city_map_sends_a_slim_grid_layer_with_context(app, demo_root):
    app.run()
    spec = deck_spec(app)
    cells = layer(spec, "cells")
    assert cells["@@type"] == "GridCellLayer" and cells["cellSize"] == 100
    labels = read_lbm(DataRoot(demo_root).scores, DataRoot(demo_root).lbm_grid)
    latest = labels[labels["jaar"] == labels["jaar"].max()].set_index("cell_id")
    assert len(cells["data"]) == latest["lbm"].notna().sum()
    record = cells["data"][0]
    assert record["v"] == pytest.approx(latest.loc[record["i"], "lbm"], abs=1e-3)
    assert {"p", "c", "b", "d", "t", "g", "f"} <= set(record)
    assert {"water", "districts", "outline"} <= {layer.get("id") for layer in spec["layers"]}
    assert "{b}" in app.get("deck_gl_json_chart")[0].proto.tooltip


def test_choosing_another_layer_changes_the_map_data(app):
    app.run()
    before = {r["i"]: r["v"] for r in layer(deck_spec(app), "cells")["data"]}
    app.selectbox(key="map_layer").set_value("won").run()
    after = {r["i"]: r["v"] for r in layer(deck_spec(app), "cells")["data"]}
    assert not app.exception
    assert before.keys() & after.keys() and before != after
    app.selectbox(key="map_layer").set_value("lbm_class").run()
    classes = {r["v"] for r in layer(deck_spec(app), "cells")["data"]}
    assert classes <= set(range(1, 10))
    app.selectbox(key="map_layer").set_value("change").run()
    assert "change in lbm" in app.markdown[0].value


@pytest.mark.parametrize("level", ["buurt", "wijk", "stadsdeel"])
def test_the_map_shows_planners_units_with_the_mean_of_their_scored_cells(app, demo_root, level):
    app.run()
    app.selectbox(key="map_units").set_value(level).run()
    assert not app.exception
    units = layer(deck_spec(app), "units")
    assert units["@@type"] == "PolygonLayer" and units["pickable"]
    # the mean of the latest lbm over each unit's scored cells, computed from the files
    grid = read_grid(DataRoot(demo_root).grid).set_index("cell_id")
    labels = read_lbm(DataRoot(demo_root).scores, DataRoot(demo_root).lbm_grid)
    latest = labels[labels["jaar"] == labels["jaar"].max()].dropna(subset=["lbm"])
    codes = grid.loc[latest["cell_id"], "buurt_code"].to_numpy()
    key = {"buurt": codes, "wijk": pd.Series(codes).str[:2].to_numpy()}.get(
        level, grid.loc[latest["cell_id"], "district"].to_numpy()
    )
    scored = pd.DataFrame({"unit": key, "lbm": latest["lbm"].to_numpy()})
    expected = scored[scored["unit"] != ""].groupby("unit")["lbm"].agg(["mean", "size"])
    drawn = {r["i"]: r for r in units["data"]}  # a unit of several parts: the same values
    assert drawn.keys() == set(expected.index)
    for unit, row in expected.iterrows():
        assert drawn[unit]["v"] == pytest.approx(row["mean"], abs=1e-3)
        assert drawn[unit]["d"].endswith(f"{int(row['size'])} scored cells")
        # too few cells to trust: drawn faint and flagged, never hidden
        assert (drawn[unit]["c"][3] < 255) == (row["size"] < 10)
    assert any("fewer than 10 scored cells" in c.value for c in app.caption)
    table = app.dataframe[0].value
    assert {"cells", "mean", "few"} <= set(table.columns) and len(table) == len(expected)


def test_a_view_over_the_cell_limit_draws_blocks_of_the_same_cells(app, monkeypatch):
    from dashboard import maps

    app.run()
    cells = layer(deck_spec(app), "cells")
    assert cells["cellSize"] == 100
    per_cell = {r["i"]: r["v"] for r in cells["data"]}
    monkeypatch.setattr(maps, "MAX_MAP_CELLS", len(per_cell) // 3)
    st.cache_resource.clear()
    app.run()
    assert not app.exception
    blocks = layer(deck_spec(app), "cells")
    assert blocks["cellSize"] in maps.BLOCK_SIZES
    assert 0 < len(blocks["data"]) <= len(per_cell) // 3
    size = int(blocks["cellSize"] // 100)
    # every block is the mean of the 100 m cells inside it
    members: dict[int, list[float]] = {}
    for cell, value in per_cell.items():
        corner = (cell // 10_000 // size * size) * 10_000 + cell % 10_000 // size * size
        members.setdefault(corner, []).append(value)
    for record in blocks["data"]:
        assert record["v"] == pytest.approx(np.mean(members[record["i"]]), abs=1e-3)
        assert record["b"].startswith(f"{len(members[record['i']])} cells in this")
    assert sum(len(m) for m in members.values()) == len(per_cell)
    assert app.metric[0].value == f"{len(per_cell):,}"  # still counts cells, not blocks
    assert any("m blocks" in caption.value for caption in app.caption)


def test_a_run_shows_predictions_residuals_and_splits(app, demo_root):
    app.run()
    runs = app.selectbox(key="map_run")
    runs.set_value(runs.options.index(next(o for o in runs.options if "aerial+gsv" in o)) - 1).run()
    assert not app.exception
    predicted = layer(deck_spec(app), "cells")["data"]
    assert all(r["y"] == r["v"] for r in predicted)
    app.selectbox(key="map_run_layer").set_value("residual").run()
    residuals = layer(deck_spec(app), "cells")["data"]
    assert all(r["r"] == r["v"] for r in residuals)
    app.selectbox(key="map_split").set_value("test").run()
    assert 0 < len(layer(deck_spec(app), "cells")["data"]) < len(residuals)
    assert any(m.label == "test kendall tau" for m in app.metric)


def test_selected_cell_shows_its_detail_panel(app, demo_root):
    cell = int(read_grid(DataRoot(demo_root).grid)["cell_id"].iloc[40])
    app.session_state["selected_cell"] = cell
    app.run()
    assert not app.exception
    assert any(f"Cell {cell}" in h.value for h in app.subheader)
    assert app.get("image"), "no aerial patch or street image shown"
    assert any("Street View" in m.value for m in app.markdown)


def test_predicted_vs_true_compares_two_runs(app):
    app.run()
    app.switch_page("views/predicted.py").run()
    taus = [m.value for m in app.metric if m.label == "Kendall's tau"]
    assert len(taus) == 1 and len(app.get("plotly_chart")) == 2
    other = app.selectbox(key="pvt_other")
    other.set_value(other.options[1]).run()
    assert not app.exception
    assert len([m for m in app.metric if m.label == "Kendall's tau"]) == 2
    assert len(app.get("deck_gl_json_chart")) == 2


def test_neighbours_page_returns_the_k_nearest_cells(app, demo_root):
    # A known embedding: cell i sits at angle i/1000 on a circle, so cosine similarity to the first
    # cell falls with i and its k nearest cells are the next k.
    ids = read_grid(DataRoot(demo_root).grid)["cell_id"].to_numpy()[:60]
    angles = np.arange(len(ids)) / 1000
    with RunWriter(DataRoot(demo_root).runs, "probe", {"label": "circle"}) as run:
        run.write_metrics({})
        run.write_predictions(
            pd.DataFrame({"cell_id": ids, "split": "test", "true": 0.0, "predicted": 0.0})
        )
        run.write_embeddings(ids, np.stack([np.cos(angles), np.sin(angles)], 1))
    app.session_state["selected_cell"] = int(ids[0])
    app.run()
    app.switch_page("views/neighbours.py").run()
    app.selectbox(key="nb_kind").set_value("probe").run()
    runs = app.selectbox(key="nb_run")
    runs.set_value(next(i for i, o in enumerate(runs.options) if run.run_id in str(o))).run()
    app.slider(key="nb_k").set_value(7).run()
    assert not app.exception
    table = app.dataframe[0].value
    assert table["cell_id"].tolist() == ids[1:8].tolist()
    assert table["similarity"].is_monotonic_decreasing
    assert len(layer(deck_spec(app), "cells")["data"]) == 7


def test_neighbours_side_by_side_count_the_cells_two_models_share(app, demo_root):
    # Two runs: the circle of the test above, and the same circle with cells 1..3 moved a
    # radian away, so the first cell's 7 nearest are 1..7 under one and 4..10 under the other:
    # 4 shared.
    ids = read_grid(DataRoot(demo_root).grid)["cell_id"].to_numpy()[:60]
    angles = np.arange(len(ids)) / 1000
    moved = angles + np.isin(np.arange(len(ids)), [1, 2, 3])
    made = []
    for label, theta in (("circle a", angles), ("circle b", moved)):
        with RunWriter(DataRoot(demo_root).runs, "probe", {"label": label}) as run:
            run.write_metrics({})
            run.write_predictions(
                pd.DataFrame({"cell_id": ids, "split": "test", "true": 0.0, "predicted": 0.0})
            )
            run.write_embeddings(ids, np.stack([np.cos(theta), np.sin(theta)], 1))
        made.append(run.run_id)
    app.session_state["selected_cell"] = int(ids[0])
    app.run()
    app.switch_page("views/neighbours.py").run()
    app.selectbox(key="nb_kind").set_value("probe").run()
    runs = app.selectbox(key="nb_run")
    runs.set_value(next(i for i, o in enumerate(runs.options) if made[0] in str(o))).run()
    app.slider(key="nb_k").set_value(7).run()
    compare = app.multiselect(key="nb_compare")
    other = next(n for n, label in enumerate(compare.options) if made[1] in label)
    compare.set_value([other]).run()
    assert not app.exception
    shared = [m.value for m in app.metric if m.label.startswith("shared with")]
    assert shared == ["4 of 7"]
    assert len(app.get("deck_gl_json_chart")) == 2


def test_coverage_page_maps_the_flickr_gaps(app):
    app.run()
    app.switch_page("views/coverage.py").run()
    gaps = layer(deck_spec(app), "cells")["data"]
    app.selectbox(key="coverage_layer").set_value("gsv").run()
    counts = layer(deck_spec(app), "cells")["data"]
    assert not app.exception
    assert len(gaps) == len(counts) and [r["c"] for r in gaps] != [r["c"] for r in counts]
    assert all(r["v"] == r["g"] for r in counts)
    assert "Coverage per stadsdeel" in [h.value for h in app.subheader]


def test_coverage_page_counts_every_source(app, demo_root):
    from core.sources.catalog import images_per_cell, read_catalog

    app.run()
    app.switch_page("views/coverage.py").run()
    options = app.selectbox(key="coverage_layer").options
    assert {"Amsterdam panoramas images", "Mapillary images"} <= set(options)
    app.selectbox(key="coverage_layer").set_value("mapillary").run()
    assert not app.exception, app.exception
    cells = layer(deck_spec(app), "cells")["data"]
    catalog = read_catalog(DataRoot(demo_root).catalog, check_files=False).images
    counts = images_per_cell(catalog, np.array([r["i"] for r in cells]))["mapillary"]
    assert [r["v"] for r in cells] == counts.tolist() and counts.sum() > 0
    table = next(f.value for f in app.dataframe if "with_mapillary" in f.value.columns)
    assert {"with_amsterdam_panorama", "median_mapillary"} <= set(table.columns)
    assert [m.label for m in app.metric][:5] == [
        "Cells",
        "with Street View",
        "with Flickr",
        "with Amsterdam panoramas",
        "with Mapillary",
    ]


def test_sources_page_compares_three_sources_with_their_coverage_maps(app, demo_root):
    from core.sources.catalog import images_per_cell, read_catalog

    app.run()
    app.switch_page("views/sources.py").run()
    chosen = ["gsv", "amsterdam_panorama", "mapillary"]
    app.multiselect(key="sources_chosen").set_value(chosen).run()
    assert not app.exception, app.exception
    table = app.dataframe[0].value
    assert list(table.index) == ["Street View", "Amsterdam panoramas", "Mapillary"]
    catalog = read_catalog(DataRoot(demo_root).catalog, check_files=False).images
    assert table["images"].tolist() == [int((catalog["source"] == s).sum()) for s in chosen]
    assert table.loc["Mapillary", "licence"] == "CC BY-SA 4.0 (synthetic)"
    assert table.loc["Mapillary", "cells covered"] < table.loc["Street View", "cells covered"]
    for i, source in enumerate(chosen):  # one coverage map per source, in the chosen order
        cells = layer(deck_spec(app, i), "cells")["data"]
        counts = images_per_cell(catalog, np.array([r["i"] for r in cells]))[source]
        assert [r["v"] for r in cells] == counts.tolist()
    assert "Each source in the fusion model" in [h.value for h in app.subheader]
    app.multiselect(key="sources_chosen").set_value(["mapillary"]).run()
    assert any("Choose two sources or more" in i.value for i in app.info)


@pytest.mark.parametrize(
    ("page", "key", "value_column"),
    [
        ("views/predicted.py", "pvt_units", "mean residual"),
        ("views/sources.py", "sources_units", "gsv_abs_error"),
        ("views/coverage.py", "coverage_units", "cells"),
    ],
)
def test_every_map_page_shows_wijken(app, page, key, value_column):
    app.run()
    app.switch_page(page).run()
    app.selectbox(key=key).set_value("wijk").run()
    assert not app.exception, app.exception
    units = layer(deck_spec(app), "units")["data"]
    assert units and all(len(r["i"]) == 2 for r in units)  # Amsterdam's wijk codes: AA, AB, ..
    tables = [frame.value for frame in app.dataframe]
    assert any(value_column in table.columns and len(table) > 1 for table in tables)


def test_runs_page_offers_gis_downloads(app):
    app.run()
    app.switch_page("views/runs.py").run()
    assert not app.exception
    labels = [b.proto.label for b in app.get("download_button")]
    assert labels == [
        "GeoPackage (.gpkg)",
        "GeoParquet (.parquet)",
        "CSV (.csv)",
        "HTML map (.html)",
    ]


def test_retraining_is_refused_unless_enabled(app, demo_root):
    app.run()
    assert not [b for b in app.button if b.key == "retrain_submit"]
    assert any("STADSBEELD_RETRAIN=1" in i.value for i in app.sidebar.info)


def test_retrain_form_enqueues_a_job(app, demo_root, monkeypatch):
    monkeypatch.setenv("STADSBEELD_RETRAIN", "1")
    store = JobStore.for_runs(DataRoot(demo_root).runs)
    before = len(store.jobs())
    app.run()
    app.selectbox(key="retrain_modalities").set_value("aerial only")
    app.selectbox(key="retrain_target").set_value("fys")
    app.number_input(key="retrain_epochs").set_value(3)
    app.number_input(key="retrain_block_size").set_value(300)
    app.button(key="retrain_submit").click().run()
    assert not app.exception
    jobs = store.jobs()
    assert len(jobs) == before + 1
    job = jobs[0]
    assert (job.kind, job.status) == ("fusion", "queued")
    assert (
        job.config["ground"] is None and job.config["target"] == "fys" and job.config["epochs"] == 3
    )
    assert job.config["block_size"] == 300.0
    assert any(f"#{job.id}" in c.value and "queued" in c.value for c in app.sidebar.caption)
    store.cancel(job.id)


def test_a_restarted_dashboard_sees_the_running_job(app, demo_root):
    store = JobStore.for_runs(DataRoot(demo_root).runs)
    job_id = store.enqueue("fusion", {"ground": "gsv", "target": "won", "epochs": 5})
    claimed = store.claim(os.getpid())
    assert claimed is not None and claimed.id == job_id
    store.report(job_id, {"epoch": 2, "epochs": 5, "loss": 0.5, "val_kendall_tau": 0.31})
    app.run()
    assert not app.exception
    progress = app.get("progress")
    assert progress and "epoch 2/5" in progress[0].proto.text
    assert any("val tau 0.310" in c.value for c in app.sidebar.caption)
    # stages before the epochs (a UGE job's pretraining) and UGE's stages of steps
    for reported, shown in [
        (
            {"stage": "pretraining the tiny VLM", "epoch": 300, "epochs": 2000},
            "pretraining the tiny VLM: 300/2000",
        ),
        ({"stage": 2, "epoch": 50, "epochs": 1000}, "stage 2: step 50/1000"),
    ]:
        store.report(job_id, reported)
        app.run()
        assert shown in app.get("progress")[0].proto.text
    store.fail(job_id, "test over")


def test_missing_data_root_explains_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("STADSBEELD_DATA", str(tmp_path / "nothing"))
    app = AppTest.from_file(APP, default_timeout=30).run()
    assert not app.exception
    assert "make demo" in app.error[0].value


def test_pages_never_import_torch(demo_root):
    # A fresh interpreter: the test process itself has imported torch to train the runs.
    script = (
        f"from streamlit.testing.v1 import AppTest; app = AppTest.from_file({APP!r}, default_timeout=120)\n"
        "app.run()\n"
        f"for page in {PAGES!r}: app.switch_page(page).run(); assert not app.exception, page\n"
        "import sys; print('torch' in sys.modules)"
    )
    env = {**os.environ, "STADSBEELD_DATA": str(demo_root), "STADSBEELD_START_WORKER": "0"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_the_map_opens_on_the_data_roots_extent(app, demo_root):
    from dashboard.maps import fit_view

    city = fit_view((4.73, 52.28, 5.07, 52.43))
    district = fit_view((4.88, 52.35, 4.91, 52.36))
    assert 10 < city.zoom < 12 < district.zoom
    assert (city.latitude, city.longitude) == pytest.approx((52.355, 4.90))
    app.run()
    view = deck_spec(app)["initialViewState"]
    cells = layer(deck_spec(app), "cells")["data"]
    lons, lats = zip(*(r["p"] for r in cells), strict=True)
    assert min(lons) < view["longitude"] < max(lons) and min(lats) < view["latitude"] < max(lats)
    assert view["zoom"] > 13  # a 1.5 km extent, not the whole city


def test_retrain_form_trains_on_any_sources_of_the_catalog(app, demo_root, monkeypatch):
    monkeypatch.setenv("STADSBEELD_RETRAIN", "1")
    store = JobStore.for_runs(DataRoot(demo_root).runs)
    app.run()
    ground = app.multiselect(key="retrain_ground")
    assert {"Street View", "Flickr", "Amsterdam panoramas", "Mapillary"} <= set(ground.options)
    ground.set_value(["amsterdam_panorama", "mapillary"])
    app.button(key="retrain_submit").click().run()
    assert not app.exception
    job = store.jobs()[0]
    assert (job.kind, job.config["ground"]) == ("fusion", "amsterdam_panorama,mapillary")
    assert any(
        f"#{job.id} fusion aerial+amsterdam_panorama+mapillary" in c.value
        for c in app.sidebar.caption
    )
    store.cancel(job.id)


def test_retrain_form_enqueues_a_contrastive_job(app, demo_root, monkeypatch):
    monkeypatch.setenv("STADSBEELD_RETRAIN", "1")
    store = JobStore.for_runs(DataRoot(demo_root).runs)
    app.run()
    app.selectbox(key="retrain_kind").set_value("contrastive").run()
    app.selectbox(key="retrain_objective").set_value("spatial")
    app.number_input(key="retrain_steps").set_value(5)
    app.button(key="retrain_contrastive_submit").click().run()
    assert not app.exception
    job = store.jobs()[0]
    assert (job.kind, job.status) == ("contrastive", "queued")
    assert job.config == {"objective": "spatial", "epochs": 8, "steps_per_epoch": 5, "seed": 0}
    assert any(f"#{job.id} contrastive spatial" in c.value for c in app.sidebar.caption)
    store.cancel(job.id)


def test_retrain_form_enqueues_a_uge_job(app, demo_root, monkeypatch):
    from core.configs import UGEConfig

    monkeypatch.setenv("STADSBEELD_RETRAIN", "1")
    store = JobStore.for_runs(DataRoot(demo_root).runs)
    app.run()
    app.selectbox(key="retrain_kind").set_value("uge").run()
    app.number_input(key="retrain_stage1").set_value(20)
    app.button(key="retrain_uge_submit").click().run()
    assert not app.exception
    job = store.jobs()[0]
    assert (job.kind, job.status) == ("uge", "queued")
    assert job.config == {"stage1_steps": 20, "stage2_steps": 1000, "seed": 0}
    UGEConfig.from_dict(job.config)  # what the worker will build
    assert any(f"#{job.id} uge, 20 + 1000 steps" in c.value for c in app.sidebar.caption)
    store.cancel(job.id)


def test_retrain_form_enqueues_a_predict_job(app, demo_root, monkeypatch):
    from core.configs import PredictConfig
    from core.runs import list_runs

    monkeypatch.setenv("STADSBEELD_RETRAIN", "1")
    store = JobStore.for_runs(DataRoot(demo_root).runs)
    runs = list_runs(DataRoot(demo_root).runs, kind="fusion")
    # preselected: the newest run's configuration, up to three of its runs (newest first)
    newest = runs.loc[runs["config.label"] == runs["config.label"].iloc[0], "run_id"].head(3)
    app.run()
    app.selectbox(key="retrain_kind").set_value("predict").run()
    assert app.selectbox(key="retrain_predict_year").options == [str(y) for y in range(2016, 2025)]
    app.selectbox(key="retrain_predict_year").set_value(2024)
    app.button(key="retrain_predict_submit").click().run()
    assert not app.exception
    job = store.jobs()[0]
    assert (job.kind, job.status) == ("predict", "queued")
    assert job.config == {"run": newest.tolist(), "year": 2024, "window_years": 1}
    PredictConfig.from_dict(job.config)  # what the worker will run
    described = f"#{job.id} predict 2024 with {len(newest)} run(s)"
    assert any(described in c.value for c in app.sidebar.caption)
    store.cancel(job.id)


def test_browsing_polls_the_queue_only_while_a_job_is_queued_or_running(tmp_path, tiny_demo):
    from dashboard import retrain

    root = tmp_path / "city"
    root.mkdir()
    (root / "grid.parquet").symlink_to(tiny_demo / "grid.parquet")
    assert not retrain.jobs_active(str(root))  # no store at all
    store = JobStore.for_runs(DataRoot(root).runs)
    job = store.enqueue("fusion", {"epochs": 1})
    assert retrain.jobs_active(str(root))
    store.cancel(job)
    assert not retrain.jobs_active(str(root))
    (DataRoot(root).runs / "jobs.sqlite").write_bytes(b"not a database")
    assert not retrain.jobs_active(str(root))


def test_a_job_line_names_the_schedule_the_worker_runs(tmp_path):
    """``make demo`` queues its contrastive and UGE runs with empty configs: the sidebar names
    the kinds' default schedules, and a setting the job gives wins."""
    from dashboard import retrain

    store = JobStore.for_runs(tmp_path / "runs")
    lines = [
        retrain.describe(store.get(store.enqueue(kind, config)))
        for kind, config in [
            ("contrastive", {}),
            ("uge", {}),
            ("fusion", {}),
            ("fusion", {"aerial": False, "ground": "gsv,flickr", "epochs": 3}),
        ]
    ]
    assert lines == [
        "#1 contrastive temporal, 8 epochs",
        "#2 uge, 600 + 1000 steps",
        "#3 fusion aerial+gsv → won, 12 epochs",
        "#4 fusion gsv+flickr → won, 3 epochs",
    ]
