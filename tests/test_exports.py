"""Map layers as GeoPackage (with the QGIS style table), GeoParquet, CSV and standalone HTML
maps, read back and checked against the label files, a run's predictions and the catalog."""

from __future__ import annotations

import json
import re
import sqlite3
import xml.etree.ElementTree as ET
from contextlib import closing

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest

from core.dataroot import DataRoot
from core.exports import STYLE_TABLE, export_bytes, format_of, write_layer
from core.grid import RD_NEW, cell_id, read_grid
from core.layers import MIN_UNIT_CELLS, map_layer
from core.runs import RunWriter
from core.styles import CLASS_PALETTE, DIVERGING_PALETTE, SCORE_PALETTE, SPLIT_PALETTE
from train.cli import main


def _labels_by_hand(root) -> pd.DataFrame:
    """The label CSV joined to its grid file by grid_id, each square's cell from its centre, and
    the grid's buurt of that cell: read without core's readers."""
    paths = DataRoot(root)
    scores = pd.read_csv(paths.scores)
    squares = pyogrio.read_dataframe(paths.lbm_grid)
    centres = squares.geometry.centroid
    squares["cell_id"] = cell_id(centres.x.to_numpy(), centres.y.to_numpy())
    squares["grid_id"] = squares["grid_id"].astype(str)
    scores["grid_id"] = scores["grid_id"].astype(str)
    grid = pd.read_parquet(paths.grid, columns=["cell_id", "buurt_code", "district"])
    labelled = scores.merge(squares[["grid_id", "cell_id"]], on="grid_id")
    return labelled.merge(grid, on="cell_id")


def _rgb(text: str) -> list[int]:
    return [int(v) for v in text.split(",")[:3]]


def _style(path, table: str) -> pd.Series:
    styles = pyogrio.read_dataframe(path, layer=STYLE_TABLE)
    assert styles["f_table_name"].tolist() == [table]
    return styles.iloc[0]


def test_gpkg_of_buurt_means_has_the_values_and_the_dashboards_style(tiny_demo, tmp_path):
    path = write_layer(map_layer(tiny_demo, "lbm", year=2018, level="buurt"), tmp_path / "b.gpkg")
    assert {"lbm_2018_buurt", STYLE_TABLE} <= {name for name, _ in pyogrio.list_layers(path)}
    back = pyogrio.read_dataframe(path, layer="lbm_2018_buurt").set_index("unit")
    assert back.crs.to_epsg() == 28992

    labels = _labels_by_hand(tiny_demo)
    year = labels[(labels["jaar"] == 2018) & (labels["buurt_code"] != "")]
    expected = year.groupby("buurt_code")["lbm"].agg(["mean", "size"])
    assert sorted(back.index) == sorted(expected.index)
    assert np.allclose(back["lbm"], expected.loc[back.index, "mean"])
    assert (back["cells"] == expected.loc[back.index, "size"]).all()
    assert (back["few"] == (back["cells"] < MIN_UNIT_CELLS)).all()

    style = _style(path, "lbm_2018_buurt")
    assert style["f_geometry_column"] == "geom" and style["useAsDefault"]
    renderer = ET.fromstring(style["styleQML"].split("\n", 1)[1]).find("renderer-v2")
    assert renderer.get("type") == "graduatedSymbol" and renderer.get("attr") == "lbm"
    colours = [_rgb(p.get("v")) for p in renderer.iter("prop") if p.get("k") == "color"]
    assert colours == SCORE_PALETTE.tolist()
    ranges = renderer.find("ranges").findall("range")
    lows = [float(r.get("lower")) for r in ranges]
    highs = [float(r.get("upper")) for r in ranges]
    assert lows[1:] == highs[:-1]  # classes that tile the values' range
    assert lows[0] <= back["lbm"].min() and highs[-1] >= back["lbm"].max()
    assert "#a50026" in style["styleSLD"]  # the first score colour, as SLD


def test_the_style_table_is_the_one_qgis_writes(tiny_demo, tmp_path):
    path = write_layer(map_layer(tiny_demo, "flickr"), tmp_path / "f.gpkg")
    with closing(sqlite3.connect(path)) as db:
        columns = [row[1] for row in db.execute(f"PRAGMA table_info({STYLE_TABLE})")]
        kind = db.execute(
            "SELECT data_type FROM gpkg_contents WHERE table_name = ?", (STYLE_TABLE,)
        ).fetchone()
    assert columns == [
        "id",
        "f_table_catalog",
        "f_table_schema",
        "f_table_name",
        "f_geometry_column",
        "styleName",
        "styleQML",
        "styleSLD",
        "useAsDefault",
        "description",
        "owner",
        "ui",
        "update_time",
    ]
    assert kind == ("attributes",)


def test_class_layer_is_categorized_with_the_class_colours(tiny_demo, tmp_path):
    path = write_layer(map_layer(tiny_demo, "lbm_class"), tmp_path / "c.gpkg")
    back = pyogrio.read_dataframe(path, layer="lbm_class_2022")
    renderer = ET.fromstring(_style(path, "lbm_class_2022")["styleQML"].split("\n", 1)[1])
    renderer = renderer.find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "lbm_class"
    values = [int(c.get("value")) for c in renderer.iter("category")]
    assert values == sorted(back["lbm_class"].unique())
    colours = [_rgb(p.get("v")) for p in renderer.iter("prop") if p.get("k") == "color"]
    assert colours == [CLASS_PALETTE[v] for v in values]


