"""``predict``: fusion runs applied to every cell of a data root, with ensemble uncertainty."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
from scipy.stats import norm
from streamlit.testing.v1 import AppTest

from core.configs import FusionConfig, PredictConfig
from core.dataroot import DataRoot
from core.datasets import street_images
from core.demo import DemoConfig, build_demo
from core.grid import read_grid
from core.runs import RunWriter, list_runs, load_run, new_run_id
from tests.test_dashboard import APP, PAGES
from train.cli import build_parser, main, normalise
from train.fusion import predict_run, train_fusion
from train.predict import predict, spread

QUICK = {"epochs": 2, "batch_size": 64, "block_size": 300.0, "aerial_px": 32}
#: Another extent than the tiny city's: the cells east of it.
OTHER_EXTENT = "bbox:122500,485000,123500,486000"


def quiet(_: str) -> None:
    """Swallows progress lines."""


@pytest.fixture(scope="module")
def city(tmp_path_factory, tiny_demo) -> Path:
    """A copy of the tiny demo city without runs (predictions here stay out of other tests)."""
    root = tmp_path_factory.mktemp("predict") / "city"
    shutil.copytree(tiny_demo, root, ignore=shutil.ignore_patterns("runs"))
    return root


@pytest.fixture(scope="module")
def seeds(city) -> list[Path]:
    """Two aerial+GSV runs of different seeds on the same split: members that disagree."""
    return [
        DataRoot(city).runs
        / train_fusion(FusionConfig(data=str(city), seed=s, split_seed=0, **QUICK), log=quiet)
        for s in (0, 1)
    ]


def predicted(root: Path, runs: list[Path], **options) -> tuple[object, object]:
    """Predict with ``runs`` and return the prediction run and its predictions."""
    run_id = predict(PredictConfig(run=[str(r) for r in runs], data=str(root), **options), quiet)
    run = load_run(DataRoot(root).runs / run_id)
    return run, run.predictions()


@pytest.fixture(scope="module")
def ensemble(city, seeds):
    """The two seeds' prediction of every cell, with every street image (as in training)."""
    return predicted(city, seeds, window_years=100)


