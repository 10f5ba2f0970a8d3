"""A map layer as one standalone HTML file: a folium (Leaflet) map for reports and e-mail.

The file holds everything it needs: Leaflet's script and style sheet (``assets/leaflet``, not a
CDN), the layer's cells or units as GeoJSON coloured as the dashboard colours them, their
tooltips, the legend and a source line naming the files the numbers come from. It opens from
disk in any browser, offline; an optional XYZ base map is the only thing it fetches.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from urllib.parse import urlparse

import folium
import numpy as np
import shapely
from branca.element import Element

from core import ASSETS
from core.layers import CELLS, MapLayer

LEAFLET = ASSETS / "leaflet"
#: Above this many shapes Leaflet draws on one canvas instead of an SVG element per shape.
CANVAS_FROM = 5000
FILL_OPACITY = 0.85
#: Units with too few scored cells are drawn faint, as on the dashboard.
FEW_OPACITY = 0.35
#: Tooltip fields of the table's optional columns, with their labels.
DETAILS = {
    "jaar": "year",
    "split": "split",
    "true": "true",
    "predicted": "predicted",
    "residual": "residual",
    "gsv": "GSV images",
    "flickr": "Flickr photos",
    "gsv_total": "GSV images",
    "flickr_total": "Flickr photos",
}


class _StandaloneMap(folium.Map):
    """A folium map that links no scripts or style sheets from CDNs (Leaflet is inlined)."""

    default_js: list = []
    default_css: list = []


def _hex(colour: np.ndarray) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in colour[:3]))


def _features(layer: MapLayer) -> tuple[dict, list[str], list[str]]:
    """The layer as lon/lat GeoJSON with its colour per feature, and the tooltip's fields and
    labels."""
    table = layer.table.copy()
    if layer.level != CELLS:  # unit boundaries to about 5 m: a tenth of the bytes
        table["geometry"] = table.geometry.simplify(5)
    if layer.level == CELLS:
        fields = ["cell_id", "buurt_naam", "district"]
        labels = ["cell", "buurt", "district"]
    else:
        fields, labels = ["name", "unit", "cells"], [layer.level, "code", "scored cells"]
    fields.append(layer.name)
    labels.append(layer.legend.title.split(",")[0])
    for column, label in DETAILS.items():
        if column in table and column != layer.name:
            fields.append(column)
            labels.append(label)
    numeric = table[fields].select_dtypes("number").columns
    table[numeric] = table[numeric].round(3)
    table["fill"] = [_hex(c) for c in layer.colours]
    faint = table["few"].to_numpy(bool) if "few" in table else np.zeros(len(table), bool)
    table["opacity"] = np.where(faint, FEW_OPACITY, FILL_OPACITY)
    table = table[[*fields, "fill", "opacity", "geometry"]].to_crs(4326)
    table["geometry"] = shapely.set_precision(table.geometry.values, 1e-6)
    return json.loads(table.to_json(na="null", drop_id=True)), fields, labels


def _overlay(element_id: str, style: str, content: str) -> Element:
    return Element(
        f'<div id="{element_id}" style="position:fixed;z-index:1000;background:rgba(255,255,255,'
        f"0.92);padding:6px 10px;border-radius:4px;box-shadow:0 1px 4px rgba(0,0,0,0.3);"
        f'font:13px sans-serif;{style}">{content}</div>'
    )


def html_map(layer: MapLayer, basemap: str | None = None, attribution: str | None = None) -> str:
    """The layer as a standalone HTML page (see the module docstring).

    Args:
        layer: the layer (:func:`core.layers.map_layer`).
        basemap: an XYZ tile URL template (``https://.../{z}/{x}/{y}.png``) drawn below the
            layer; None for none, which keeps the file working offline.
        attribution: the base map's attribution as its provider requires (default: its host).

    Raises:
        ValueError: for a base map that is not an XYZ URL template.
    """
    if basemap is not None and not all(key in basemap for key in ("{z}", "{x}", "{y}")):
        raise ValueError(
            f"base map {basemap!r}: expected an XYZ URL template with {{z}}/{{x}}/{{y}}"
        )
    geojson, fields, labels = _features(layer)
    west, south, east, north = layer.table.to_crs(4326).total_bounds
    shown = _StandaloneMap(
        location=[(south + north) / 2, (west + east) / 2],
        tiles=None,
        prefer_canvas=len(layer.table) > CANVAS_FROM,
        control_scale=True,
    )
    root = shown.get_root()
    leaflet_js = (LEAFLET / "leaflet.js").read_text(encoding="utf-8")
    leaflet_css = (LEAFLET / "leaflet.css").read_text(encoding="utf-8")
    root.header.add_child(Element(f"<style>{leaflet_css}</style>"), name="leaflet_css")
    root.header.add_child(Element(f"<script>{leaflet_js}</script>"), name="leaflet")
    root.title = layer.title
    if basemap is not None:
        folium.TileLayer(
            tiles=basemap,
            attr=attribution or f"base map: {urlparse(basemap).netloc}",
            name="base map",
        ).add_to(shown)
    folium.GeoJson(
        geojson,
        name=layer.title,
        style_function=lambda feature: {
            "fillColor": feature["properties"]["fill"],
            "fillOpacity": feature["properties"]["opacity"],
            "stroke": False,
        },
        tooltip=folium.GeoJsonTooltip(fields=fields, aliases=labels, sticky=True),
    ).add_to(shown)
    shown.fit_bounds([[south, west], [north, east]])
    note = ""
    if layer.level != CELLS:
        note = "<br/>Faint units have fewer than 10 scored cells, too few to trust."
    root.html.add_child(_overlay("legend", "bottom:28px;right:10px", layer.legend.html() + note))
    sources = " · ".join(html.escape(s) for s in layer.sources)
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    root.html.add_child(
        _overlay(
            "sources",
            "bottom:56px;left:10px;max-width:45%;font-size:11px",  # above the scale bar
            f"Source: {sources}<br/>Exported by stadsbeeld on {made}",
        )
    )
    root.html.add_child(
        _overlay("title", "top:10px;left:60px;font-weight:bold", html.escape(layer.title))
    )
    return root.render()
