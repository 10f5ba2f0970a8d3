"""The demo city's panorama-style and Mapillary-style sources: coverage, years and quality."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from core.demo import MANIFEST, city, street
from core.sources.catalog import read_catalog


@pytest.fixture(scope="module")
def district():
    """Street-level samples of a whole district (Zuid: dense and residential), unrendered."""
    fields = city.build_fields(7)
    ids = fields.cells.index.to_numpy()[(fields.cells["district"] == "Zuid").to_numpy()]
    graph = street.build_street_graph(fields, ids, 7)
    return fields, graph, ids


@pytest.fixture(scope="module")
def catalog(tiny_demo) -> pd.DataFrame:
    return read_catalog(tiny_demo / "street" / "catalog.parquet").images


def test_the_demo_writes_both_sources_with_heading_licence_and_counts(tiny_demo, catalog):
    manifest = json.loads((tiny_demo / MANIFEST).read_text())
    counts = catalog["source"].value_counts()
    for source in ("amsterdam_panorama", "mapillary"):
        mine = catalog[catalog["source"] == source]
        assert len(mine) == manifest["images"][source] > 50
        assert mine["heading"].notna().all() and mine["captured_at"].notna().all()
    assert counts["amsterdam_panorama"] > counts["mapillary"]
    licences = catalog.groupby("source")["license"].unique()
    assert list(licences["mapillary"]) == ["CC BY-SA 4.0 (synthetic)"]
    assert list(licences["amsterdam_panorama"]) == ["Gemeente Amsterdam open data (synthetic)"]
    stored = pd.read_parquet(tiny_demo / "street" / "catalog.parquet")
    sequences = stored.loc[stored["source"] == "mapillary", "sequence"]
    assert sequences.notna().all() and sequences.nunique() <= 5  # a few routes


def test_samplers_are_deterministic(district):
    fields, graph, ids = district
    for sample in (street.sample_panorama, street.sample_mapillary):
        pd.testing.assert_frame_equal(
            sample(fields, graph, ids, 7), sample(fields, graph, ids, 7), check_like=False
        )
        assert not sample(fields, graph, ids, 8)["x"].equals(sample(fields, graph, ids, 7)["x"])


def test_panoramas_are_yearly_and_denser_on_main_streets(district):
    fields, graph, ids = district
    views = street.sample_panorama(fields, graph, ids, 7)
    years = views.groupby("location")["year"].agg(["nunique", "size"])
    assert (years["nunique"] == years["size"]).all() and (years["nunique"] >= 2).all()
    assert set(views["year"]) == set(city.IMAGERY_YEARS)
    # a location's captures scatter by about a metre: the same place in every year
    spread = views.groupby("location")[["x", "y"]].std().max(axis=1)
    assert spread.median() < 2.0
    main = street.main_streets(graph)
    km = graph.edges["length"].to_numpy() / 1000
    locations = views.drop_duplicates("location")["main_street"]
    per_km_main = locations.sum() / km[main].sum()
    per_km_side = (~locations).sum() / km[~main].sum()
    assert per_km_main > 3 * per_km_side > 0


def test_mapillary_is_patchy_recent_and_lower_quality(district):
    fields, graph, ids = district
    panorama = street.sample_panorama(fields, graph, ids, 7)
    mapillary = street.sample_mapillary(fields, graph, ids, 7)
    assert mapillary["cell_id"].nunique() < 0.6 * panorama["cell_id"].nunique()
    assert mapillary["sequence"].nunique() == max(
        street.MAPILLARY_MIN_ROUTES, round(len(ids) / street.MAPILLARY_CELLS_PER_ROUTE)
    )
    assert (mapillary.groupby("sequence")["year"].nunique() == 1).all()  # one session each
    assert (mapillary["year"] >= 2021).mean() > 0.7
    assert mapillary["year"].median() > panorama["year"].median()
    assert mapillary["blur"].mean() > 0.4 > 0.1 > panorama["blur"].mean()
    assert mapillary["daylight"].mean() < panorama["daylight"].mean() - 0.2


def test_rendered_mapillary_images_are_darker_and_less_sharp(catalog):
    def measure(source: str) -> tuple[float, float]:
        paths = catalog.loc[catalog["source"] == source, "path"].iloc[:80]
        pixels = [np.asarray(Image.open(p).convert("L"), np.float32) for p in paths]
        brightness = float(np.mean([p.mean() for p in pixels]))
        sharpness = float(np.median([ndimage.laplace(p).var() for p in pixels]))
        return brightness, sharpness

    panorama, mapillary = measure("amsterdam_panorama"), measure("mapillary")
    assert mapillary[0] < 0.85 * panorama[0]
    assert mapillary[1] < panorama[1]
