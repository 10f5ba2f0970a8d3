"""Amsterdam's buurten, districts, outline and landmarks from the shipped assets."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely

from core.grid import cell_id
from core.sources.boundaries import (
    DISTRICTS,
    assign_buurten,
    districts,
    municipality_outline,
    read_buurten,
    read_landmarks,
)


@pytest.fixture(scope="module")
def buurten() -> gpd.GeoDataFrame:
    return read_buurten()


def test_read_buurten(buurten: gpd.GeoDataFrame) -> None:
    assert len(buurten) == 518
    assert buurten.crs.to_epsg() == 28992
    assert list(buurten.columns) == ["code", "naam", "cbsCode", "district", "geometry"]
    assert set(buurten["district"]) == set(DISTRICTS.values())
    assert buurten["code"].is_unique
    assert shapely.is_valid(buurten.geometry.values).all()
    # RD metres, not degrees: Amsterdam lies around x 110-135 km, y 476-495 km.
    minx, miny, maxx, maxy = buurten.total_bounds
    assert 100_000 < minx < maxx < 140_000 and 470_000 < miny < maxy < 500_000


def test_outline_area_is_plausible(buurten: gpd.GeoDataFrame) -> None:
    # 219 km² is Amsterdam before it absorbed Weesp (~25 km²) in 2022; the 2022 buurten include it.
    assert 235e6 < municipality_outline(buurten).area < 250e6
    before_weesp = buurten[buurten["district"] != "Weesp"]
    assert 205e6 < municipality_outline(before_weesp).area < 230e6
    assert sorted(districts(buurten)["district"]) == sorted(DISTRICTS.values())


def test_assign_buurten_puts_the_dam_in_centrum(buurten: gpd.GeoDataFrame) -> None:
    outside = cell_id(50_000, 400_000)  # Zeeland
    out = assign_buurten(np.array([cell_id(121_400, 487_400), outside]), buurten)
    assert out.loc[0, "district"] == "Centrum"
    assert out.loc[0, "cbs_code"] == f"BU0363{out.loc[0, 'buurt_code']}"
    assert out.loc[1].tolist() == ["", "", "", ""]


def test_landmarks_are_in_rd_and_in_their_districts(buurten: gpd.GeoDataFrame) -> None:
    landmarks = read_landmarks().set_index("name")
    assert landmarks.crs.to_epsg() == 28992
    dam = landmarks.geometry["Dam"]
    assert shapely.distance(dam, shapely.Point(121_400, 487_400)) < 150
    assert shapely.contains(municipality_outline(buurten), landmarks.geometry.values).all()
    where = assign_buurten(cell_id(landmarks.geometry.x, landmarks.geometry.y), buurten)
    district = dict(zip(landmarks.index, where["district"], strict=True))
    assert district["NDSM-werf"] == "Noord"
    assert district["Johan Cruijff ArenA"] == "Zuidoost"
    assert district["Sloterplas"] == "Nieuw-West"
    assert district["Weesp"] == "Weesp"


def test_read_buurten_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope.geojson: neighbourhood file not found"):
        read_buurten(tmp_path / "nope.geojson")
    gpd.GeoDataFrame(
        {"code": ["AA01"], "naam": ["x"]},
        geometry=[shapely.box(4.8, 52.3, 4.9, 52.4)],
        crs="EPSG:4326",
    ).to_file(tmp_path / "partial.geojson")
    with pytest.raises(ValueError, match=r"partial.geojson: missing properties \['cbsCode'\]"):
        read_buurten(tmp_path / "partial.geojson")
