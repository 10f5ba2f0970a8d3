"""Map colours: the palettes, colour scales and legends every map shares, and the same classes
as a QGIS layer style (QML) and an OGC Styled Layer Descriptor (SLD).

The dashboard's maps (``dashboard.maps`` re-exports these) and the exported files
(:mod:`core.exports`) colour a layer with the same functions, so a GeoPackage opened in QGIS, a
standalone HTML map and the app agree.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

import numpy as np
import pandas as pd

#: Leefbaarometer-like sequential palette: red (low) .. yellow .. green (high).
SCORE_PALETTE = np.array(
    [[165, 0, 38], [244, 109, 67], [254, 224, 139], [166, 217, 106], [26, 152, 80]]
)
#: Diverging: blue (negative) .. light grey .. red (positive).
DIVERGING_PALETTE = np.array([[33, 102, 172], [247, 247, 247], [178, 24, 43]])
#: Similarity: pale .. deep purple.
SIMILARITY_PALETTE = np.array([[203, 201, 226], [128, 125, 186], [63, 0, 125]])
#: Leefbaarometer 3.0 classes 1 (very poor) .. 9 (excellent).
CLASS_PALETTE = {
    1: [128, 0, 38],
    2: [189, 0, 38],
    3: [227, 26, 28],
    4: [252, 141, 89],
    5: [254, 224, 139],
    6: [217, 239, 139],
    7: [145, 207, 96],
    8: [26, 152, 80],
    9: [0, 104, 55],
}
SPLIT_PALETTE = {"train": [189, 189, 189], "val": [116, 169, 207], "test": [230, 85, 13]}


@dataclass(frozen=True)
class Legend:
    """What a map's colours mean: a title and (colour, label) stops.

    A colour ramp (:func:`sequential`, :func:`diverging`) also knows ``breaks``: the values
    between its classes, a class per stop holding the values nearest that stop; categories
    (:func:`categorical`) know the value of each stop in ``categories``.
    """

    title: str
    stops: list[tuple[list[int], str]]
    breaks: tuple[float, ...] = field(default=())
    categories: tuple = field(default=())

    def html(self) -> str:
        """Small HTML legend: colour swatches with labels."""
        items = "".join(
            f'<span style="display:inline-flex;align-items:center;margin-right:10px">'
            f'<span style="width:14px;height:14px;background:rgb({r},{g},{b});display:inline-block;'
            f'margin-right:4px;border:1px solid #999"></span>{html.escape(label)}</span>'
            for (r, g, b), label in self.stops
        )
        return f'<div style="font-size:0.85rem"><b>{html.escape(self.title)}</b><br/>{items}</div>'


def _ramp(palette: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Colours at positions ``t`` in [0, 1] along a palette, linearly interpolated."""
    t = np.clip(np.nan_to_num(t, nan=0.5), 0, 1) * (len(palette) - 1)
    i = np.minimum(t.astype(int), len(palette) - 2)
    return (palette[i] + (palette[i + 1] - palette[i]) * (t - i)[:, None]).round().astype(int)


def number(value: float) -> str:
    """A value as legends and class labels show it: three significant digits, or thousands."""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def sequential(
    values: np.ndarray, title: str, palette: np.ndarray = SCORE_PALETTE, log: bool = False
) -> tuple[np.ndarray, Legend]:
    """Colours stretched between the 2nd and 98th percentile, and their legend.

    ``log`` stretches ``log(1 + value)`` instead, for counts with a long tail.
    """
    scaled = np.log1p(values) if log else values
    lo, hi = np.nanpercentile(scaled, [2, 98]) if np.isfinite(scaled).any() else (0.0, 1.0)
    colours = _ramp(palette, (scaled - lo) / max(hi - lo, 1e-9))
    stops = np.linspace(lo, hi, len(palette))
    labels = [number(np.expm1(s) if log else s) for s in stops]
    labels[0], labels[-1] = f"≤ {labels[0]}", f"≥ {labels[-1]}"
    middles = (stops[:-1] + stops[1:]) / 2
    breaks = tuple(float(b) for b in (np.expm1(middles) if log else middles))
    stops_ = [(c.tolist(), s) for c, s in zip(palette, labels, strict=True)]
    return colours, Legend(title, stops_, breaks=breaks)


