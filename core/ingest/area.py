"""The area of a fetch: one municipality or several (a list, or every municipality of a
province), whose PDOK outlines' union fixes every source's box and grid."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import shapely
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
    estimate_province,
    fetch_municipality,
    fetch_province,
)

T = TypeVar("T")


@dataclass(frozen=True)
class FetchArea:
    """The municipalities a fetch covers, as one area.

    Attributes:
        name: the official name, e.g. ``Amsterdam``; for several, the province's name for a
            whole province, else the names joined with `` + ``.
        code: the municipality code as PDOK serves it, e.g. ``0363``; for several, the codes
            joined with ``,``.
        province: the province name, "" when unknown; for several, the provinces joined with
            ``, ``.
        outline: the outline (for several, their union), a valid (multi)polygon in EPSG:28992.
        municipalities: each municipality with its own outline, ordered by code; default: the
            area itself as one municipality.
    """

    name: str
    code: str
    province: str
    outline: BaseGeometry
    municipalities: tuple[Municipality, ...] = ()

    def __post_init__(self) -> None:
        if not self.municipalities:
            one = Municipality(self.name, self.code, self.province, self.outline)
            object.__setattr__(self, "municipalities", (one,))

    @classmethod
    def from_municipality(cls, municipality: Municipality) -> FetchArea:
        """The area of a municipality fetched from PDOK."""
        return cls.from_municipalities([municipality])

    @classmethod
    def from_municipalities(
        cls, municipalities: Sequence[Municipality], name: str | None = None
    ) -> FetchArea:
        """The union of municipalities fetched from PDOK, each once, ordered by code: the same
        municipalities in any order are the same area (its steps' parameters, the grid).

        Args:
            municipalities: at least one municipality.
            name: the area's name when several (default: their names joined with `` + ``).
        """
        parts = tuple(sorted({m.code: m for m in municipalities}.values(), key=lambda m: m.code))
        if len(parts) == 1:
            (m,) = parts
            return cls(m.name, m.code, m.province, m.geometry, parts)
        provinces = dict.fromkeys(m.province for m in parts if m.province)
        return cls(
            name or " + ".join(m.name for m in parts),
            ",".join(m.code for m in parts),
            ", ".join(provinces),
            shapely.make_valid(shapely.union_all([m.geometry for m in parts])),
            parts,
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
    """The municipalities' outlines from PDOK's administrative boundaries: the first requests
    of every fetch, before any source."""

    name = "pdok"
    licence = "PDOK Bestuurlijke Gebieden (Kadaster): open data, CC0"
    service = "pdok"
    endpoint = PDOK_BOUNDARIES_URL
    politeness = {"pdok": PDOK_POLITENESS}

    def estimate(self, area: FetchArea) -> Estimate:
        """One request per municipality named, or per page of a province's municipalities
        (more only if the service ignores the filter)."""
        rate = self.politeness["pdok"].requests_per_second
        count = len(area.municipalities)
        if self.config.whole_province:
            return estimate_province(count, rate)
        return estimate_municipality(rate, count)

    def find(self) -> FetchArea:
        """The area of the config's municipalities: every name looked up (trying
        :func:`official_name_guesses` in turn), or every municipality of the province.

        Raises:
            ValueError: naming each name as typed that no guess finds (or that several
                municipalities share), or the province that holds none.
            FetchError: when an outline cannot be fetched.
        """
        if self.config.whole_province:
            municipalities = self._guessing(self._province, self.config.province or "")
            return FetchArea.from_municipalities(municipalities, municipalities[0].province)
        found, errors = [], []
        for name in self.config.names:
            try:
                found.append(self._guessing(self._municipality, name))
            except ValueError as exc:
                errors.append(str(exc))
        if errors:
            raise ValueError("\n".join(errors))
        return FetchArea.from_municipalities(found)

    @staticmethod
    def _guessing(lookup: Callable[[str], T], name: str) -> T:
        """``lookup(guess)`` of the first :func:`official_name_guesses` of ``name`` that PDOK
        knows; the last guess's error when none."""
        *first, last = official_name_guesses(name)
        for guess in first:
            try:
                return lookup(guess)
            except ValueError as exc:
                if "no municipality" not in str(exc):  # several of that name: say so
                    raise
        return lookup(last)

    def _municipality(self, name: str) -> Municipality:
        return fetch_municipality(name, self.config.province, self.client(), self.endpoint)

    def _province(self, province: str) -> list[Municipality]:
        return fetch_province(province, self.client(), self.endpoint)


def official_name_guesses(name: str) -> list[str]:
    """``name`` as typed, then with each word capitalised (``amsterdam`` -> ``Amsterdam``,
    ``'s-gravenhage`` -> ``'s-Gravenhage``): PDOK's name filter is exact."""
    capitalised = re.sub(r"(^|[\s(-])([^\W\d_])", lambda m: m[1] + m[2].upper(), name.strip())
    return list(dict.fromkeys([name.strip(), capitalised]))
