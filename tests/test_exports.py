"""Predictions as GeoPackage, GeoParquet and CSV files that GIS tools read back."""

from __future__ import annotations

import io

import geopandas as gpd
import pandas as pd
import pytest

from core.exports import export_bytes, prediction_layer
from core.grid import RD_NEW, cell_id


@pytest.fixture
def layer():
    ids = [int(cell_id(121050, 487050)), int(cell_id(121150, 487050))]
    predictions = pd.DataFrame(
        {"cell_id": ids, "split": ["test", "train"], "true": [4.0, 4.2], "predicted": [4.1, 4.0]}
    )
    cells = pd.DataFrame({"cell_id": ids, "buurt_naam": ["A", "B"], "district": ["Zuid", "Zuid"]})
    return prediction_layer(predictions, cells)


def test_layer_holds_squares_residuals_and_places(layer):
    assert layer.crs == RD_NEW
    assert layer.geometry.area.tolist() == [10_000.0, 10_000.0]
    assert layer.geometry.iloc[0].bounds == (121000.0, 487000.0, 121100.0, 487100.0)
    assert layer["residual"].round(6).tolist() == [0.1, -0.2]
    assert layer["buurt_naam"].tolist() == ["A", "B"]


@pytest.mark.parametrize("fmt", ["gpkg", "parquet"])
def test_gis_files_read_back(layer, tmp_path, fmt):
    path = tmp_path / f"out.{fmt}"
    path.write_bytes(export_bytes(layer, fmt))
    back = gpd.read_file(path) if fmt == "gpkg" else gpd.read_parquet(path)
    assert back.crs.to_epsg() == 28992
    assert back["cell_id"].tolist() == layer["cell_id"].tolist()
    assert back.geometry.geom_equals_exact(layer.geometry.reset_index(drop=True), 1e-6).all()


def test_csv_has_wkt_geometry(layer):
    back = pd.read_csv(io.BytesIO(export_bytes(layer, "csv")))
    assert back["wkt"].str.startswith("POLYGON").all()
    assert "geometry" not in back


def test_unknown_format_is_refused(layer):
    with pytest.raises(ValueError, match="unknown export format 'shp'"):
        export_bytes(layer, "shp")
