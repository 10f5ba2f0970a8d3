"""The demo city by year: a mosaic per imagery year, labels per release, change where truth says.

Built on a small extent around Buiksloterham, a change site that is built up between 2017 and
2021 (``city.CHANGE_SITES``).
"""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio

from core.dataroot import DataRoot
from core.demo import DemoConfig, build_demo, city
from core.demo.aerial import street_areas, write_aerial, write_aerial_years
from core.grid import CELL_SIZE
from core.sources.lbm import read_lbm

EXTENT = "bbox:121200,488800,123000,490200"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("years") / "demo"
    build_demo(out, DemoConfig(extent=EXTENT, flickr_photos=2000, workers=1), show_progress=False)
    return DataRoot(out)


def _pixels(path) -> np.ndarray:
    with rasterio.open(path) as raster:
        return raster.read()


def _cell_change(before: np.ndarray, after: np.ndarray, raster, cells: pd.DataFrame) -> np.ndarray:
    """Mean absolute pixel change within each cell."""
    change = np.abs(after.astype(int) - before.astype(int)).sum(0)
    cols, rows = (~raster.transform) * (cells["x"].to_numpy(), cells["y"].to_numpy())
    rows, cols = rows.astype(int), cols.astype(int)
    half = int(CELL_SIZE / 2 / raster.res[0])
    return np.array(
        [
            change[r - half : r + half, c - half : c + half].mean()
            for r, c in zip(rows, cols, strict=True)
        ]
    )


def test_a_mosaic_per_imagery_year_and_labels_per_release(root):
    assert list(root.aerial_years()) == list(city.IMAGERY_YEARS)
    assert root.aerial_for(city.REFERENCE_YEAR) == root.root / "aerial" / "aerial.tif"
    labels = read_lbm(root.scores, root.lbm_grid)
    assert sorted(labels["jaar"].unique()) == list(city.LABEL_YEARS)
    manifest = json.loads(root.demo_manifest.read_text())
    assert manifest["imagery_years"] == list(city.IMAGERY_YEARS)
    assert [s["name"] for s in manifest["change_sites"]] == [s.name for s in city.CHANGE_SITES]
    truth = pd.read_parquet(root.root / "truth" / "scores.parquet")
    assert sorted(truth["jaar"].unique()) == list(city.IMAGERY_YEARS)  # also the unlabelled ones
    released = labels[labels["jaar"] == 2020].set_index("cell_id")["lbm"]
    true_2020 = truth[truth["jaar"] == 2020].set_index("grid_id")["lbm"]
    np.testing.assert_allclose(released, true_2020.reindex(released.index), atol=1e-4)


def test_the_aerial_changes_where_truth_says_and_nowhere_else(root):
    years = pd.read_parquet(root.root / "truth" / "years.parquet")
    first, last = (years[years["year"] == y].set_index("cell_id") for y in (2016, 2022))
    moved = (last[["density", "era"]] - first[["density", "era"]]).abs().max(axis=1)
    assert set(first.loc[moved > 0.05, "site"]) == {"Buiksloterham"}
    assert (first["site"] == "Buiksloterham").sum() > 30

    cells = pd.read_parquet(root.root / "truth" / "cells.parquet").set_index("cell_id")
    cells = cells.loc[first.index]
    with rasterio.open(root.aerial_for(2016)) as raster:
        change = _cell_change(
            _pixels(root.aerial_for(2016)), _pixels(root.aerial_for(2022)), raster, cells
        )
    built = (moved > 0.2).to_numpy()
    far = (first["site"] == "").to_numpy() & (moved == 0).to_numpy()
    assert built.sum() > 10 and far.sum() > 10
    assert change[built].min() > 20  # the new buildings show from the air
    # tiles far from any change are copied, not redrawn: the pixels are the same
    assert np.median(change[far]) == 0
    # the site is done by 2021 and starts after 2016: those years' mosaics equal 2022's / 2016's
    np.testing.assert_array_equal(_pixels(root.aerial_for(2021)), _pixels(root.aerial_for(2022)))
    np.testing.assert_array_equal(_pixels(root.aerial_for(2017)), _pixels(root.aerial_for(2016)))


def test_a_redrawn_year_equals_that_year_drawn_whole(root, tmp_path):
    fields = city.build_fields(7)
    edges = gpd.read_file(root.root / "graph" / "streets.gpkg", layer="edges")
    streets = street_areas(edges["geometry"].to_numpy())
    with rasterio.open(root.aerial) as reference:
        bounds = tuple(reference.bounds)
    whole = write_aerial(fields.yearly[2019], bounds, streets, tmp_path / "whole.tif", seed=7)
    np.testing.assert_array_equal(_pixels(whole), _pixels(root.aerial_for(2019)))


def test_mosaics_drawn_by_worker_processes_equal_those_drawn_in_one(root, tmp_path):
    """The build draws with its workers (the root above was built with one): every year's
    mosaic, the reference drawn whole and the others redrawn, comes out the same."""
    fields = city.build_fields(7)
    edges = gpd.read_file(root.root / "graph" / "streets.gpkg", layer="edges")
    streets = street_areas(edges["geometry"].to_numpy())
    with rasterio.open(root.aerial) as reference:
        bounds = tuple(reference.bounds)
    drawn = write_aerial_years(
        fields.yearly, city.REFERENCE_YEAR, bounds, streets, tmp_path, seed=7, workers=2
    )
    for year, path in drawn.items():
        np.testing.assert_array_equal(_pixels(path), _pixels(root.aerial_for(year)))


def test_street_images_see_their_capture_year(root):
    images = pd.read_parquet(root.catalog)
    gsv = images[images["source"] == "gsv"]
    assert set(pd.to_datetime(gsv["captured_at"]).dt.year) <= set(city.IMAGERY_YEARS)
    per_location = gsv.groupby("pano_id").size()
    assert len(per_location) > len(gsv.drop_duplicates(["x", "y"])) * 1.5  # 2-3 years each


def test_the_housing_score_rises_where_the_site_is_built(root):
    truth = pd.read_parquet(root.root / "truth" / "scores.parquet")
    sites = pd.read_parquet(root.root / "truth" / "years.parquet").drop_duplicates("cell_id")
    site = sites.set_index("cell_id")["site"]
    lbm = truth.pivot(index="grid_id", columns="jaar", values="lbm")
    change = (lbm[2022] - lbm[2016]).groupby(site.reindex(lbm.index)).mean()
    assert change["Buiksloterham"] > change[""] + 0.03
