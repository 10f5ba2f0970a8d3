"""The city map: colour scales, legends and the pydeck layers of the 100 m grid.

The palettes, colour scales and legends live in :mod:`core.styles` and the aggregation to
planners' units in :mod:`core.layers` (the exports use them too); they are re-exported here.

Pure functions (no Streamlit), so the benchmarks measure exactly what the pages send. The grid
goes to the browser as a ``GridCellLayer``: one slim record per cell (its lower-left corner in
lon/lat, a colour and the tooltip fields) instead of a GeoJSON polygon per cell; deck.gl draws
the 100 m squares itself.
"""

from __future__ import annotations

import copy
import functools
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pydeck as pdk
import pyproj
import shapely
from pydeck.bindings.json_tools import default_serialize

from core.basemaps import Basemap
from core.grid import CELL_SIZE, block_id, cell_index, cell_origin, ids_from_index
from core.layers import aggregate_by as aggregate_by
from core.styles import CLASS_PALETTE as CLASS_PALETTE
from core.styles import DIVERGING_PALETTE as DIVERGING_PALETTE
from core.styles import SCORE_PALETTE as SCORE_PALETTE
from core.styles import SIMILARITY_PALETTE as SIMILARITY_PALETTE
from core.styles import SPLIT_PALETTE as SPLIT_PALETTE
from core.styles import Legend as Legend
from core.styles import categorical as categorical
from core.styles import diverging as diverging
from core.styles import sequential as sequential

WATER = [166, 206, 227]
DISTRICT_LINE = [110, 110, 110]
OUTLINE = [40, 40, 40]
MISSING = "–"
#: The grid's opacity over base-map tiles: streets and buildings show through the colours.
OVER_TILES_OPACITY = 0.7
_TO_WGS84 = pyproj.Transformer.from_crs("EPSG:28992", "EPSG:4326", always_xy=True)


