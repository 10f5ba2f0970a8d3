"""Municipality outlines from PDOK's administrative boundaries (Kadaster Bestuurlijke Gebieden).

The OGC API Features service ``https://api.pdok.nl/kadaster/bestuurlijkegebieden/ogc/v1`` has a
collection ``gemeentegebied`` with one feature per municipality: properties ``naam`` (the
official Dutch name, e.g. ``Amsterdam``, ``'s-Gravenhage``), ``code``, ``identificatie``
(``0363`` / ``GM0363``) and ``ligt_in_provincie_naam``. Items are GeoJSON, in RD New when asked
with ``crs=http://www.opengis.net/def/crs/EPSG/0/28992``, filtered by property parameters
(``naam=...`` for one municipality, ``ligt_in_provincie_naam=...`` for every municipality of a
province) and paged by cursor (``links`` with ``rel="next"``). No key; open data (CC0).

The outlines (their union, for several municipalities) define the bbox and the grid of a whole
fetch.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from pyproj import Transformer
from shapely.geometry.base import BaseGeometry

from core.grid import RD_NEW, Bounds
from core.sources.http import Estimate, FetchError, HttpClient, Politeness

log = logging.getLogger(__name__)

PDOK_BOUNDARIES_URL = "https://api.pdok.nl/kadaster/bestuurlijkegebieden/ogc/v1"
MUNICIPALITY_COLLECTION = "gemeentegebied"
RD_CRS_URI = "http://www.opengis.net/def/crs/EPSG/0/28992"
PDOK_POLITENESS = Politeness(requests_per_second=4.0, concurrency=1)
#: A large municipality's full-resolution outline as GeoJSON, for the plan.
OUTLINE_BYTES = 500_000
_PAGE_SIZE = 100
_MAX_PAGES = 50  # 342 municipalities: more pages means the server ignores the page size
#: The property of a ``gemeentegebied`` naming its province.
PROVINCE_PROPERTY = "ligt_in_provincie_naam"


@dataclass(frozen=True)
class Municipality:
    """One municipality of ``gemeentegebied``.

    Attributes:
        name: the official name (``naam``).
        code: the municipality code as served (``code``, else ``identificatie``).
        province: the province name (``ligt_in_provincie_naam``), "" when absent.
        geometry: the outline, a valid (multi)polygon in EPSG:28992.
    """

    name: str
    code: str
    province: str
    geometry: BaseGeometry

    @property
    def bbox_rd(self) -> Bounds:
        """(minx, miny, maxx, maxy) of the outline in RD metres."""
        return tuple(float(v) for v in self.geometry.bounds)


@functools.cache
def _lonlat_to_rd() -> Transformer:
    """Lon/lat to RD New, built once: a province answered in lon/lat has dozens of outlines."""
    return Transformer.from_crs("OGC:CRS84", RD_NEW, always_xy=True)


def _outline(geometry: dict[str, Any] | None, source: str) -> BaseGeometry:
    """A GeoJSON geometry in RD New; one in lon/lat (the service's default CRS) is projected."""
    try:
        shape = shapely.geometry.shape(geometry)
    except (AttributeError, KeyError, TypeError, ValueError, shapely.errors.GEOSException) as exc:
        raise FetchError(f"{source}: unreadable geometry ({exc})") from None
    if shape.is_empty or shape.geom_type not in ("Polygon", "MultiPolygon"):
        raise FetchError(f"{source}: the outline is not a polygon ({shape.geom_type})")
    if max(abs(v) for v in shape.bounds) <= 180:
        to_rd = _lonlat_to_rd()
        shape = shapely.transform(
            shape, lambda xy: np.column_stack(to_rd.transform(xy[:, 0], xy[:, 1]))
        )
    return shapely.make_valid(shape)


def municipality_features(
    name: str, client: HttpClient | None = None, endpoint: str = PDOK_BOUNDARIES_URL
) -> list[dict[str, Any]]:
    """GeoJSON features of ``gemeentegebied`` named ``name`` (case-insensitive), all pages."""
    return _features("naam", name, client, endpoint)


def province_features(
    province: str, client: HttpClient | None = None, endpoint: str = PDOK_BOUNDARIES_URL
) -> list[dict[str, Any]]:
    """GeoJSON features of every ``gemeentegebied`` in ``province`` (its
    ``ligt_in_provincie_naam``, case-insensitive), all pages."""
    return _features(PROVINCE_PROPERTY, province, client, endpoint)


def _features(
    key: str, value: str, client: HttpClient | None, endpoint: str
) -> list[dict[str, Any]]:
    """The features whose property ``key`` equals ``value`` (case-insensitive), asked for with
    the property filter ``key=value`` and checked here, so that a server ignoring the filter
    still gives the right features (over more pages)."""
    client = client or HttpClient(PDOK_POLITENESS)
    next_url: str | None = f"{endpoint.rstrip('/')}/collections/{MUNICIPALITY_COLLECTION}/items"
    params: dict[str, Any] | None = {
        "f": "json",
        "crs": RD_CRS_URI,
        key: value,
        "limit": _PAGE_SIZE,
    }
    found: list[dict[str, Any]] = []
    pages = 0
    while next_url is not None:
        if pages == _MAX_PAGES:
            raise FetchError(
                f"{endpoint}: more than {_MAX_PAGES} pages of municipalities; giving up"
            )
        pages += 1
        page = client.get_json(next_url, params)
        shown = client.redact(next_url)
        if not isinstance(page, dict) or not isinstance(page.get("features"), list):
            raise FetchError(f"{shown}: not a GeoJSON FeatureCollection: {str(page)[:200]!r}")
        found += [
            f
            for f in page["features"]
            if str((f.get("properties") or {}).get(key, "")).casefold() == value.casefold()
        ]
        next_url = next(
            (link.get("href") for link in page.get("links") or [] if link.get("rel") == "next"),
            None,
        )
        params = None  # the next link carries every parameter
    return found


def fetch_municipality(
    name: str,
    province: str | None = None,
    client: HttpClient | None = None,
    endpoint: str = PDOK_BOUNDARIES_URL,
) -> Municipality:
    """The outline of one municipality by its official name, in EPSG:28992.

    Args:
        name: the exact official Dutch name (``naam``), e.g. ``"Amsterdam"``.
        province: the province (``ligt_in_provincie_naam``) when the name is ambiguous.
        client: the HTTP client (default: :data:`PDOK_POLITENESS`).
        endpoint: the OGC API landing page.

    Raises:
        ValueError: if no municipality or several have this name (listing their codes and
            provinces).
        FetchError: naming the URL, for HTTP failures or answers that are not GeoJSON.
    """
    features = municipality_features(name, client, endpoint)
    if province is not None:
        features = [
            f
            for f in features
            if str(f["properties"].get(PROVINCE_PROPERTY, "")).casefold() == province.casefold()
        ]
    where = f"{endpoint} collection {MUNICIPALITY_COLLECTION}"
    if not features:
        raise ValueError(
            f"{where}: no municipality named {name!r}"
            + (f" in {province!r}" if province else "")
            + "; use the official Dutch name, e.g. 'Amsterdam', \"'s-Gravenhage\", 'Bergen (NH)'"
        )
    if len(features) > 1:
        listed = [
            (
                f["properties"].get("naam"),
                f["properties"].get("code"),
                f["properties"].get(PROVINCE_PROPERTY),
            )
            for f in features
        ]
        raise ValueError(
            f"{where}: {len(features)} municipalities are named {name!r}: {listed}; "
            "pass province= to choose one"
        )
    return _municipality(features[0], where)


def fetch_province(
    province: str, client: HttpClient | None = None, endpoint: str = PDOK_BOUNDARIES_URL
) -> list[Municipality]:
    """Every municipality of a province, by code, outlines in EPSG:28992.

    Args:
        province: the province as PDOK names it (``ligt_in_provincie_naam``, e.g.
            ``"Noord-Holland"``, ``"Fryslân"``), case-insensitive.
        client: the HTTP client (default: :data:`PDOK_POLITENESS`).
        endpoint: the OGC API landing page.

    Raises:
        ValueError: if no municipality lies in a province of that name.
        FetchError: naming the URL, for HTTP failures or answers that are not GeoJSON.
    """
    where = f"{endpoint} collection {MUNICIPALITY_COLLECTION}"
    features = province_features(province, client, endpoint)
    if not features:
        raise ValueError(
            f"{where}: no municipality lies in a province named {province!r}; use the "
            "province's name as PDOK writes it, e.g. 'Noord-Holland', 'Fryslân', 'Limburg'"
        )
    return sorted((_municipality(f, where) for f in features), key=lambda m: m.code)


def _municipality(feature: dict[str, Any], where: str) -> Municipality:
    """The :class:`Municipality` of one ``gemeentegebied`` feature."""
    properties = feature["properties"]
    code = str(properties.get("code") or properties.get("identificatie") or "")
    geometry = _outline(feature.get("geometry"), f"{where} {properties.get('naam')!r}")
    log.info("%s: %s (%s), %.1f km2", where, properties["naam"], code, geometry.area / 1e6)
    return Municipality(
        str(properties["naam"]), code, str(properties.get(PROVINCE_PROPERTY) or ""), geometry
    )


def estimate_municipality(
    requests_per_second: float = PDOK_POLITENESS.requests_per_second, municipalities: int = 1
) -> Estimate:
    """One request per municipality named (more only if the service ignores the name
    filter)."""
    return Estimate(
        "PDOK municipality outline" + ("s" if municipalities > 1 else ""),
        municipalities,
        municipalities * OUTLINE_BYTES,
        requests_per_second,
        "open data (CC0), no key",
    )


def estimate_province(
    municipalities: int, requests_per_second: float = PDOK_POLITENESS.requests_per_second
) -> Estimate:
    """One page of 100 outlines per request for a province's ``municipalities``."""
    return Estimate(
        "PDOK municipality outlines of a province",
        max(1, -(-municipalities // _PAGE_SIZE)),
        municipalities * OUTLINE_BYTES,
        requests_per_second,
        "open data (CC0), no key",
    )
