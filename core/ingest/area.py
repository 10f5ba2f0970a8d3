"""The area of a fetch: one municipality, whose PDOK outline fixes every source's box and grid."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from pyproj import Transformer
from shapely.geometry.base import BaseGeometry

from core.grid import RD_NEW, Bounds
from core.ingest.source import Service
from core.sources.catalog import WGS84
from core.sources.http import Estimate
from core.sources.pdok_boundaries import (
    PDOK_BOUNDARIES_URL,
    PDOK_POLITENESS,
    Municipality,
    estimate_municipality,
    fetch_municipality,
)


@dataclass(frozen=True)
class FetchArea:
    """The municipality a fetch covers.

    Attributes:
        name: the official name, e.g. ``Amsterdam``.
        code: the municipality code as PDOK serves it, e.g. ``0363``.
        province: the province name, "" when unknown.
        outline: the outline, a valid (multi)polygon in EPSG:28992.
    """

    name: str
    code: str
    province: str
    outline: BaseGeometry

    @classmethod
    def from_municipality(cls, municipality: Municipality) -> FetchArea:
        """The area of a municipality fetched from PDOK."""
        return cls(
            municipality.name, municipality.code, municipality.province, municipality.geometry
        )

    @property
    def bbox_rd(self) -> Bounds:
        """(minx, miny, maxx, maxy) of the outline in RD metres."""
        return tuple(float(v) for v in self.outline.bounds)

    @cached_property
    def bbox_wgs84(self) -> tuple[float, float, float, float]:
        """The outline's box in WGS84 (min lon, min lat, max lon, max lat), to 6 decimals."""
        to_wgs84 = Transformer.from_crs(RD_NEW, WGS84, always_xy=True)
        return tuple(round(v, 6) for v in to_wgs84.transform_bounds(*self.bbox_rd))

    @property
    def area_km2(self) -> float:
        """The outline's area in square kilometres."""
        return self.outline.area / 1e6


class Outline(Service):
    """The municipality's outline from PDOK's administrative boundaries: the first request of
    every fetch, before any source."""

    name = "pdok"
    licence = "PDOK Bestuurlijke Gebieden (Kadaster): open data, CC0"
    service = "pdok"
    endpoint = PDOK_BOUNDARIES_URL
    politeness = {"pdok": PDOK_POLITENESS}

    def estimate(self) -> Estimate:
        """One request (more only if the service ignores the name filter)."""
        return estimate_municipality(self.politeness["pdok"].requests_per_second)

    def find(self) -> FetchArea:
        """The area of the config's municipality, trying :func:`official_name_guesses` in turn.

        Raises:
            ValueError: naming the name as typed, when no guess is a municipality (or several
                are).
            FetchError: when the outline cannot be fetched.
        """
        *first, last = official_name_guesses(self.config.municipality)
        for guess in first:
            try:
                return self._fetch(guess)
            except ValueError as exc:
                if "no municipality named" not in str(exc):  # several of that name: say so
                    raise
        return self._fetch(last)

    def _fetch(self, name: str) -> FetchArea:
        municipality = fetch_municipality(name, self.config.province, self.client(), self.endpoint)
        return FetchArea.from_municipality(municipality)


def official_name_guesses(name: str) -> list[str]:
    """``name`` as typed, then with each word capitalised (``amsterdam`` -> ``Amsterdam``,
    ``'s-gravenhage`` -> ``'s-Gravenhage``): PDOK's name filter is exact."""
    capitalised = re.sub(r"(^|[\s(-])([^\W\d_])", lambda m: m[1] + m[2].upper(), name.strip())
    return list(dict.fromkeys([name.strip(), capitalised]))
