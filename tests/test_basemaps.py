"""Base maps (core.basemaps): presets, URL templates, the reachability probe against a loopback
tile server, the dashboard's setting and its deck, and the cell panel's folium map."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from core import basemaps
from core.basemaps import Basemap, reachable, resolve
from core.webmap import cell_map
from dashboard import data, maps

TEMPLATE = "http://127.0.0.1:1/tiles/{z}/{x}/{y}.png"


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (256, 256), (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("name", "host", "credit"),
    [
        ("pdok-grey", "service.pdok.nl/brt/achtergrondkaart", "Kadaster"),
        ("pdok-colour", "service.pdok.nl/brt/achtergrondkaart", "Kadaster"),
        ("pdok-aerial", "service.pdok.nl/hwh/luchtfotorgb", "Beeldmateriaal Nederland"),
        ("osm", "tile.openstreetmap.org", "OpenStreetMap</a> contributors"),
    ],
)
def test_presets_name_their_tiles_and_attribution(name, host, credit):
    chosen = resolve(name)
    assert chosen.tiles and host in chosen.url and credit in chosen.attribution
    assert all(key in chosen.url for key in ("{z}", "{x}", "{y}"))
    assert "{variant}" not in chosen.url


def test_pdok_grey_is_the_grey_theme():
    assert "/grijs/EPSG:3857/" in resolve("pdok-grey").url
    assert "/standaard/EPSG:3857/" in resolve("PDOK-Colour").url


def test_a_url_template_gets_its_attribution_or_its_host():
    assert resolve(TEMPLATE, "Test &copy; tiles").attribution == "Test &copy; tiles"
    assert resolve(TEMPLATE).attribution == "base map: 127.0.0.1:1"
    assert resolve(TEMPLATE, "A &copy; <a href='x'>B</a>").attribution_text == "A © B"


@pytest.mark.parametrize(
    "spec", ["pdok-gray", "http://example.org/wms", "ftp://h/{z}/{x}/{y}.png", "{z}/{x}/{y}"]
)
def test_a_bad_spec_names_where_it_is_set_and_the_choices(spec):
    with pytest.raises(ValueError, match=r"\$STADSBEELD_BASEMAP .*expected one of auto, none"):
        resolve(spec, where="$STADSBEELD_BASEMAP")


def test_none_draws_no_tiles():
    assert not resolve("none").tiles and resolve(" none ").name == "none"


def test_auto_takes_pdok_when_the_probe_reaches_it_and_none_with_a_note_otherwise():
    assert resolve("auto", probe=lambda basemap: None).name == basemaps.AUTO_PRESET
    offline = resolve("auto", probe=lambda basemap: "ConnectionError after 1 attempts")
    assert not offline.tiles
    assert offline.note == (
        "https://service.pdok.nl/brt/achtergrondkaart/wmts/v2_0/grijs/EPSG:3857 cannot be "
        "reached (ConnectionError after 1 attempts)"
    )


def test_the_probe_fetches_one_tile_from_a_loopback_tile_server(httpserver):
    tile = "/{z}/{x}/{y}.png".format(**basemaps.PROBE_TILE)
    httpserver.expect_request(tile).respond_with_data(_png(), content_type="image/png")
    httpserver.expect_request("/html/10/525/336.png").respond_with_data(
        "<html>login</html>", content_type="text/html"
    )
    base = httpserver.url_for("/")
    assert reachable(Basemap("custom", base + "{z}/{x}/{y}.png")) is None
    answer = reachable(Basemap("custom", base + "html/{z}/{x}/{y}.png"))
    assert answer.endswith("answered text/html")
    missing = reachable(Basemap("custom", base + "nothing/{z}/{x}/{y}.png"))
    assert "HTTP 500" in missing or "HTTP 404" in missing  # pytest-httpserver's "no handler"


def test_the_probe_reports_a_closed_port():
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    answer = reachable(Basemap("custom", f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.png"))
    assert answer == "ConnectionError after 1 attempts"


def test_the_dashboard_setting_reads_the_variable_before_dashboard_yaml(tmp_path, monkeypatch):
    monkeypatch.delenv(data.BASEMAP_ENV, raising=False)
    monkeypatch.delenv(data.BASEMAP_ATTRIBUTION_ENV, raising=False)
    (tmp_path / "dashboard.yaml").write_text(
        f"basemap: {TEMPLATE}\nbasemap_attribution: Mine\n", encoding="utf-8"
    )
    chosen = data.basemap(tmp_path)
    assert chosen.url == TEMPLATE and chosen.attribution == "Mine"
    monkeypatch.setenv(data.BASEMAP_ENV, "osm")
    assert data.basemap(tmp_path).name == "osm"
    monkeypatch.setenv(data.BASEMAP_ENV, "pdok-gray")
    with pytest.raises(ValueError, match=r"^\$STADSBEELD_BASEMAP 'pdok-gray': expected"):
        data.basemap(tmp_path)
    monkeypatch.delenv(data.BASEMAP_ENV)
    (tmp_path / "dashboard.yaml").write_text("basemap: 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dashboard.yaml: basemap: expected a name"):
        data.basemap(tmp_path)


def test_the_deck_carries_the_tiles_as_a_gl_style_and_drops_the_drawn_water():
    import pydeck as pdk

    view = pdk.ViewState(latitude=52.36, longitude=4.9, zoom=12)
    water = maps.polygon_records([[[[4.9, 52.3], [4.91, 52.3], [4.91, 52.31], [4.9, 52.3]]]])
    context = {"view": view, "water": water}
    records = maps.cell_payload(_cells(), np.array([[1, 2, 3]]), None, None)  # one cell is enough
    offline = json.loads(maps.city_deck(records, context, "score").to_json())
    assert offline["mapStyle"] == [{"version": 8, "sources": {}, "layers": []}]
    assert "water" in [layer["id"] for layer in offline["layers"]]
    tiled = json.loads(
        maps.city_deck(records, {**context, "basemap": resolve(TEMPLATE, "T")}, "s").to_json()
    )
    source = tiled["mapStyle"][0]["sources"]["basemap"]
    assert source["tiles"] == [TEMPLATE] and source["attribution"] == "T"
    assert tiled["mapStyle"][0]["layers"] == [
        {"id": "basemap", "type": "raster", "source": "basemap"}
    ]
    ids = {layer["id"]: layer for layer in tiled["layers"]}
    assert "water" not in ids and ids["cells"]["opacity"] == maps.OVER_TILES_OPACITY


def _cells():
    import pandas as pd

    return pd.DataFrame(
        {"cell_id": [1], "lon": [4.9], "lat": [52.36], "buurt_naam": ["b"], "district": ["d"]}
    )


def test_the_cell_map_overlays_the_aerial_and_points_each_image_along_its_heading():
    cell = (4.90, 52.36, 4.9015, 52.3609)
    aerial_bounds = (4.898, 52.3586, 4.9035, 52.3622)
    thumb = "data:image/jpeg;base64,AAAA"
    images = [
        {"source": "gsv", "lon": 4.9005, "lat": 52.3603, "heading": 90.0,
         "captured_at": "2021-05-04 10:00:00+00:00", "path": "gsv/a.jpg", "thumbnail": thumb},
        {"source": "gsv", "lon": 4.9010, "lat": 52.3605, "heading": 225.0,
         "captured_at": "2019-07-01", "path": "gsv/b.jpg", "thumbnail": thumb},
        {"source": "flickr", "lon": 4.9012, "lat": 52.3601, "heading": float("nan"),
         "captured_at": "2015-03-02", "path": "flickr/c.jpg", "thumbnail": "missing file",
         "license": "CC BY 2.0", "scene": "street", "scene_p": 0.91, "building": True},
    ]  # fmt: skip
    aerial = np.zeros((60, 60, 3), np.uint8)
    page = cell_map(cell, images, aerial, aerial_bounds, resolve(TEMPLATE, "Tiles T")).get_root()
    page = page.render()
    overlay = re.search(
        r"L\.imageOverlay\(\s*\"data:image/png;base64,[^\"]+\",\s*(\[\[.*?\]\])", page
    )
    assert overlay and json.loads(overlay[1]) == [[52.3586, 4.898], [52.3622, 4.9035]]
    assert len(re.findall(r"L\.marker\(", page)) == 3
    assert len(re.findall(r"marker_\w+\.bindPopup\(", page)) == 3
    assert re.findall(r"transform:rotate\((\d+)deg\)", page) == ["90", "225"]
    assert page.count('className": "street-image gsv"') == 2
    assert page.count('className": "street-image flickr"') == 1
    assert page.count(thumb) == 2
    assert "2021-05-04" in page and "heading 90\\u00b0" in page  # JSON in the script
    assert "flickr/c.jpg: missing file" in page
    assert "licence: CC BY 2.0" in page
    assert "scene: street (0.91), building filter: kept" in page
    assert TEMPLATE in page and "Tiles T" in page
    offline = cell_map(cell, images[:1]).get_root().render()
    assert "L.tileLayer" not in offline and "L.imageOverlay" not in offline