def diverging(values: np.ndarray, title: str) -> tuple[np.ndarray, Legend]:
    """Colours symmetric around zero (blue negative, red positive), and their legend."""
    finite = np.abs(values[np.isfinite(values)])
    limit = max(float(np.percentile(finite, 98)) if finite.size else 1.0, 1e-9)
    colours = _ramp(DIVERGING_PALETTE, (values / limit + 1) / 2)
    labels = [f"≤ -{number(limit)}", "0", f"≥ +{number(limit)}"]
    stops = [(c.tolist(), s) for c, s in zip(DIVERGING_PALETTE, labels, strict=True)]
    return colours, Legend(title, stops, breaks=(-limit / 2, limit / 2))


def categorical(values: pd.Series, palette: dict, title: str) -> tuple[np.ndarray, Legend]:
    """Colours per category (grey for unknown ones), and the legend of those present."""
    grey = [150, 150, 150]
    colours = np.array([palette.get(v, grey) for v in values], dtype=int).reshape(-1, 3)
    present = [k for k in palette if (values == k).any()]
    return colours, Legend(
        title, [(palette[k], str(k)) for k in present], categories=tuple(present)
    )


# --- the legend as a GIS style ----------------------------------------------------------------


@dataclass(frozen=True)
class StyleClass:
    """One class of a style: its colour, label and either a range or a category value.

    A range holds ``lower < value <= upper`` (the first class also its ``lower``), as QGIS's
    graduated renderer does.
    """

    colour: list[int]
    label: str
    lower: float | None = None
    upper: float | None = None
    value: object = None


def style_classes(legend: Legend, values: np.ndarray | None = None) -> list[StyleClass]:
    """The legend's stops as classes: one category per stop, or one range per stop of a ramp,
    bounded by its ``breaks`` and, at both ends, by the values (or the outer breaks).

    Raises:
        ValueError: for a legend with neither categories nor breaks.
    """
    if legend.categories:
        return [
            StyleClass(colour, label, value=category)
            for (colour, label), category in zip(legend.stops, legend.categories, strict=True)
        ]
    if len(legend.breaks) != len(legend.stops) - 1:
        raise ValueError(f"legend {legend.title!r} has no class breaks to style")
    finite = np.asarray(values, float) if values is not None else np.array([])
    finite = finite[np.isfinite(finite)]
    low = min(legend.breaks[0], float(finite.min())) if finite.size else legend.breaks[0]
    high = max(legend.breaks[-1], float(finite.max())) if finite.size else legend.breaks[-1]
    edges = [low, *legend.breaks, high]
    classes = []
    for i, (colour, _) in enumerate(legend.stops):
        lower, upper = edges[i], edges[i + 1]
        if i == 0:
            label = f"≤ {number(upper)}"
        elif i == len(legend.stops) - 1:
            label = f"> {number(lower)}"
        else:
            label = f"{number(lower)} – {number(upper)}"
        classes.append(StyleClass(list(colour), label, lower, upper))
    return classes


#: The QGIS version whose QML layout :func:`qml` follows; any QGIS 3 reads it.
QGIS_VERSION = "3.34.0-Prizren"


def _qgis_colour(colour: list[int], alpha: int = 255) -> str:
    return ",".join(str(int(c)) for c in [*colour[:3], alpha])


def _fill_symbol(name: int, colour: list[int]) -> str:
    """A QGIS fill symbol without outline: the properties both as the ``Option`` map of
    QGIS 3.26+ and as the ``prop`` list older versions read."""
    props = {"color": _qgis_colour(colour), "outline_style": "no", "style": "solid"}
    options = "".join(
        f"<Option type={quoteattr('QString')} name={quoteattr(k)} value={quoteattr(v)}/>"
        for k, v in props.items()
    )
    old = "".join(f"<prop k={quoteattr(k)} v={quoteattr(v)}/>" for k, v in props.items())
    return (
        f'<symbol type="fill" name="{name}" alpha="1" clip_to_extent="1" force_rhr="0">'
        f'<layer class="SimpleFill" enabled="1" locked="0" pass="0">'
        f'<Option type="Map">{options}</Option>{old}</layer></symbol>'
    )


