"""A map layer as one standalone HTML file: a folium (Leaflet) map for reports and e-mail.

The file holds everything it needs: Leaflet's script and style sheet (``assets/leaflet``, not a
CDN), the layer's cells or units as GeoJSON coloured as the dashboard colours them, their
tooltips, the legend and a source line naming the files the numbers come from. It opens from
disk in any browser, offline; an optional base map (:mod:`core.basemaps`) is the only thing
it fetches.
"""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime

import folium
import numpy as np
import shapely
from branca.element import Element, MacroElement
from jinja2 import Template

from core import ASSETS
from core.basemaps import Basemap, resolve
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


def _standalone(
    bounds: tuple[float, float, float, float], basemap: Basemap | None, **options: object
) -> folium.Map:
    """A folium map centred on lon/lat ``bounds`` with Leaflet inlined and ``basemap``'s tiles
    (with their attribution) below everything."""
    west, south, east, north = bounds
    shown = _StandaloneMap(
        location=[(south + north) / 2, (west + east) / 2],
        tiles=None,
        control_scale=True,
        **options,
    )
    root = shown.get_root()
    leaflet_js = (LEAFLET / "leaflet.js").read_text(encoding="utf-8")
    leaflet_css = (LEAFLET / "leaflet.css").read_text(encoding="utf-8")
    root.header.add_child(Element(f"<style>{leaflet_css}</style>"), name="leaflet_css")
    root.header.add_child(Element(f"<script>{leaflet_js}</script>"), name="leaflet")
    if basemap is not None and basemap.tiles:
        folium.TileLayer(
            tiles=basemap.url, attr=basemap.attribution, name="base map", max_zoom=basemap.max_zoom
        ).add_to(shown)
    return shown


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
        basemap: the base map drawn below the layer, as :func:`core.basemaps.resolve` reads
            it: a preset (``pdok-grey``, ``osm``, ...), ``auto`` or an XYZ tile URL template
            (``https://.../{z}/{x}/{y}.png``); None or ``none`` keeps the file working offline.
        attribution: a URL template's attribution as its provider requires (default: its
            host); presets carry their own.

    Raises:
        ValueError: for a base map that is none of these.
    """
    tiles = None if basemap is None else resolve(basemap, attribution)
    geojson, fields, labels = _features(layer)
    west, south, east, north = layer.table.to_crs(4326).total_bounds
    shown = _standalone(
        (west, south, east, north), tiles, prefer_canvas=len(layer.table) > CANVAS_FROM
    )
    root = shown.get_root()
    root.title = layer.title
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


#: The cell panel's map: the street images' markers (an arrow along the heading, a dot without
#: one), coloured per source.
SOURCE_COLOURS = {"gsv": "#1f78b4", "flickr": "#e7298a", "other": "#666666"}
_ARROW = (
    '<svg width="22" height="22" viewBox="0 0 22 22" style="transform:rotate({deg:.0f}deg)">'
    '<path d="M11 1 L18 20 L11 15 L4 20 Z" fill="{colour}" stroke="white" stroke-width="1.5"/>'
    "</svg>"
)
_DOT = (
    '<svg width="14" height="14" viewBox="0 0 14 14"><circle cx="7" cy="7" r="5.5" '
    'fill="{colour}" stroke="white" stroke-width="1.5"/></svg>'
)


def image_popup(image: dict) -> str:
    """A street image's popup: its thumbnail (a data URI), date, source and, for Flickr, the
    licence and the scene filter's verdict.

    Args:
        image: ``source``, ``captured_at``, ``path`` and optionally ``thumbnail`` (a data
            URI, or a note why there is none), ``heading``, ``license``, ``scene``,
            ``scene_p`` and ``building`` (the filter's verdict: kept or dropped).
    """
    thumbnail = image.get("thumbnail") or "no thumbnail"
    lines = (
        [f'<img src="{html.escape(thumbnail)}" style="width:200px;display:block">']
        if thumbnail.startswith("data:image/")
        else [f"<i>{html.escape(str(image['path']))}: {html.escape(thumbnail)}</i>"]
    )
    source = str(image["source"])
    captured = str(image.get("captured_at") or "")[:10] or "date unknown"
    heading = image.get("heading")
    facts = f"<b>{html.escape(source)}</b> · {html.escape(captured)}"
    if heading is not None and not np.isnan(heading):
        facts += f" · heading {heading:.0f}°"
    lines.append(facts)
    if source == "flickr":
        licence = image.get("license")
        lines.append(f"licence: {html.escape(str(licence)) if _present(licence) else 'unknown'}")
        if isinstance(image.get("scene"), str):
            verdict = "kept" if image.get("building") is True else "dropped"
            lines.append(
                f"scene: {html.escape(image['scene'])} ({image['scene_p']:.2f}), "
                f"building filter: {verdict}"
            )
    return "<br/>".join(lines)


def _present(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def cell_map(
    cell: tuple[float, float, float, float],
    images: list[dict],
    aerial: np.ndarray | None = None,
    aerial_bounds: tuple[float, float, float, float] | None = None,
    basemap: Basemap | None = None,
) -> folium.Map:
    """The cell panel's local map: the aerial patch over the base map, the cell's square and
    one marker per street image pointing in its heading, with :func:`image_popup`.

    Args:
        cell: the cell's lon/lat bounds (west, south, east, north).
        images: one dict per image as :func:`image_popup` takes, with ``lon``, ``lat``.
        aerial: the aerial patch, ``(h, w, 3)`` RGB, north up.
        aerial_bounds: the patch's lon/lat bounds (west, south, east, north).
        basemap: tiles below the patch (None: none, which works offline).
    """
    shown = _standalone(aerial_bounds or cell, basemap, zoom_start=17, max_zoom=20)
    west, south, east, north = aerial_bounds or cell
    shown.fit_bounds([[south, west], [north, east]])
    if aerial is not None and aerial_bounds is not None:
        west, south, east, north = aerial_bounds
        folium.raster_layers.ImageOverlay(
            aerial, bounds=[[south, west], [north, east]], name="aerial", pixelated=False
        ).add_to(shown)
    west, south, east, north = cell
    folium.Rectangle(
        [[south, west], [north, east]], color="#000000", weight=2, fill=False, name="cell"
    ).add_to(shown)
    for image in images:
        colour = SOURCE_COLOURS.get(str(image["source"]), SOURCE_COLOURS["other"])
        heading = image.get("heading")
        if heading is not None and not np.isnan(heading):
            icon, size = _ARROW.format(deg=heading, colour=colour), 22
        else:
            icon, size = _DOT.format(colour=colour), 14
        folium.Marker(
            [image["lat"], image["lon"]],
            icon=folium.DivIcon(
                html=icon,
                icon_size=(size, size),
                icon_anchor=(size // 2, size // 2),
                class_name=f"street-image {image['source']}",
            ),
        ).add_to(shown).add_child(_Popup(image_popup(image)))
    return shown


class _Popup(MacroElement):
    """A popup bound to its parent marker by Leaflet alone: folium's ``Popup`` builds its
    content with jQuery, which the standalone page does not load."""

    _template = Template(
        "{% macro script(this, kwargs) %}"
        "{{ this._parent.get_name() }}.bindPopup({{ this.content|tojson }}, {maxWidth: 230});"
        "{% endmacro %}"
    )

    def __init__(self, content: str) -> None:
        super().__init__()
        self._name = "Popup"
        self.content = content