def test_cell_layer_values_match_the_label_file(tiny_demo):
    layer = map_layer(tiny_demo, "fys", year=2016)
    labels = _labels_by_hand(tiny_demo)
    expected = labels[labels["jaar"] == 2016].set_index("cell_id")["fys"]
    table = layer.table.set_index("cell_id")
    assert sorted(table.index) == sorted(expected.index)
    assert np.allclose(table["fys"], expected.loc[table.index])
    assert (table["jaar"] == 2016).all()
    assert table.geometry.area.eq(10_000).all()
    assert layer.colours.shape == (len(table), 3)


@pytest.fixture
def run(tmp_path, tiny_demo):
    ids = read_grid(DataRoot(tiny_demo).grid)["cell_id"].to_numpy()[:40]
    rng = np.random.default_rng(0)
    predictions = pd.DataFrame(
        {
            "cell_id": ids,
            "split": np.array(["train", "val", "test", "test"])[np.arange(40) % 4],
            "true": rng.normal(4.1, 0.2, 40),
            "predicted": rng.normal(4.1, 0.2, 40),
        }
    )
    with RunWriter(tmp_path / "runs", "fusion", {"label": "export"}) as writer:
        writer.write_metrics({"test_r2": 0.5})
        writer.write_predictions(predictions)
    return writer.path, predictions


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_run_residuals_read_back_as_geoparquet_and_csv(tiny_demo, run, tmp_path, fmt):
    folder, predictions = run
    layer = map_layer(tiny_demo, "residual", run=folder, split="test")
    path = write_layer(layer, tmp_path / f"r.{fmt}")
    if fmt == "parquet":
        back = gpd.read_parquet(path)
        assert back.crs == RD_NEW
    else:
        back = pd.read_csv(path)
        assert back["wkt"].str.startswith("POLYGON").all()
    test = predictions[predictions["split"] == "test"].set_index("cell_id")
    back = back.set_index("cell_id")
    assert sorted(back.index) == sorted(test.index)
    assert np.allclose(back["residual"], (test["predicted"] - test["true"]).loc[back.index])
    assert set(back["split"]) == {"test"}
    assert layer.legend.stops[1][0] == DIVERGING_PALETTE[1].tolist()


def test_html_map_is_standalone_with_the_data_legend_and_sources(tiny_demo, run, tmp_path):
    folder, predictions = run
    layer = map_layer(tiny_demo, "split", run=folder)
    page = write_layer(layer, tmp_path / "split.html").read_text(encoding="utf-8")
    assert "Leaflet 1.9.4" in page  # inlined, not linked
    assert not re.search(r"<(script|link)[^>]+(src|href)=", page)
    data = json.loads(re.search(r'"features": (\[.*?\]), "type": "FeatureCollection"', page)[1])
    shown = {f["properties"]["cell_id"]: f["properties"] for f in data}
    assert sorted(shown) == sorted(predictions["cell_id"])
    colours = {k: "#{:02x}{:02x}{:02x}".format(*v) for k, v in SPLIT_PALETTE.items()}
    for row in predictions.itertuples():
        assert shown[row.cell_id]["fill"] == colours[row.split]
    assert 'id="legend"' in page and ">train<" in page and ">test<" in page
    assert str(folder / "predictions.parquet") in page
    assert "L.geoJson" in page and "bindTooltip" in page


def test_html_base_map_is_an_xyz_template(tiny_demo, tmp_path):
    layer = map_layer(tiny_demo, "gsv", level="stadsdeel")
    url = "http://127.0.0.1:1/tiles/{z}/{x}/{y}.png"
    page = export_bytes(layer, "html", basemap=url, attribution="Test tiles").decode()
    assert url in page and "Test tiles" in page
    with pytest.raises(ValueError, match="XYZ URL template"):
        export_bytes(layer, "html", basemap="http://example.org/wms")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "nope"}, "unknown layer 'nope'; the layers are lbm"),
        ({"name": "lbm", "year": 2019}, r"lbm_scores.csv: no labels of year 2019; the years are"),
        ({"name": "residual", "run": "fusion-nope"}, "runs: no run 'fusion-nope'; the runs"),
        ({"name": "residual"}, "layer 'residual' is a run's"),
        ({"name": "lbm", "run": "x"}, "layer 'lbm' is not a run's"),
        ({"name": "gsv", "year": 2020}, "layer 'gsv' has no years"),
        ({"name": "lbm", "level": "gemeente"}, "unknown level 'gemeente'"),
    ],
)
def test_bad_options_are_refused_clearly(tiny_demo, options, message):
    with pytest.raises(ValueError, match=message):
        map_layer(tiny_demo, **options)


def test_a_layer_without_cells_is_refused(tiny_demo, tmp_path):
    with RunWriter(tmp_path / "runs", "fusion", {}) as writer:
        writer.write_metrics({})
        writer.write_predictions(
            pd.DataFrame({"cell_id": [1], "split": ["val"], "true": [4.0], "predicted": [4.1]})
        )
    with pytest.raises(ValueError, match="predictions.parquet: no cell of .*grid.parquet has a"):
        map_layer(tiny_demo, "true", run=writer.path, split="test")


def test_unknown_format_is_refused():
    assert format_of("maps/x.GeoParquet") == "parquet"
    with pytest.raises(ValueError, match="cannot tell the format from the ending '.shp'"):
        format_of("x.shp")
    with pytest.raises(ValueError, match="unknown export format 'shp'"):
        format_of("x.gpkg", "shp")


def test_export_command_writes_the_file_and_reports_bad_options(tiny_demo, tmp_path, capsys):
    out = tmp_path / "wijk.html"
    argv = ["export", "lbm", "--level", "wijk", "--out", str(out), "--data", str(tiny_demo)]
    assert main(argv) == 0
    assert "mean per wijk" in capsys.readouterr().out and out.stat().st_size > 0
    assert main(["export", "lbm", "--year", "1999", "--data", str(tiny_demo)]) == 2
    assert "no labels of year 1999" in capsys.readouterr().err