def to_lon_lat(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RD New (EPSG:28992) metres to WGS84 lon/lat degrees."""
    return _TO_WGS84.transform(x, y)


def _rounded(values: pd.Series, digits: int) -> np.ndarray:
    """Values rounded for display (integers for ``digits=0``), missing ones as a dash."""
    numbers = pd.to_numeric(values).to_numpy(float)
    missing = np.isnan(numbers)
    numbers = np.nan_to_num(numbers).round(digits)
    shown = (numbers.astype(np.int64) if digits == 0 else numbers).astype(object)
    shown[missing] = MISSING
    return shown


@dataclass(frozen=True)
class Records:
    """A map layer's records (cells, or polygons), already serialised: the JSON array and its
    length.

    The pages cache layers, and every rerun sends the deck again. Kept as text, a cached
    layer is serialised once, not on every rerun, and holds one string instead of tens of
    thousands of dicts and lists; those made Streamlit's full garbage collection after each
    script run cost about 0.15 s on the demo city, and took about 20 MB per layer.
    """

    json: str
    count: int

    def __len__(self) -> int:
        return self.count


def cell_payload(
    cells: pd.DataFrame,
    colours: np.ndarray,
    values: pd.Series | None = None,
    details: pd.DataFrame | None = None,
) -> Records:
    """The slim per-cell records the map sends: position, colour and tooltip fields.

    Args:
        cells: ``cell_id``, ``lon``, ``lat`` (lower-left corner), ``buurt_naam``, ``district``.
        colours: ``(n, 3)`` RGB per cell.
        values: the shown value per cell (tooltip ``v``), numbers or labels.
        details: optional ``true``, ``predicted``, ``residual``, ``gsv``, ``flickr`` per cell,
            aligned with ``cells``.
    """
    where = {
        "p": np.stack([cells["lon"].to_numpy(), cells["lat"].to_numpy()], 1).round(5).tolist(),
        "i": cells["cell_id"].to_numpy(),
        "b": cells["buurt_naam"].fillna("").to_numpy(),
        "d": cells["district"].fillna("").to_numpy(),
    }
    return _payload(where, colours, values, details)


def unit_payload(
    units: pd.DataFrame,
    colours: np.ndarray,
    values: pd.Series | None = None,
    details: pd.DataFrame | None = None,
) -> Records:
    """Records of planners' units (buurten, wijken, stadsdelen) in :func:`cell_payload`'s
    fields, with the unit's polygons instead of a position.

    Args:
        units: one row per polygon of a unit (a unit of several parts has several rows):
            ``unit`` (code), ``name``, ``polygon`` (rings, as in :func:`lonlat_polygons`),
            ``cells`` (scored cells in the unit) and ``few`` (too few cells to trust).
        colours: ``(n, 4)`` RGBA per unit.
        values, details: as for :func:`cell_payload`, aligned with ``units``.
    """
    count = units["cells"].astype(int).astype(str)
    where = {
        "polygon": units["polygon"].to_numpy(),
        "i": units["unit"].to_numpy(),
        "b": units["name"].to_numpy(),
        "d": np.where(units["few"], "only " + count + " scored cells", count + " scored cells"),
    }
    return _payload(where, colours, values, details)


def _payload(
    where: dict, colours: np.ndarray, values: pd.Series | None, details: pd.DataFrame | None
) -> Records:
    payload = pd.DataFrame({**where, "c": colours.tolist()})
    if values is not None:
        numeric = pd.api.types.is_numeric_dtype(values)
        payload["v"] = _rounded(values, 3) if numeric else values.fillna(MISSING).to_numpy(object)
    details = details if details is not None else pd.DataFrame()
    for key, column, digits in (
        ("t", "true", 3),
        ("y", "predicted", 3),
        ("r", "residual", 3),
        ("g", "gsv", 0),
        ("f", "flickr", 0),
    ):
        payload[key] = _rounded(details[column], digits) if column in details else MISSING
    return Records(payload.to_json(orient="records", double_precision=6), len(payload))


#: Most cells one map view sends at 100 m; a view with more shows coarser blocks instead, so
#: that a national root (0.4 million scored cells) never sends a deck of hundreds of MB.
MAX_MAP_CELLS = 60_000
#: Block sizes (m) a view aggregates to, the smallest that keeps it within MAX_MAP_CELLS.
BLOCK_SIZES = (500.0, 1000.0, 2000.0, 5000.0, 10000.0)


def view_block_size(cell_ids: np.ndarray, max_cells: int | None = None) -> float:
    """The square size (m) a map of ``cell_ids`` shows: 100 m cells, or the smallest of
    :data:`BLOCK_SIZES` with at most ``max_cells`` (default :data:`MAX_MAP_CELLS`) blocks."""
    max_cells = MAX_MAP_CELLS if max_cells is None else max_cells
    if len(cell_ids) <= max_cells:
        return CELL_SIZE
    for size in BLOCK_SIZES:
        if len(np.unique(block_id(cell_ids, size))) <= max_cells:
            return size
    return BLOCK_SIZES[-1]


def aggregate_blocks(
    shown: pd.DataFrame, block_size: float, categorical: bool = False
) -> pd.DataFrame:
    """Cells as ``block_size`` squares: the mean of the numbers (sum of image counts), the
    most common value of a categorical ``value``, the cell count, the most common district.

    Args:
        shown: one row per cell: ``cell_id``, ``value`` and optionally ``true``,
            ``predicted``, ``residual``, ``gsv``, ``flickr``, ``district``.
        block_size: a multiple of 100 m.
        categorical: ``value`` holds classes (most common per block), not numbers (mean).

    Returns:
        One row per block in :func:`cell_payload`'s columns: ``cell_id`` (the block's
        lower-left cell), ``lon``/``lat`` of that corner, ``cells``, ``buurt_naam`` (a
        description of the block) and the aggregated columns.
    """
    out = aggregate_by(shown, block_id(shown["cell_id"].to_numpy(), block_size), categorical)
    ix, iy = cell_index(out.index.to_numpy())
    per_block = int(round(block_size / CELL_SIZE))
    corner = ids_from_index(ix * per_block, iy * per_block)
    out = out.reset_index(drop=True).assign(cell_id=corner)
    out["lon"], out["lat"] = to_lon_lat(*cell_origin(corner))
    size = f"{block_size / 1000:g} km" if block_size >= 1000 else f"{block_size:g} m"
    out["buurt_naam"] = out["cells"].map(lambda n: f"{n} cells in this {size} block")
    return out


def tooltip(value_label: str, units: bool = False) -> dict:
    """The deck tooltip over :func:`cell_payload` (or, with ``units``, :func:`unit_payload`)
    records."""
    lines = [
        "<b>{b}</b> ({i})" if units else "<b>cell {i}</b>",
        "{d}" if units else "{b} ({d})",
        f"{html.escape(value_label)}: <b>{{v}}</b>",
        "true {t} · predicted {y} · residual {r}",
        "GSV {g} · Flickr {f} images",
    ]
    return {
        "html": "<br/>".join(lines),
        "style": {"fontSize": "12px", "backgroundColor": "#222", "color": "white"},
    }


def cell_layer(
    payload: Records,
    layer_id: str = "cells",
    opacity: float = 0.85,
    cell_size: float = CELL_SIZE,
) -> pdk.Layer:
    """A flat ``GridCellLayer`` of 100 m cells (or coarser blocks) from :func:`cell_payload`
    records."""
    return pdk.Layer(
        "GridCellLayer",
        payload,
        id=layer_id,
        get_position="p",
        get_fill_color="c",
        cell_size=cell_size,
        extruded=False,
        pickable=True,
        opacity=opacity,
    )


def unit_layer(payload: Records, layer_id: str = "units", opacity: float = 1.0) -> pdk.Layer:
    """Planners' units filled with their colour, from :func:`unit_payload` records."""
    return pdk.Layer(
        "PolygonLayer",
        payload,
        id=layer_id,
        get_polygon="polygon",
        get_fill_color="c",
        stroked=False,
        filled=True,
        pickable=True,
        opacity=opacity,
    )