def qml(attribute: str, classes: list[StyleClass]) -> str:
    """A QGIS layer style (QML) filling polygons by ``attribute`` with ``classes``: a
    categorized renderer for category classes, a graduated one for ranges."""
    symbols = "".join(_fill_symbol(i, c.colour) for i, c in enumerate(classes))
    if classes and classes[0].lower is None:
        items = "".join(
            f"<category value={quoteattr(str(c.value))} symbol={quoteattr(str(i))} "
            f'label={quoteattr(c.label)} render="true"/>'
            for i, c in enumerate(classes)
        )
        renderer = (
            f'<renderer-v2 type="categorizedSymbol" attr={quoteattr(attribute)} '
            f'symbollevels="0" forceraster="0" enableorderby="0">'
            f"<categories>{items}</categories><symbols>{symbols}</symbols></renderer-v2>"
        )
    else:
        items = "".join(
            f'<range lower="{float(c.lower)!r}" upper="{float(c.upper)!r}" symbol="{i}" '
            f'label={quoteattr(c.label)} render="true"/>'
            for i, c in enumerate(classes)
        )
        renderer = (
            f'<renderer-v2 type="graduatedSymbol" attr={quoteattr(attribute)} '
            f'graduatedMethod="GraduatedColor" symbollevels="0" forceraster="0" '
            f'enableorderby="0"><ranges>{items}</ranges><symbols>{symbols}</symbols>'
            f"</renderer-v2>"
        )
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        f'<qgis version="{QGIS_VERSION}" styleCategories="Symbology">{renderer}'
        "<layerGeometryType>2</layerGeometryType></qgis>\n"
    )


def _hex(colour: list[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in colour[:3]))


def _sld_filter(attribute: str, c: StyleClass, first: bool) -> str:
    prop = f"<ogc:PropertyName>{html.escape(attribute)}</ogc:PropertyName>"
    if c.lower is None:
        return (
            f"<ogc:PropertyIsEqualTo>{prop}<ogc:Literal>{html.escape(str(c.value))}"
            "</ogc:Literal></ogc:PropertyIsEqualTo>"
        )
    above = "PropertyIsGreaterThanOrEqualTo" if first else "PropertyIsGreaterThan"
    return (
        f"<ogc:And><ogc:{above}>{prop}<ogc:Literal>{float(c.lower)!r}</ogc:Literal></ogc:{above}>"
        f"<ogc:PropertyIsLessThanOrEqualTo>{prop}<ogc:Literal>{float(c.upper)!r}</ogc:Literal>"
        "</ogc:PropertyIsLessThanOrEqualTo></ogc:And>"
    )


def sld(layer_name: str, attribute: str, classes: list[StyleClass]) -> str:
    """The same classes as an OGC SLD 1.1 style (for GeoServer, MapServer and QGIS)."""
    rules = "".join(
        f"<se:Rule><se:Name>{html.escape(c.label)}</se:Name>"
        f"<ogc:Filter>{_sld_filter(attribute, c, i == 0)}</ogc:Filter>"
        f'<se:PolygonSymbolizer><se:Fill><se:SvgParameter name="fill">{_hex(c.colour)}'
        "</se:SvgParameter></se:Fill></se:PolygonSymbolizer></se:Rule>"
        for i, c in enumerate(classes)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<StyledLayerDescriptor version="1.1.0" xmlns="http://www.opengis.net/sld" '
        'xmlns:se="http://www.opengis.net/se" xmlns:ogc="http://www.opengis.net/ogc" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://www.opengis.net/sld '
        'http://schemas.opengis.net/sld/1.1.0/StyledLayerDescriptor.xsd">'
        f"<NamedLayer><se:Name>{html.escape(layer_name)}</se:Name><UserStyle>"
        f"<se:Name>{html.escape(layer_name)}</se:Name><se:FeatureTypeStyle>{rules}"
        "</se:FeatureTypeStyle></UserStyle></NamedLayer></StyledLayerDescriptor>\n"
    )
