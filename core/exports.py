"""Map layers as files: GeoPackage with its QGIS style, GeoParquet, CSV and a standalone HTML
map; what ``stadsbeeld export`` and the dashboard's downloads write.

The GeoPackage carries the dashboard's colours as the layer's default style in the
``layer_styles`` table, the table QGIS itself writes when a style is saved to a GeoPackage
(``QgsOgrProviderMetadata::saveStyle``: the same columns, created through OGR as an attributes
table registered in ``gpkg_contents``), so QGIS opens the layer already coloured.
"""

from __future__ import annotations

import sqlite3
import tempfile
from contextlib import closing
from os import PathLike
from pathlib import Path

import pandas as pd

from core.io import write_atomic
from core.layers import MapLayer
from core.styles import qml, sld

FORMATS = {
    "gpkg": "application/geopackage+sqlite3",
    "parquet": "application/vnd.apache.parquet",
    "csv": "text/csv",
    "html": "text/html",
}
#: File name endings and the format they mean.
SUFFIXES = {
    ".gpkg": "gpkg",
    ".parquet": "parquet",
    ".geoparquet": "parquet",
    ".csv": "csv",
    ".html": "html",
    ".htm": "html",
}
STYLE_TABLE = "layer_styles"
#: ``layer_styles`` as QGIS creates it in a GeoPackage through OGR (GDAL's GPKG driver spells
#: OFTString width 256 as TEXT(256), the boolean subtype as BOOLEAN and the update time's
#: CURRENT_TIMESTAMP default as the GeoPackage's ISO 8601 strftime).
STYLE_TABLE_SQL = f"""CREATE TABLE "{STYLE_TABLE}" (
    "id" INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    "f_table_catalog" TEXT(256),
    "f_table_schema" TEXT(256),
    "f_table_name" TEXT(256),
    "f_geometry_column" TEXT(256),
    "styleName" TEXT(30),
    "styleQML" TEXT,
    "styleSLD" TEXT,
    "useAsDefault" BOOLEAN,
    "description" TEXT,
    "owner" TEXT(30),
    "ui" TEXT(30),
    "update_time" DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
)"""


def format_of(path: str | PathLike, fmt: str | None = None) -> str:
    """The format to write: ``fmt``, else the one ``path``'s ending names.

    Raises:
        ValueError: for an unknown format or ending.
    """
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown export format {fmt!r}; expected one of {sorted(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"{path}: cannot tell the format from the ending {suffix!r}; use one of "
            f"{', '.join(SUFFIXES)} or name the format"
        )
    return SUFFIXES[suffix]


def add_layer_style(
    path: str | PathLike, table: str, qml_text: str, sld_text: str, title: str
) -> None:
    """Store a style as ``table``'s default in a GeoPackage's ``layer_styles`` (created as QGIS
    creates it when missing; a style of the same name is replaced).

    Raises:
        ValueError: if ``table`` is not a feature table of the GeoPackage.
    """
    with closing(sqlite3.connect(path)) as db, db:
        found = db.execute(
            "SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (table,)
        ).fetchone()
        if found is None:
            raise ValueError(f"{path}: no feature table {table!r} to style")
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (STYLE_TABLE,)
        ).fetchone()
        if not exists:
            db.execute(STYLE_TABLE_SQL)
            db.execute(
                "INSERT INTO gpkg_contents (table_name, data_type, identifier) VALUES (?, ?, ?)",
                (STYLE_TABLE, "attributes", STYLE_TABLE),
            )
        db.execute(f'UPDATE "{STYLE_TABLE}" SET useAsDefault = 0 WHERE f_table_name = ?', (table,))
        db.execute(
            f'DELETE FROM "{STYLE_TABLE}" WHERE f_table_name = ? AND styleName = ?', (table, table)
        )
        db.execute(
            f'INSERT INTO "{STYLE_TABLE}" (f_table_catalog, f_table_schema, f_table_name, '
            "f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, description, owner) "
            "VALUES ('', '', ?, ?, ?, ?, ?, 1, ?, '')",
            (table, found[0], table, qml_text, sld_text, title),
        )


def _write(
    layer: MapLayer, path: Path, fmt: str, basemap: str | None, attribution: str | None
) -> None:
    if fmt == "gpkg":
        layer.table.to_file(path, layer=layer.slug, driver="GPKG")
        classes = layer.classes()
        add_layer_style(
            path,
            layer.slug,
            qml(layer.name, classes),
            sld(layer.slug, layer.name, classes),
            layer.title,
        )
    elif fmt == "parquet":
        layer.table.to_parquet(path, index=False)
    elif fmt == "csv":  # geometry as WKT, which QGIS and spreadsheets read
        table = pd.DataFrame(layer.table.drop(columns=layer.table.geometry.name))
        table.assign(wkt=layer.table.geometry.to_wkt()).to_csv(path, index=False)
    else:
        from core.webmap import html_map  # folium only for the HTML map

        path.write_text(html_map(layer, basemap, attribution), encoding="utf-8")


def write_layer(
    layer: MapLayer,
    path: str | PathLike,
    fmt: str | None = None,
    basemap: str | None = None,
    attribution: str | None = None,
) -> Path:
    """Write a layer atomically as ``fmt`` (default: from ``path``'s ending).

    Args:
        layer: the layer (:func:`core.layers.map_layer`).
        path: the file to write (replaced if it exists).
        fmt: ``gpkg`` (with the QGIS style), ``parquet`` (GeoParquet), ``csv`` (geometry as a
            ``wkt`` column) or ``html`` (a standalone map, :func:`core.webmap.html_map`).
        basemap: for ``html``, an XYZ base map URL template (default: none).
        attribution: for ``html``, the base map's attribution.

    Raises:
        ValueError: for an unknown format.
    """
    fmt = format_of(path, fmt)
    return write_atomic(path, lambda tmp: _write(layer, tmp, fmt, basemap, attribution))


def export_bytes(
    layer: MapLayer, fmt: str, basemap: str | None = None, attribution: str | None = None
) -> bytes:
    """The layer encoded as ``fmt`` (see :func:`write_layer`), for a download button.

    Raises:
        ValueError: for an unknown format.
    """
    fmt = format_of("", fmt)
    with tempfile.TemporaryDirectory() as folder:
        path = write_layer(layer, Path(folder) / f"{layer.slug}.{fmt}", fmt, basemap, attribution)
        return path.read_bytes()