def lonlat_polygons(geometry: shapely.Geometry) -> list[list[list[list[float]]]]:
    """A (multi)polygon in EPSG:28992 as deck.gl polygons: per polygon its rings (outer ring
    first, then holes) of lon/lat points, rounded to about a metre."""
    polygons = []
    for polygon in getattr(geometry, "geoms", [geometry]):
        if polygon.is_empty:
            continue
        rings = []
        for ring in [polygon.exterior, *polygon.interiors]:
            x, y = np.asarray(ring.coords).T
            lon, lat = to_lon_lat(x, y)
            rings.append(np.stack([lon, lat], 1).round(5).tolist())
        polygons.append(rings)
    return polygons


def outline_strip(geometry: shapely.Geometry, width_m: float) -> shapely.Geometry:
    """The boundary of a polygon as a filled strip ``width_m`` wide.

    Lines are drawn as thin polygons because deck.gl's path and stroke shaders misplace lines
    under software WebGL (SwiftShader, llvmpipe), where a 3 px path became a band across the
    map, while filled polygons render everywhere.
    """
    return shapely.buffer(shapely.boundary(geometry), width_m / 2, cap_style="flat")


def highlight_layer(
    cell_ids: Sequence[int], colour: Sequence[int] = (0, 0, 0), frame_m: float = 40.0
) -> pdk.Layer:
    """Frames ``frame_m`` wide around a few cells (the selected one), drawn above the grid; wide
    enough to find at city zoom, where a cell is two pixels."""
    x0, y0 = cell_origin(np.asarray(cell_ids, dtype=np.int64))
    frames = [
        shapely.box(x - frame_m, y - frame_m, x + 100 + frame_m, y + 100 + frame_m).difference(
            shapely.box(x, y, x + 100, y + 100)
        )
        for x, y in zip(x0, y0, strict=True)
    ]
    polygons = [p for frame in frames for p in lonlat_polygons(frame)]
    return _fill_layer("selected", polygon_records(polygons), colour)


def polygon_records(polygons: list) -> Records:
    """:func:`lonlat_polygons` lists as the records of a filled polygon layer."""
    records = [{"polygon": p} for p in polygons]
    return Records(json.dumps(records, separators=(",", ":")), len(records))


def _fill_layer(layer_id: str, records: Records, colour: Sequence[int]) -> pdk.Layer:
    return pdk.Layer(
        "PolygonLayer",
        records,
        id=layer_id,
        get_polygon="polygon",
        get_fill_color=list(colour),
        stroked=False,
        filled=True,
        pickable=False,
    )


def context_layers(context: dict) -> tuple[list[pdk.Layer], list[pdk.Layer]]:
    """Layers drawn below (water) and above (district boundaries, outline) the grid.

    The app must read without base-map tiles (offline), so water, districts and the municipal
    outline are layers of their own, all filled polygons (see :func:`outline_strip`); over a
    base map the tiles draw the water.

    Args:
        context: ``water``, ``districts`` and ``outline`` as :func:`polygon_records`, the
            ``view`` that shows the data root's grid, and optionally the ``basemap``.
    """
    none = polygon_records([])
    tiles = context.get("basemap") is not None and context["basemap"].tiles
    water = context.get("water") and not tiles
    below = [_fill_layer("water", context["water"], WATER)] if water else []
    above = [
        _fill_layer("districts", context.get("districts", none), DISTRICT_LINE),
        _fill_layer("outline", context.get("outline", none), OUTLINE),
    ]
    return below, above


