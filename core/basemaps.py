"""Base maps: raster XYZ tiles drawn under the dashboard's maps and the HTML exports.

A base map is named by a preset (PDOK's BRT Achtergrondkaart in four themes, PDOK's aerial
photograph, OpenStreetMap), by any XYZ URL template (``https://host/{z}/{x}/{y}.png``), or is
``none``. The presets' URLs and attributions come from ``xyzservices`` (the provider registry
folium and contextily use), so a moved service is fixed by upgrading it, not here. ``auto``, the
default, takes PDOK's grey map when a short probe of one tile succeeds and none otherwise (the
dashboard then draws water and boundaries itself, as it does offline).
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import xyzservices.providers as xyz

from core.sources.http import FetchError, HttpClient, Politeness

AUTO = "auto"
NONE = "none"
#: Presets by name: the ``xyzservices`` provider and, where that has none fitting, the
#: attribution the provider asks for.
_PRESETS = {
    "pdok-grey": (xyz.nlmaps.grijs, None),
    "pdok-colour": (xyz.nlmaps.standaard, None),
    "pdok-pastel": (xyz.nlmaps.pastel, None),
    "pdok-water": (xyz.nlmaps.water, None),
    # the aerial photograph is Beeldmateriaal Nederland's, published by PDOK as open data
    "pdok-aerial": (
        xyz.nlmaps.luchtfoto,
        'Luchtfoto &copy; <a href="https://www.beeldmateriaal.nl">Beeldmateriaal Nederland</a>'
        ' via <a href="https://www.pdok.nl">PDOK</a>',
    ),
    "osm": (xyz.OpenStreetMap.Mapnik, None),
}
PRESETS = tuple(_PRESETS)
#: The base map ``auto`` uses when the probe reaches it.
AUTO_PRESET = "pdok-grey"
#: A tile over Amsterdam at zoom 10 (inside every preset's bounds): what the probe requests.
PROBE_TILE = {"z": 10, "x": 525, "y": 336}
PROBE_POLITENESS = Politeness(requests_per_second=10.0, retries=0, timeout_s=2.0)


@dataclass(frozen=True)
class Basemap:
    """A raster base map.

    Attributes:
        name: the preset's name, ``none``, or ``custom`` for a URL template.
        url: the XYZ tile URL template (``{z}``, ``{x}``, ``{y}``); None for no tiles.
        attribution: HTML crediting the provider, shown on the map as it requires.
        max_zoom: the deepest zoom level the service has tiles for.
        note: why this base map was chosen when it was not asked for (``auto`` offline).
    """

    name: str
    url: str | None = None
    attribution: str = ""
    max_zoom: int = 19
    note: str = ""

    @property
    def tiles(self) -> bool:
        """Whether tiles are drawn (not ``none``)."""
        return self.url is not None

    @property
    def attribution_text(self) -> str:
        """The attribution without its HTML (``&copy;`` as ©)."""
        text, inside = [], False
        for char in self.attribution:
            if char in "<>":
                inside = char == "<"
            elif not inside:
                text.append(char)
        return html.unescape("".join(text))

    def maplibre_style(self) -> dict:
        """A Mapbox/MapLibre GL style (version 8) with the tiles as its one raster layer."""
        source = {
            "type": "raster",
            "tiles": [self.url],
            "tileSize": 256,
            "maxzoom": self.max_zoom,
            "attribution": self.attribution,
        }
        return {
            "version": 8,
            "sources": {"basemap": source},
            "layers": [{"id": "basemap", "type": "raster", "source": "basemap"}],
        }


def check_template(url: str, where: str = "base map") -> str:
    """``url`` if it is an http(s) XYZ URL template.

    Raises:
        ValueError: naming ``where`` and what is wrong.
    """
    parts = urlsplit(url)
    missing = [key for key in ("{z}", "{x}", "{y}") if key not in url]
    if parts.scheme not in ("http", "https") or not parts.netloc or missing:
        raise ValueError(
            f"{where} {url!r}: expected one of {', '.join((AUTO, NONE, *PRESETS))} or an "
            "http(s) XYZ URL template with {z}, {x} and {y}, e.g. "
            "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
        )
    return url


def preset(name: str) -> Basemap:
    """A preset base map by name (:data:`PRESETS`), or ``none``.

    Raises:
        ValueError: for an unknown name.
    """
    if name == NONE:
        return Basemap(NONE)
    if name not in _PRESETS:
        raise ValueError(f"base map {name!r}: expected one of {', '.join((NONE, *PRESETS))}")
    provider, attribution = _PRESETS[name]
    return Basemap(
        name,
        provider.build_url(),
        attribution or provider.html_attribution,
        int(provider.get("max_zoom", 19)),
    )


def resolve(
    spec: str,
    attribution: str | None = None,
    probe: Callable[[Basemap], str | None] | None = None,
    where: str = "base map",
) -> Basemap:
    """The base map ``spec`` names.

    Args:
        spec: ``auto``, ``none``, a preset name (:data:`PRESETS`) or an XYZ URL template.
        attribution: HTML attribution of a URL template (default: its host name); a preset
            keeps its provider's.
        probe: how ``auto`` finds out why the preset cannot be reached, None when it can
            (default: :func:`reachable`).
        where: where ``spec`` comes from, for the error message.

    Raises:
        ValueError: for a spec that is none of these.
    """
    spec = spec.strip()
    if spec.lower() == AUTO:
        chosen = preset(AUTO_PRESET)
        problem = (probe or reachable)(chosen)
        if problem is None:
            return chosen
        return Basemap(NONE, note=f"{chosen.url.split('/{z}')[0]} cannot be reached ({problem})")
    if spec.lower() in (NONE, *PRESETS):
        return preset(spec.lower())
    url = check_template(spec, where)
    host = html.escape(urlsplit(url).netloc)
    return Basemap("custom", url, attribution or f"base map: {host}")


def reachable(basemap: Basemap, client: HttpClient | None = None) -> str | None:
    """Why one tile of ``basemap`` cannot be fetched from here (None when it can).

    One request with a short timeout and no retries: the dashboard asks this on start-up and
    must not hang offline.
    """
    client = client or HttpClient(PROBE_POLITENESS)
    url = basemap.url.format(**PROBE_TILE)
    try:
        response = client.get(url)
    except FetchError as exc:
        return str(exc).removeprefix(f"{url}: ")
    kind = response.headers.get("Content-Type", "")
    return None if kind.startswith("image/") else f"{url} answered {kind or 'no content type'}"
