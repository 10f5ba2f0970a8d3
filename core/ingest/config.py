"""What one fetch is asked to do: :class:`FetchConfig`, the single source of the ``fetch``
command line (every field an option of the same name, its attribute docstring the help text).

This module imports neither the geo stack nor ``requests``, so ``--help`` stays fast. The valid
source, step, endpoint and client names are therefore spelt out here; a test checks them
against the registry :data:`core.ingest.steps.SOURCES`, where they come from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

SourceName = Literal["lbm", "aerial", "osm", "flickr", "gsv", "amsterdam_panorama", "mapillary"]
StepName = Literal[
    "lbm", "grid", "aerial", "osm", "flickr", "gsv", "amsterdam_panorama", "mapillary"
]
#: The sources in data-flow order: the keys of :data:`core.ingest.steps.SOURCES`.
SOURCE_NAMES: tuple[str, ...] = SourceName.__args__
#: The steps a fetch records in ``fetch.json``: the sources, with the grid after the labels.
STEP_NAMES: tuple[str, ...] = StepName.__args__
#: Services whose base URL ``--endpoint`` overrides: the outline's (PDOK), then each source's.
ENDPOINT_NAMES: tuple[str, ...] = (
    "pdok",
    "lbm",
    "wmts",
    "overpass",
    "flickr",
    "gsv",
    "amsterdam_panorama",
    "mapillary",
)
#: HTTP clients whose rate ``--rate`` sets (besides ``all``): the outline's, then each source's.
CLIENT_NAMES: tuple[str, ...] = (
    "pdok",
    "lbm",
    "wmts",
    "overpass",
    "flickr",
    "flickr-images",
    "gsv",
    "amsterdam_panorama",
    "amsterdam_panorama-images",
    "mapillary",
    "mapillary-images",
)
#: Sources a fetch runs only when --sources names them (a whole city's panoramas is large).
OPT_IN_SOURCES: tuple[str, ...] = ("amsterdam_panorama", "mapillary")
DEFAULT_HEADINGS = (0.0, 90.0, 180.0, 270.0)
#: The ``municipality`` that asks for every municipality of ``province``.
EVERY_MUNICIPALITY = "all"


def _option(name: str) -> str:
    """The command-line spelling of field ``name``: ``flickr_since`` -> ``--flickr-since``."""
    return "--" + name.replace("_", "-")


def _names(values: list[str] | None, known: tuple[str, ...], name: str) -> None:
    unknown = [v for v in values or () if v not in known]
    if unknown:
        raise ValueError(f"{_option(name)} {values}: unknown {unknown}; choose from {list(known)}")


@dataclass
class FetchConfig:
    """One fetch of a data root for one Dutch municipality, several, or every municipality of a
    province, from public services (``fetch``).

    Raises:
        ValueError: on construction, naming the option, for a malformed or unknown value.
    """

    municipality: str | list[str]
    """Official Dutch name of the municipality, case-insensitive: amsterdam, utrecht,
    "'s-Gravenhage", "Bergen (NH)"; several comma-separated (amsterdam,amstelveen,diemen) for one
    root over their union; or all, with --province, for every municipality of that province."""
    out: str | None = None
    """Data root to fill (default: data/<municipality> for one, lower case, other characters as
    -; data/<first>-and-<N>-more for several; data/<province> for all)."""
    year: int = 2020
    """Label year and aerial year: a Leefbaarometer edition and PDOK orthophoto year, e.g.
    2020."""
    extra_years: list[int] = field(default_factory=list)
    """More Leefbaarometer editions to fetch besides --year, e.g. 2018 2016 (the change between
    editions)."""
    aerial_years: list[int] = field(default_factory=list)
    """More PDOK orthophoto years to fetch besides --year, each as aerial/<year>.tif, e.g. 2023
    2024 (imagery newer than the labels, for predict and the Monitor page)."""
    sources: list[SourceName] | None = None
    """Sources to fetch, in any order: lbm, aerial, osm, flickr, gsv, amsterdam_panorama,
    mapillary (default: lbm, aerial, osm, flickr and gsv; flickr and gsv are then skipped without
    their key, while asking for a keyed source without it is an error; amsterdam_panorama and
    mapillary run only when named)."""
    province: str | None = None
    """The municipalities' province, when a name is ambiguous, e.g. Limburg; with the
    municipality all, the province to fetch whole, e.g. Noord-Holland."""
    resolution: float = 0.25
    """Wanted aerial metres per pixel (> 0); the nearest PDOK level is used (0.25 -> 0.21 m,
    0.42, 0.84, ...)."""
    flickr_since: str = "2004-01-01"
    """Earliest capture time of Flickr photos, an ISO date or date-time (Flickr opened in
    2004)."""
    flickr_licenses: str = "all"
    """Flickr licence ids to keep: 'all' (each photo's licence is recorded), 'reusable' (4, 5,
    7, 8, 9, 10: CC BY, CC BY-SA, no known restrictions, US government, CC0, public domain) or
    comma-separated ids, e.g. 4,5,9."""
    gsv_headings: list[float] = field(default_factory=lambda: list(DEFAULT_HEADINGS))
    """Compass headings of the Street View views of each panorama, degrees."""
    gsv_spacing: float = 50.0
    """Metres between Street View lookups along the streets (> 0)."""
    gsv_max_requests: int | None = None
    """Stop before any billed request if Street View needs more image requests than this
    (default: no limit)."""
    gsv_panos: str | None = None
    """A CSV or Parquet file of extra Street View panorama ids (column pano_id) to fetch as well:
    older captures, which the API finds only by id."""
    panorama_since: str | None = None
    """Earliest capture date of Amsterdam panoramas, an ISO date, e.g. 2018-01-01 (default:
    all, from 2016)."""
    panorama_until: str | None = None
    """Latest capture date of Amsterdam panoramas, an ISO date (default: today)."""
    panorama_headings: list[float] = field(default_factory=lambda: list(DEFAULT_HEADINGS))
    """Compass headings of the perspective views cut from each Amsterdam panorama, degrees."""
    panorama_fov: float = 90.0
    """Horizontal field of view of the Amsterdam panorama views, degrees (0 < fov < 180)."""
    mapillary_since: str | None = None
    """Earliest capture time of Mapillary images, an ISO date or date-time (default: all)."""
    lbm_release: list[str] | None = None
    """Import a downloaded Leefbaarometer release instead of the WFS: the scores CSV and the
    grid GeoPackage, or one zip holding both."""
    osm_file: str | None = None
    """Read streets, water and parks from this OSM file (.osm, .osm.gz, .osm.bz2, or a .osm.pbf
    extract) instead of Overpass."""
    endpoint: dict[str, str] = field(default_factory=dict)
    """Another base URL per service (a mirror, a proxy, a test server), by service name: pdok,
    lbm, wmts, overpass, flickr, gsv, amsterdam_panorama, mapillary."""
    rate: dict[str, float] = field(default_factory=dict)
    """Requests per second per HTTP client (0 = no limit), by client name: pdok, lbm, wmts,
    overpass, flickr, flickr-images, gsv, amsterdam_panorama, amsterdam_panorama-images,
    mapillary, mapillary-images, or all."""
    redo: list[StepName] = field(default_factory=list)
    """Steps to run again even when fetch.json records them as done: lbm, grid, aerial, osm,
    flickr, gsv, amsterdam_panorama, mapillary."""
    dry_run: bool = False
    """Print the plan (requests, size, time, cost, licences) and stop."""
    quiet: bool = False
    """No progress bars."""

    def __post_init__(self) -> None:
        names = self.names
        if not names:
            raise ValueError("municipality: give the municipality's official name")
        if EVERY_MUNICIPALITY in (n.lower() for n in names):
            if len(names) > 1:
                raise ValueError(
                    f"municipality {names}: {EVERY_MUNICIPALITY!r} stands alone (every "
                    "municipality of --province)"
                )
            if not (self.province or "").strip():
                raise ValueError(
                    f"municipality {EVERY_MUNICIPALITY!r}: give the province with --province, "
                    "e.g. Noord-Holland"
                )
        if self.sources is not None:
            if not self.sources:
                raise ValueError(f"--sources: give at least one of {list(SOURCE_NAMES)}")
            _names(self.sources, SOURCE_NAMES, "sources")
            self.sources = list(dict.fromkeys(self.sources))
        _names(self.redo, STEP_NAMES, "redo")
        self.year = int(self.year)
        self.extra_years = [int(y) for y in self.extra_years]
        self.aerial_years = [
            y for y in dict.fromkeys(int(y) for y in self.aerial_years) if y != self.year
        ]
        self.resolution = float(self.resolution)
        self.gsv_spacing = float(self.gsv_spacing)
        self.gsv_headings = [float(h) for h in self.gsv_headings]
        for name, value in (("resolution", self.resolution), ("gsv_spacing", self.gsv_spacing)):
            if not value > 0:
                raise ValueError(f"{_option(name)} {value}: must be > 0")
        if not self.gsv_headings:
            raise ValueError("--gsv-headings: give at least one heading")
        _datetime(self.flickr_since)
        for name in ("panorama_since", "panorama_until", "mapillary_since"):
            if getattr(self, name) is not None:
                _datetime(getattr(self, name), name)
        self.panorama_headings = [float(h) for h in self.panorama_headings]
        self.panorama_fov = float(self.panorama_fov)
        if not self.panorama_headings:
            raise ValueError("--panorama-headings: give at least one heading")
        if not 0 < self.panorama_fov < 180:
            raise ValueError(f"--panorama-fov {self.panorama_fov}: must be in (0, 180)")
        _licence_choice(self.flickr_licenses)
        if self.lbm_release is not None and not 1 <= len(self.lbm_release) <= 2:
            raise ValueError(
                f"--lbm-release {self.lbm_release}: expected the scores CSV and the grid "
                "GeoPackage, or one zip holding both"
            )
        for name, value in self.endpoint.items():
            if name not in ENDPOINT_NAMES or not value:
                raise ValueError(
                    f"--endpoint {name}={value}: expected NAME=VALUE with NAME one of "
                    f"{list(ENDPOINT_NAMES)}"
                )
        rates = {}
        for name, value in self.rate.items():
            if name not in (*CLIENT_NAMES, "all"):
                raise ValueError(
                    f"--rate {name}={value}: expected NAME=VALUE with NAME one of "
                    f"{[*CLIENT_NAMES, 'all']}"
                )
            try:
                rates[name] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"--rate {name}={value}: not a number") from None
        if any(v < 0 for v in rates.values()):
            raise ValueError(f"--rate: requests per second cannot be negative: {rates}")
        self.rate = rates

    @property
    def names(self) -> list[str]:
        """The municipality names asked for, as typed, each once (a string is split at
        commas)."""
        given = [self.municipality] if isinstance(self.municipality, str) else self.municipality
        names = (n.strip() for name in given for n in str(name).split(","))
        return list(dict.fromkeys(n for n in names if n))

    @property
    def whole_province(self) -> bool:
        """Whether every municipality of ``province`` is asked for."""
        return [n.lower() for n in self.names] == [EVERY_MUNICIPALITY]

    @property
    def out_path(self) -> Path:
        """The data root: ``out``, else ``data/<municipality>`` for one, ``data/<first>-and-<N>-
        more`` for several, ``data/<province>`` for a whole province (lower case, other
        characters as ``-``)."""
        if self.out:
            return Path(self.out)
        first, *more = self.names
        name = self.province if self.whole_province else first
        slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
        return Path(f"data/{slug}" + (f"-and-{len(more)}-more" if more else ""))

    @property
    def years(self) -> list[int]:
        """Label years, ``year`` first, each once."""
        return list(dict.fromkeys([self.year, *self.extra_years]))

    @property
    def since(self) -> datetime:
        """``flickr_since`` as a datetime."""
        return _datetime(self.flickr_since)

    def date_of(self, name: str) -> datetime | None:
        """The date option ``name`` (``panorama_since``, ...) parsed; None when unset."""
        text = getattr(self, name)
        return None if text is None else _datetime(text, name)

    @property
    def licence_ids(self) -> frozenset[int] | None:
        """The Flickr licence ids to keep; None keeps every licence."""
        choice = _licence_choice(self.flickr_licenses)
        if choice == "reusable":
            from core.sources.flickr import REUSABLE_LICENSES

            return REUSABLE_LICENSES
        return choice

    @property
    def release(self) -> tuple[Path, Path | None] | None:
        """The Leefbaarometer release to import: (scores, grid), grid None for one zip."""
        if self.lbm_release is None:
            return None
        scores, *grid = (Path(p) for p in self.lbm_release)
        return scores, grid[0] if grid else None

    @property
    def input_files(self) -> list[Path]:
        """The local files the fetch reads (release, OSM file, panorama ids)."""
        files = [*(p for p in self.release or () if p), self.osm_file, self.gsv_panos]
        return [Path(p) for p in files if p]

    @property
    def show_progress(self) -> bool:
        """Whether to show progress bars."""
        return not self.quiet

    def rate_for(self, client: str) -> float | None:
        """Requests per second of HTTP client ``client`` (its own ``--rate``, else ``all``);
        None keeps the client's default."""
        return self.rate.get(client, self.rate.get("all"))


def _datetime(text: str, name: str = "flickr_since") -> datetime:
    """A date option (``flickr_since`` and the like) parsed."""
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise ValueError(
            f"{_option(name)} {text!r}: expected an ISO date such as 2004-01-01"
        ) from None


def _licence_choice(text: str) -> frozenset[int] | Literal["reusable"] | None:
    """``flickr_licenses`` parsed: None (all), ``"reusable"`` or the ids."""
    choice = text.strip().lower()
    if choice == "all":
        return None
    if choice == "reusable":
        return "reusable"
    try:
        ids = frozenset(int(v) for v in choice.split(",") if v.strip())
    except ValueError:
        ids = frozenset()
    if not ids:
        raise ValueError(
            f"--flickr-licenses {text!r}: expected comma-separated ids, 'reusable' or 'all'"
        )
    return ids