class CompactDeck(pdk.Deck):
    """A ``pdk.Deck`` whose JSON has no indentation and splices in :class:`Records` as
    they are.

    ``st.pydeck_chart`` sends ``to_json()`` on every rerun; pydeck indents it by two spaces per
    level, which for a city of per-cell records is most of the bytes.
    """

    def to_json(self) -> str:
        fragments: dict[str, str] = {}

        def serialise(value: object) -> object:
            if isinstance(value, Records):
                token = f"@@records-{len(fragments)}@@"
                fragments[token] = value.json
                return token
            if isinstance(value, pd.DataFrame):  # pandas 3 frames have no __dict__
                return value.to_dict(orient="records")
            return default_serialize(value)

        text = json.dumps(self, sort_keys=True, default=serialise, separators=(",", ":"))
        for token, fragment in fragments.items():
            text = text.replace(json.dumps(token), fragment, 1)
        return text


def _mercator_y(lat: float) -> float:
    return math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))


def fit_view(bounds: Sequence[float], width_px: int = 640, height_px: int = 560) -> pdk.ViewState:
    """The Web Mercator view that shows lon/lat ``bounds`` (west, south, east, north) whole."""
    west, south, east, north = bounds
    zoom_x = math.log2(width_px * 360 / (256 * max(east - west, 1e-6)))
    zoom_y = math.log2(
        height_px * 2 * math.pi / (256 * max(_mercator_y(north) - _mercator_y(south), 1e-9))
    )
    return pdk.ViewState(
        latitude=(south + north) / 2,
        longitude=(west + east) / 2,
        zoom=round(min(zoom_x, zoom_y, 18.0), 2),
    )


def map_style(basemap: Basemap | None) -> list[dict]:
    """The deck's ``mapStyle``: a GL style with ``basemap``'s raster tiles, or an empty one.

    Streamlit draws a deck's base map with react-map-gl and passes it ``mapStyle`` when that is
    a string or, for a list, its first element, which may be a whole style object; so a
    raster source needs no style URL, no token and no JavaScript (deck.gl's ``TileLayer``
    would need a ``renderSubLayers`` function, which JSON cannot carry). Without a style
    Streamlit loads Carto's, so "none" sends an empty one: the page then fetches nothing.
    """
    if basemap is None or not basemap.tiles:
        return [{"version": 8, "sources": {}, "layers": []}]
    return [basemap.maplibre_style()]


def deck(
    layers: list[pdk.Layer],
    value_label: str,
    view: pdk.ViewState,
    units: bool = False,
    basemap: Basemap | None = None,
) -> pdk.Deck:
    """A deck over ``basemap``'s tiles (none by default), with the cell (or unit) tooltip."""
    shown = copy.copy(
        _empty_deck(value_label, view.latitude, view.longitude, view.zoom, units, basemap)
    )
    shown.layers = list(layers)
    return shown


@functools.lru_cache(maxsize=64)
def _empty_deck(
    value_label: str,
    latitude: float,
    longitude: float,
    zoom: float,
    units: bool,
    basemap: Basemap | None,
) -> CompactDeck:
    """A deck without layers, copied for every map drawn: ``pdk.Deck()`` tries to import its
    Jupyter widget six times, and a failed import is not remembered, so building one per rerun
    read and compiled that module six times under the import lock (a tenth of the server's
    time with 20 sessions)."""
    view = pdk.ViewState(latitude=latitude, longitude=longitude, zoom=zoom)
    empty = CompactDeck(
        layers=[], initial_view_state=view, map_style=None, tooltip=tooltip(value_label, units)
    )
    empty.map_style = map_style(basemap)  # pydeck's constructor takes no list
    return empty


def city_deck(
    payload: Records,
    context: dict,
    value_label: str,
    selected: Sequence[int] = (),
    cell_size: float = CELL_SIZE,
    units: bool = False,
) -> pdk.Deck:
    """The whole map: water, the coloured grid (100 m cells or ``cell_size`` blocks) or
    planners' units (``units``: :func:`unit_payload` records), district lines, outline and the
    selection over ``context["basemap"]`` (if any), opening on ``context["view"]``."""
    below, above = context_layers(context)
    basemap = context.get("basemap")
    tiles = basemap is not None and basemap.tiles
    shown = (
        unit_layer(payload, opacity=OVER_TILES_OPACITY if tiles else 1.0)
        if units
        else cell_layer(payload, cell_size=cell_size, opacity=OVER_TILES_OPACITY if tiles else 0.85)
    )
    layers = [*below, shown, *above]
    if len(selected):
        layers.append(highlight_layer(selected))
    return deck(layers, value_label, context["view"], units, basemap)


def selected_cells(event: object, layer_id: str = "cells") -> list[int]:
    """Cell ids picked in a ``st.pydeck_chart(on_select=...)`` event (empty when none)."""
    selection = getattr(event, "selection", None) or {}
    objects = (selection.get("objects") or {}).get(layer_id) or []
    return [int(o["i"]) for o in objects if "i" in o]
