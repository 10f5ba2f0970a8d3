"""Run predictions as GIS files (GeoPackage, GeoParquet) and CSV, for QGIS and spreadsheets."""

from __future__ import annotations

import tempfile
from pathlib import Path

import geopandas as gpd
import pandas as pd

from core.grid import RD_NEW, cell_polygons

FORMATS = {
    "gpkg": "application/geopackage+sqlite3",
    "parquet": "application/vnd.apache.parquet",
    "csv": "text/csv",
}


def prediction_layer(
    predictions: pd.DataFrame, cells: pd.DataFrame | None = None
) -> gpd.GeoDataFrame:
    """Predictions as 100 m squares in EPSG:28992, with buurt and district when ``cells`` has them.

    Args:
        predictions: a run's ``predictions.parquet`` (``cell_id``, ``split``, ``true``, ...).
        cells: the grid's attribute table (``cell_id``, ``buurt_naam``, ``district``, ...).
    """
    table = predictions.copy()
    if "residual" not in table:
        table["residual"] = table["predicted"] - table["true"]
    if cells is not None:
        extra = [
            c for c in ("buurt_code", "buurt_naam", "district") if c in cells and c not in table
        ]
        table = table.merge(cells[["cell_id", *extra]], on="cell_id", how="left")
    return gpd.GeoDataFrame(table, geometry=cell_polygons(table["cell_id"].to_numpy()), crs=RD_NEW)


def export_bytes(layer: gpd.GeoDataFrame, fmt: str, layer_name: str = "predictions") -> bytes:
    """The layer encoded as ``gpkg``, ``parquet`` (GeoParquet) or ``csv`` (geometry as a ``wkt`` column).

    Raises:
        ValueError: for an unknown format.
    """
    if fmt == "csv":
        table = pd.DataFrame(layer.drop(columns=layer.geometry.name))
        return table.assign(wkt=layer.geometry.to_wkt()).to_csv(index=False).encode()
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {sorted(FORMATS)}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{layer_name}.{fmt}"
        if fmt == "gpkg":
            layer.to_file(path, layer=layer_name, driver="GPKG")
        else:
            layer.to_parquet(path, index=False)
        return path.read_bytes()