def test_every_grid_cell_gets_the_members_mean_and_spread(city, seeds, ensemble):
    run, frame = ensemble
    grid = read_grid(DataRoot(city).grid)
    assert len(frame) == len(grid) and set(frame["cell_id"]) == set(grid["cell_id"])
    assert np.isfinite(frame["predicted"]).all() and (frame["year"] == 2022).all()
    # Independently: each run re-predicts its own labelled cells from its saved weights.
    again = [predict_run(path).set_index("cell_id")["predicted"] for path in seeds]
    labelled = frame.set_index("cell_id").loc[again[0].index]
    scores = np.stack([a.to_numpy() for a in again])
    for i in range(2):
        np.testing.assert_allclose(labelled[f"member_{i}"], scores[i], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(labelled["predicted"], scores.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        labelled["uncertainty"], np.std(scores, axis=0, ddof=1), rtol=1e-4, atol=1e-6
    )
    assert (labelled["uncertainty"] > 0).all()  # two seeds disagree everywhere
    unlabelled = frame[~frame["cell_id"].isin(again[0].index)]
    assert len(unlabelled) and (unlabelled["split"] == "none").all()
    assert unlabelled["true"].isna().all()
    gsv = street_images(DataRoot(city), "gsv", grid["cell_id"].to_numpy())
    assert frame["gsv_images"].sum() == len(gsv) and (frame["flickr_images"] == 0).all()
    assert [m["run_id"] for m in run.config["members"]] == [p.name for p in seeds]
    assert run.config["uncertainty"].startswith("standard deviation (ddof 1) of 2")


def test_a_prediction_counts_the_images_of_each_source_it_pools(city):
    sources = ("amsterdam_panorama", "mapillary")
    run = DataRoot(city).runs / train_fusion(
        FusionConfig(data=str(city), ground=",".join(sources), **QUICK), log=quiet
    )
    prediction, frame = predicted(city, [run], window_years=100)
    grid = read_grid(DataRoot(city).grid)["cell_id"].to_numpy()
    for source in sources:
        images = street_images(DataRoot(city), source, grid)
        assert frame[f"{source}_images"].sum() == len(images) > 0
    assert (frame["gsv_images"] == 0).all() and (frame["flickr_images"] == 0).all()
    covered = (frame["amsterdam_panorama_images"] + frame["mapillary_images"]) > 0
    assert prediction.metrics["cells_with_ground_images"] == int(covered.sum())
    assert prediction.config["label"].startswith("aerial+amsterdam_panorama+mapillary x1")


def test_calibration_is_the_share_of_test_scores_inside_the_gaussian_intervals(ensemble):
    run, frame = ensemble
    test = frame[frame["split"] == "test"]
    assert run.metrics["calibration_cells"] == len(test) > 0
    error = np.abs(test["true"] - test["predicted"])
    for level in (50, 90):
        width = norm.ppf(0.5 + level / 200) * test["uncertainty"]
        assert run.metrics[f"coverage_{level}"] == pytest.approx((error <= width).mean())


def test_identical_members_have_zero_uncertainty_and_one_member_none(city, seeds):
    twin = DataRoot(city).runs / new_run_id("fusion")
    shutil.copytree(seeds[0], twin)
    _, frame = predicted(city, [seeds[0], twin])
    assert (frame["uncertainty"] == 0).all()
    run, alone = predicted(city, [seeds[0]])
    assert alone["uncertainty"].isna().all()
    assert run.metrics["coverage_50"] is None and run.config["uncertainty"].startswith("none")
    np.testing.assert_array_equal(alone["predicted"], frame["predicted"])


def test_the_spread_grows_with_the_members_disagreement():
    rng = np.random.default_rng(0)
    base = rng.normal(4.0, 0.2, 50)
    widths = [spread(np.stack([base, base + d, base - d])) for d in (0.0, 0.01, 0.05)]
    np.testing.assert_allclose(widths[0], 0.0, atol=1e-12)  # identical members
    np.testing.assert_allclose(widths[1], 0.01)  # the sample std of (x, x + d, x - d) is d
    assert (widths[2] > widths[1]).all()
    assert np.isnan(spread(base[None])).all()  # one member: no spread


def test_a_model_that_predicts_a_constant_predicts_it_everywhere(city, seeds):
    source = load_run(seeds[0])
    state = {k: np.array(v) for k, v in source.state_dict().items()}
    state["out.weight"] = np.zeros_like(state["out.weight"])
    state["out.bias"] = np.full_like(state["out.bias"], 0.5)
    with RunWriter(DataRoot(city).runs, "fusion", source.config) as constant:
        constant.write_metrics(source.metrics)
        constant.write_predictions(source.predictions())
        constant.save_model(state)
    _, frame = predicted(city, [constant.path])
    expected = 0.5 * source.config["target_std"] + source.config["target_mean"]
    assert frame["predicted"].nunique() == 1
    assert frame["predicted"].iloc[0] == pytest.approx(expected)


def test_predicting_another_root_of_another_extent(tmp_path_factory, city, seeds, capsys):
    other = tmp_path_factory.mktemp("other") / "east"
    build_demo(other, DemoConfig(seed=7, extent=OTHER_EXTENT, flickr_photos=2000, workers=1), False)
    assert main(["predict", "--run", ",".join(map(str, seeds)), "--data", str(other)]) == 0
    found = list_runs(DataRoot(other).runs, kind="prediction")
    assert len(found) == 1
    run = load_run(found["path"].iloc[0])
    frame = run.predictions()
    grid = read_grid(DataRoot(other).grid)
    assert len(frame) == len(grid) and set(frame["cell_id"]) == set(grid["cell_id"])
    assert not set(grid["cell_id"]) & set(read_grid(DataRoot(city).grid)["cell_id"])
    assert (frame["split"] == "none").all() and (frame["uncertainty"] > 0).all()
    assert frame["gsv_images"].sum() > 0
    # calibration stays on the training root's test cells
    assert run.metrics["calibration_cells"] > 0 and 0 <= run.metrics["coverage_90"] <= 1
    assert run.config["train_data"] == str(city) and run.config["data"] == str(other)
    capsys.readouterr()
    assert main(["runs", "--data", str(other)]) == 0
    assert run.run_id in capsys.readouterr().out


def test_a_year_without_aerial_imagery_is_a_clear_error_before_anything(city, seeds, capsys):
    before = sorted(os.listdir(DataRoot(city).runs))
    argv = ["predict", "--run", str(seeds[0]), "--data", str(city), "--year", "2030"]
    assert main(argv) == 2
    error = capsys.readouterr().err
    years = ", ".join(str(y) for y in range(2016, 2025))
    assert f"no aerial imagery of 2030; the years with a mosaic are [{years}]" in error
    assert sorted(os.listdir(DataRoot(city).runs)) == before


def test_a_year_without_street_images_is_a_clear_error_before_anything(tmp_path, city, seeds):
    later = tmp_path / "later"
    shutil.copytree(city, later, ignore=shutil.ignore_patterns("runs", "cache", "20*.tif"))
    (later / "aerial" / "aerial.tif").rename(later / "aerial" / "2030.tif")
    assert DataRoot(later).aerial_years() == {2030: later / "aerial" / "2030.tif"}
    with pytest.raises(ValueError, match=r"no gsv street images of 2030 \(captured 2029..2031\)"):
        predicted(later, seeds, year=2030, window_years=1)
    assert not DataRoot(later).runs.exists()


def test_members_must_share_target_and_inputs(city, seeds):
    aerial = DataRoot(city).runs / train_fusion(
        FusionConfig(data=str(city), ground=None, **QUICK), log=quiet
    )
    with pytest.raises(ValueError, match=r"differ in \['ground'\]: ground 'gsv' vs None"):
        predicted(city, [seeds[0], aerial])
    with pytest.raises(ValueError, match="more than once"):
        predicted(city, [seeds[0], seeds[0]])


def test_the_aerial_year_comes_from_the_manifests(tmp_path, tiny_demo):
    from core.demo import MANIFEST as DEMO
    from core.ingest.manifest import MANIFEST as FETCH

    root = DataRoot(tmp_path)
    assert (root.demo_manifest.name, root.fetch_manifest.name) == (DEMO, FETCH)
    years = DataRoot(tiny_demo).aerial_years()  # aerial.tif is of demo.json's aerial_year
    assert list(years) == list(range(2016, 2025)) and years[2022] == DataRoot(tiny_demo).aerial
    assert years[2016] == tiny_demo / "aerial" / "2016.tif"
    (tmp_path / "aerial").mkdir()
    (tmp_path / "aerial" / "mosaic.tif").write_bytes(b"")
    assert root.aerial_years() == {}  # nothing records its year
    with pytest.raises(FileNotFoundError, match="no mosaic has a known year"):
        root.aerial_for(2022)
    root.fetch_manifest.write_text(
        json.dumps({"steps": {"aerial": {"status": "done", "params": {"year": 2022}}}})
    )
    assert root.aerial_for(2022) == tmp_path / "aerial" / "mosaic.tif"
    (tmp_path / "aerial" / "2023.tif").write_bytes(b"")
    assert list(root.aerial_years()) == [2022, 2023]


def test_a_predictions_config_repeats_it(ensemble):
    run, _ = ensemble
    parser = build_parser("predict")
    argv = normalise(parser, "predict", ["--config", str(run.path / "config.yaml")])
    options = parser.parse_args(argv).as_dict()
    assert options["run"] == run.config["run"] and options["year"] == 2022
    assert options["window_years"] == 100


@pytest.mark.parametrize("page", PAGES)
def test_the_dashboard_pages_render_with_a_prediction_folder(city, ensemble, page, monkeypatch):
    monkeypatch.setenv("STADSBEELD_DATA", str(city))
    monkeypatch.setenv("STADSBEELD_START_WORKER", "0")
    monkeypatch.delenv("STADSBEELD_RETRAIN", raising=False)
    st.cache_data.clear()
    st.cache_resource.clear()
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    app.switch_page(page).run()
    assert not app.exception, app.exception
    if page == "views/runs.py":
        listed = app.dataframe[0].value["run_id"].tolist()
        assert ensemble[0].run_id in listed


def test_the_monitor_page_shows_the_change_since_the_last_release(
    city, seeds, ensemble, monkeypatch
):
    """Predict 2024 with the ensemble that predicted 2022: the Monitor page pairs the two and
    shows core.monitor's change, per cell on the map and in its numbers."""
    from core.monitor import change

    before, _ = ensemble
    after, _ = predicted(city, seeds, year=2024, window_years=100)
    expected = change(before, after).set_index("cell_id")
    monkeypatch.setenv("STADSBEELD_DATA", str(city))
    monkeypatch.setenv("STADSBEELD_START_WORKER", "0")
    st.cache_data.clear()
    st.cache_resource.clear()
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    app.switch_page("views/monitor.py").run()
    assert not app.exception, app.exception
    assert after.run_id in app.selectbox(key="monitor_pair").options[0]
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Mean change 2022→2024"] == f"{expected['change'].mean():+.4f}"
    assert metrics["Cells predicted"] == f"{len(expected):,}"
    app.radio(key="monitor_layer").set_value("change").run()
    cells = next(
        layer
        for layer in json.loads(app.get("deck_gl_json_chart")[0].proto.json)["layers"]
        if layer.get("id") == "cells"
    )["data"]
    assert len(cells) == len(expected)
    for record in cells[:20]:
        assert record["v"] == pytest.approx(expected.loc[record["i"], "change"], abs=1e-3)
    shown = app.dataframe[-1].value  # the cells to look at
    look = expected[
        (expected["change"].abs() >= float(app.number_input(key="monitor_threshold").value))
        & (expected["change"].abs() >= 2 * expected["change_uncertainty"])
    ]
    assert sorted(shown["cell_id"]) == sorted(look.index)
    source = next(c.value for c in app.main.caption if c.value.startswith("Source:"))
    assert str(after.path) in source and str(before.path) in source
