"""``python -m train fetch``: build a real data root for a Dutch municipality from public services.

The municipality's outline (PDOK) fixes the RD bounding box of everything else. A plan is printed
first, one line per source (requests, size, time at the rate limit, key / cost / licence); then the
sources are fetched in data-flow order:

1. Leefbaarometer labels (WFS, or an imported release) for ``--year`` and ``--extra-years``,
   cells whose centre lies in the outline;
2. ``grid.parquet``: the municipality's 100 m cells, with buurt and district (Amsterdam's from
   ``assets/``, else the municipality's name) and a ``labelled`` flag;
3. the PDOK aerial mosaic of ``--year``;
4. OpenStreetMap streets, water and parks (Overpass, or a local ``.osm`` file);
5. Flickr photos and 6. Google Street View views along the OSM streets, into the catalog.

Every step is resumable: the clients skip what is on disk, and a step recorded as done in
``fetch.json`` with the same parameters is not run again (``--redo`` runs it anyway). A failing
step stops the fetch with a clear message; the steps before it stay done. ``fetch.json`` records
what was fetched, when, from where, counts and the licence of each source; never a key.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyogrio
from pyproj import Transformer

from core.dataroot import DataRoot
from core.grid import RD_NEW, cell_id, grid_for_boundary, to_geodataframe, write_grid
from core.io import write_atomic
from core.sources import flickr, gsv
from core.sources.catalog import REQUIRED_COLUMNS, WGS84, write_catalog
from core.sources.http import Estimate, FetchError, HttpClient, Politeness, redact
from core.sources.lbm import read_lbm
from core.sources.lbm_wfs import (
    LBM_POLITENESS,
    LBM_WFS_URL,
    estimate_lbm,
    fetch_lbm,
    import_lbm_release,
)
from core.sources.osm import (
    OSM_POLITENESS,
    OVERPASS_URL,
    estimate_osm,
    fetch_context,
    fetch_streets,
    import_context,
    import_streets,
)
from core.sources.pdok_boundaries import (
    PDOK_BOUNDARIES_URL,
    PDOK_POLITENESS,
    Municipality,
    estimate_municipality,
    fetch_municipality,
)
from core.sources.wmts import PDOK_WMTS, estimate_aerial, fetch_aerial

MANIFEST = "fetch.json"
SOURCES = ("lbm", "aerial", "osm", "flickr", "gsv")
#: Base URL of each service, overridable with ``--endpoint NAME=URL`` (mirrors, proxies, tests).
ENDPOINTS = {
    "pdok": PDOK_BOUNDARIES_URL,
    "lbm": LBM_WFS_URL,
    "wmts": PDOK_WMTS,
    "overpass": OVERPASS_URL,
    "flickr": flickr.FLICKR_REST,
    "gsv": gsv.GOOGLE_MAPS,
}
#: Politeness of each client, whose rate ``--rate NAME=RPS`` overrides (0 = no limit).
POLITENESS = {
    "pdok": PDOK_POLITENESS,
    "lbm": LBM_POLITENESS,
    "wmts": Politeness(),
    "overpass": OSM_POLITENESS,
    "flickr": flickr.API_POLITENESS,
    "flickr-images": flickr.IMAGE_POLITENESS,
    "gsv": gsv.POLITENESS,
}
#: The environment variable holding each keyed source's key, and where to get one.
KEYS = {
    "flickr": (flickr.API_KEY_ENV, "https://www.flickr.com/services/api/keys/"),
    "gsv": (gsv.API_KEY_ENV, "a Google Maps Platform key with the Street View Static API enabled"),
}
#: Licence and attribution of each source, recorded in the manifest.
LICENCES = {
    "pdok": "PDOK Bestuurlijke Gebieden (Kadaster): open data, CC0",
    "lbm": "Leefbaarometer 3.0 (Ministerie van BZK): open data, see leefbaarometer.nl",
    "aerial": "PDOK Luchtfoto RGB (Beeldmateriaal Nederland): CC BY 4.0, attribute Beeldmateriaal Nederland",
    "osm": "(c) OpenStreetMap contributors, ODbL 1.0",
    "flickr": "each photo under its owner's licence (catalog columns license, license_url, owner_name, "
    "photo_page); attribution needed",
    "gsv": "Google Maps Platform Terms of Service: images (c) Google, not to be stored long-term or "
    "redistributed",
}
#: What the demo city has and a fetch cannot produce (the trainers that need them say so).
NOT_FETCHED = {
    "street/flickr_scene_labels.csv": "scene labels: train scene-filter with --checkpoint (e.g. Places365) instead",
    "perception/votes.csv": "Place Pulse 2 votes: needed by perception and contrastive-eval",
    "socioeconomic/buurt_targets.csv": "CBS buurt targets: needed by contrastive-eval",
}
AMSTERDAM_CODE = "0363"
#: Metres of aerial imagery beyond the outline's box: a 256 m patch around an edge cell's centre.
AERIAL_MARGIN_M = 150.0
#: Assumed street length (OSM, footpaths and cycleways included) per 100 m cell, for the GSV plan
#: before the streets are fetched; the count is made from the streets before the GSV step.
STREET_M_PER_CELL = 250.0
FLICKR_SINCE = datetime(2004, 1, 1)  # Flickr opened in 2004


@dataclass
class FetchConfig:
    """One ``python -m train fetch``.

    Attributes:
        municipality: the official Dutch name (case-insensitive), e.g. ``Amsterdam``.
        out: the data root to fill.
        year: label year and aerial year.
        extra_years: more label years (the change between editions).
        sources: sources asked for explicitly; None: every source, those lacking a key skipped.
        province: the province, when the municipality's name is ambiguous.
        resolution: wanted aerial metres per pixel (the nearest WMTS level is used).
        flickr_since: earliest capture time of Flickr photos.
        flickr_licenses: Flickr licence ids to keep; None keeps all (recorded per photo).
        gsv_headings: compass headings of the Street View views.
        gsv_spacing_m: distance between Street View lookups along the streets.
        gsv_max_requests: refuse a Street View fetch needing more billed image requests.
        gsv_panos: a CSV/Parquet of extra panorama ids (``pano_id``; older captures, which the
            API finds only by id) to fetch as well.
        lbm_release: import this release (scores CSV, grid GeoPackage or None for one zip)
            instead of the WFS.
        osm_file: read streets, water and parks from this OSM XML file instead of Overpass.
        endpoints: base URL per service name (:data:`ENDPOINTS` overridden).
        rates: requests per second per client name (:data:`POLITENESS` overridden).
        redo: steps to run again even when recorded as done.
        dry_run: print the plan only.
        progress: show progress bars.
    """

    municipality: str
    out: Path
    year: int = 2020
    extra_years: tuple[int, ...] = ()
    sources: tuple[str, ...] | None = None
    province: str | None = None
    resolution: float = 0.25
    flickr_since: datetime = FLICKR_SINCE
    flickr_licenses: frozenset[int] | None = None
    gsv_headings: tuple[float, ...] = gsv.DEFAULT_HEADINGS
    gsv_spacing_m: float = 50.0
    gsv_max_requests: int | None = None
    gsv_panos: Path | None = None
    lbm_release: tuple[Path, Path | None] | None = None
    osm_file: Path | None = None
    endpoints: dict[str, str] = field(default_factory=lambda: dict(ENDPOINTS))
    rates: dict[str, float] = field(default_factory=dict)
    redo: tuple[str, ...] = ()
    dry_run: bool = False
    progress: bool = True

    @property
    def years(self) -> list[int]:
        """Label years, ``year`` first, each once."""
        return list(dict.fromkeys([self.year, *self.extra_years]))

    def politeness(self, name: str) -> Politeness:
        """The politeness of client ``name`` with its ``--rate`` applied."""
        base = POLITENESS[name]
        rate = self.rates.get(name, self.rates.get("all"))
        return base if rate is None else replace(base, requests_per_second=rate)


# --- command-line parsing --------------------------------------------------------------------


def _assignments(items: Iterable[str], known: Iterable[str], option: str) -> dict[str, str]:
    values = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value or name not in known:
            raise ValueError(
                f"{option} {item!r}: expected NAME=VALUE with NAME one of {sorted(known)}"
            )
        values[name] = value
    return values


def _licences(text: str) -> frozenset[int] | None:
    text = text.strip().lower()
    if text == "all":
        return None
    if text == "reusable":
        return flickr.REUSABLE_LICENSES
    try:
        return frozenset(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(
            f"--flickr-licenses {text!r}: expected comma-separated ids, 'reusable' or 'all'"
        ) from None


def config_from_args(args: argparse.Namespace) -> FetchConfig:
    """A :class:`FetchConfig` from the parsed ``fetch`` arguments.

    Raises:
        ValueError: naming the option, for a malformed value.
    """
    sources = None
    if args.sources:
        sources = tuple(dict.fromkeys(s.strip() for s in args.sources.split(",") if s.strip()))
        unknown = sorted(set(sources) - set(SOURCES))
        if unknown or not sources:
            raise ValueError(
                f"--sources {args.sources!r}: unknown {unknown}; choose from {list(SOURCES)}"
            )
    rates = _assignments(args.rate, [*POLITENESS, "all"], "--rate")
    try:
        since = datetime.fromisoformat(args.flickr_since)
        rate_values = {k: float(v) for k, v in rates.items()}
    except ValueError as exc:
        raise ValueError(f"--flickr-since / --rate: {exc}") from None
    if any(v < 0 for v in rate_values.values()):
        raise ValueError(f"--rate: requests per second cannot be negative: {rates}")
    release = None
    if args.lbm_release:
        parts = [Path(p) for p in args.lbm_release.split(",")]
        if len(parts) > 2:
            raise ValueError(f"--lbm-release {args.lbm_release!r}: expected CSV,GPKG or one zip")
        release = (parts[0], parts[1] if len(parts) == 2 else None)
    slug = re.sub(r"[^a-z0-9]+", "-", args.municipality.lower()).strip("-")
    return FetchConfig(
        municipality=args.municipality,
        out=Path(args.out or f"data/{slug}"),
        year=args.year,
        extra_years=tuple(args.extra_years),
        sources=sources,
        province=args.province,
        resolution=args.resolution,
        flickr_since=since,
        flickr_licenses=_licences(args.flickr_licenses),
        gsv_headings=tuple(args.gsv_headings),
        gsv_spacing_m=args.gsv_spacing,
        gsv_max_requests=args.gsv_max_requests,
        gsv_panos=Path(args.gsv_panos) if args.gsv_panos else None,
        lbm_release=release,
        osm_file=Path(args.osm_file) if args.osm_file else None,
        endpoints=ENDPOINTS | _assignments(args.endpoint, ENDPOINTS, "--endpoint"),
        rates=rate_values,
        redo=tuple(args.redo),
        dry_run=args.dry_run,
        progress=not args.quiet,
    )


# --- sources, keys and the plan --------------------------------------------------------------


def _key(source: str) -> str | None:
    """The key of a keyed source from its environment variable; None when unset."""
    return os.environ.get(KEYS[source][0], "").strip() or None


def choose_sources(config: FetchConfig) -> tuple[list[str], dict[str, str]]:
    """The sources to fetch and, for each source left out, why.

    Raises:
        ValueError: naming the environment variable, when a source asked for with ``sources``
            has no key.
    """
    asked = config.sources or SOURCES
    chosen, skipped = [], {}
    for source in SOURCES:
        if source not in asked:
            skipped[source] = "not in --sources"
            continue
        if source in KEYS and _key(source) is None:
            variable, where = KEYS[source]
            if config.sources is not None:
                raise ValueError(
                    f"{source} needs an API key: set the environment variable {variable} ({where})"
                )
            skipped[source] = f"no key: set {variable} ({where})"
            continue
        chosen.append(source)
    for path in filter(None, [*(config.lbm_release or ()), config.osm_file, config.gsv_panos]):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found")
    return chosen, skipped


@dataclass(frozen=True)
class PlanLine:
    """One source of the plan: its estimate, or why it is skipped."""

    source: str
    estimate: Estimate | None = None
    skipped: str = ""


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def format_plan(municipality: Municipality, root: Path, lines: list[PlanLine]) -> str:
    """The plan as text: the municipality, one line per source and the totals."""
    area = municipality.geometry.area / 1e6
    bounds = ", ".join(f"{v:.0f}" for v in municipality.bbox_rd)
    text = [
        f"fetch plan for {municipality.name} ({municipality.code}, {municipality.province}), "
        f"{area:.1f} km2, RD bbox {bounds} -> {root}"
    ]
    for line in lines:
        e = line.estimate
        if e is None:
            text.append(f"  {line.source:<8} skipped: {line.skipped}")
        else:
            text.append(
                f"  {line.source:<8} {e.source}: {e.requests:,} requests, {_size(e.bytes)}, "
                f"{_duration(e.seconds)} at the rate limit; {e.note}"
            )
    estimates = [line.estimate for line in lines if line.estimate is not None]
    text.append(
        f"  total: {sum(e.requests for e in estimates):,} requests, "
        f"{_size(sum(e.bytes for e in estimates))}, {_duration(sum(e.seconds for e in estimates))} "
        "at the rate limits (transfer time not included)"
    )
    return "\n".join(text)


def aerial_bbox(municipality: Municipality) -> tuple[float, float, float, float]:
    """The outline's box grown by :data:`AERIAL_MARGIN_M`."""
    minx, miny, maxx, maxy = municipality.bbox_rd
    m = AERIAL_MARGIN_M
    return minx - m, miny - m, maxx + m, maxy + m


def lonlat_bbox(municipality: Municipality) -> tuple[float, float, float, float]:
    """The outline's box in WGS84 (min lon, min lat, max lon, max lat), for Flickr."""
    to_lonlat = Transformer.from_crs(RD_NEW, WGS84, always_xy=True)
    return tuple(round(v, 6) for v in to_lonlat.transform_bounds(*municipality.bbox_rd))


def make_plan(
    config: FetchConfig, municipality: Municipality, chosen: list[str], skipped: dict[str, str]
) -> list[PlanLine]:
    """One :class:`PlanLine` per source, the outline first (asks the LBM WFS and Flickr for counts)."""
    root = DataRoot(config.out)
    lines = [PlanLine("pdok", estimate_municipality(config.politeness("pdok").requests_per_second))]
    for source in SOURCES:
        if source not in chosen:
            lines.append(PlanLine(source, skipped=skipped[source]))
            continue
        try:
            lines.append(PlanLine(source, _estimate(source, config, municipality, root)))
        except (FetchError, ValueError) as exc:  # the plan still shows the other sources
            lines.append(PlanLine(source, skipped=f"could not estimate: {_redacted(exc)}"))
    return lines


def _estimate(
    source: str, config: FetchConfig, municipality: Municipality, root: DataRoot
) -> Estimate:
    licence = LICENCES[source]
    if source == "lbm":
        if config.lbm_release is not None:
            return Estimate(
                "Leefbaarometer release import",
                0,
                0,
                0.0,
                f"from {', '.join(str(p) for p in config.lbm_release if p)}; {licence}",
            )
        e = estimate_lbm(
            municipality.bbox_rd, config.years, _client(config, "lbm"), config.endpoints["lbm"]
        )
        return replace(e, note=f"years {config.years}; {e.note} (terms: leefbaarometer.nl)")
    if source == "aerial":
        e = estimate_aerial(
            aerial_bbox(municipality), config.year, config.resolution, config.politeness("wmts")
        )
        return replace(e, note=f"{e.note}; CC BY 4.0 Beeldmateriaal Nederland")
    if source == "osm":
        if config.osm_file is not None:
            return Estimate(
                "OpenStreetMap file import", 0, 0, 0.0, f"from {config.osm_file}; {licence}"
            )
        return estimate_osm(
            municipality.geometry,
            requests_per_second=config.politeness("overpass").requests_per_second,
        )
    if source == "flickr":
        return flickr.estimate_flickr(
            lonlat_bbox(municipality),
            min_taken=config.flickr_since,
            licenses=config.flickr_licenses,
            api_key=_key("flickr"),
            client=_client(config, "flickr"),
            endpoint=config.endpoints["flickr"],
            image_politeness=config.politeness("flickr-images"),
        )
    if root.streets.is_file():
        locations = len(street_points(root, municipality, config.gsv_spacing_m))
        counted = "points along the streets on disk"
    else:
        cells = len(grid_for_boundary(municipality.geometry))
        locations = math.ceil(cells * STREET_M_PER_CELL / config.gsv_spacing_m)
        counted = (
            f"points assumed from {cells:,} cells x {STREET_M_PER_CELL:.0f} m of street, recounted "
            "from the streets before the Street View step"
        )
    extra = len(gsv.read_pano_ids(config.gsv_panos)) if config.gsv_panos else 0
    e = gsv.estimate_gsv(locations, config.gsv_headings, extra, politeness=config.politeness("gsv"))
    return replace(e, note=f"{locations:,} {counted}; {e.note}; {licence}")


def _client(config: FetchConfig, name: str, secrets: Iterable[str] = ()) -> HttpClient:
    return HttpClient(config.politeness(name), secrets=secrets)


def _redacted(exc: BaseException) -> str:
    return redact(
        str(exc),
        [
            k
            for k in (
                _key("flickr"),
                _key("gsv"),
                os.environ.get(gsv.SIGNING_SECRET_ENV, "").strip(),
            )
            if k
        ],
    )


def official_name_guesses(name: str) -> list[str]:
    """``name`` as typed, then with each word capitalised (``amsterdam`` -> ``Amsterdam``,
    ``'s-gravenhage`` -> ``'s-Gravenhage``): PDOK's name filter is exact."""
    capitalised = re.sub(r"(^|[\s(-])([^\W\d_])", lambda m: m[1] + m[2].upper(), name.strip())
    return list(dict.fromkeys([name.strip(), capitalised]))


def find_municipality(config: FetchConfig) -> Municipality:
    """The municipality's outline from PDOK, trying :func:`official_name_guesses` in turn.

    Raises:
        ValueError: naming the name as typed, when no guess is a municipality (or several are).
    """
    *first, last = official_name_guesses(config.municipality)
    for guess in first:
        try:
            return fetch_municipality(
                guess, config.province, _client(config, "pdok"), config.endpoints["pdok"]
            )
        except ValueError as exc:
            if "no municipality named" not in str(exc):  # several of that name: say so
                raise
    return fetch_municipality(
        last, config.province, _client(config, "pdok"), config.endpoints["pdok"]
    )


# --- the manifest ----------------------------------------------------------------------------


def _now() -> str:
    return pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples as lists, paths as text)."""
    return json.loads(json.dumps(value, default=str))


class Manifest:
    """``fetch.json`` of a data root: what each step fetched, rewritten after every step."""

    def __init__(self, root: DataRoot, header: dict[str, Any]) -> None:
        self.path = root.root / MANIFEST
        self.root = root
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data = {
            "created": old.get("created", _now()),
            **_plain(header),
            "steps": old.get("steps", {}),
        }

    def done(self, step: str, params: Mapping[str, Any]) -> bool:
        """Whether ``step`` is recorded as done with these parameters and its outputs exist."""
        entry = self.data["steps"].get(step, {})
        return (
            entry.get("status") == "done"
            and entry.get("params") == _plain(params)
            and all((self.root.root / p).exists() for p in entry.get("outputs", []))
        )

    def record(self, step: str, params: Mapping[str, Any], status: str, **info: Any) -> None:
        """Record a step's outcome and rewrite the file atomically."""
        self.data["steps"][step] = _plain(
            {"status": status, "finished": _now(), "params": params, **info}
        )
        self.data["updated"] = _now()
        text = json.dumps(self.data, indent=2)
        write_atomic(self.path, lambda tmp: tmp.write_text(text))


# --- the steps -------------------------------------------------------------------------------

#: A step's parameters (what makes it the same step on a rerun) and the function running it,
#: which returns what the manifest records (``outputs``: paths relative to the root, counts).
Step = tuple[dict[str, Any], Callable[[], dict[str, Any]]]


def _relative(root: DataRoot, *paths: Path) -> list[str]:
    return [os.path.relpath(p, root.root) for p in paths]


def _lbm_step(config: FetchConfig, municipality: Municipality, root: DataRoot) -> Step:
    outline = municipality.geometry
    if config.lbm_release is not None:
        params = {"release": [str(p) for p in config.lbm_release if p], "years": config.years}

        def run() -> tuple[Path, Path]:
            scores, grid = config.lbm_release
            return import_lbm_release(root, scores, grid, boundary=outline, years=config.years)
    else:
        params = {
            "endpoint": config.endpoints["lbm"],
            "years": config.years,
            "bbox": municipality.bbox_rd,
        }

        def run() -> tuple[Path, Path]:
            return fetch_lbm(
                root,
                municipality.bbox_rd,
                config.years,
                boundary=outline,
                client=_client(config, "lbm"),
                endpoint=config.endpoints["lbm"],
            )

    def step() -> dict:
        paths = run()
        labels = read_lbm(root.scores, root.lbm_grid)
        return {
            "outputs": _relative(root, *paths),
            "cells_per_year": {str(y): int(n) for y, n in labels.groupby("jaar").size().items()},
        }

    return params, step


def build_grid(root: DataRoot, municipality: Municipality) -> int:
    """Write ``grid.parquet``: the municipality's cells with buurt, district and ``labelled``.

    Amsterdam's cells get their buurt and stadsdeel from ``assets/``; elsewhere (and in Amsterdam's
    cells outside every buurt) the district is the municipality's name.

    Returns:
        The number of cells.
    """
    ids = grid_for_boundary(municipality.geometry)
    labelled = np.zeros(len(ids), bool)
    if root.scores.is_file() and root.lbm_grid.is_file():
        label_ids = read_lbm(root.scores, root.lbm_grid)["cell_id"].unique()
        ids = np.union1d(ids, label_ids)
        labelled = np.isin(ids, label_ids)
    if municipality.code.removeprefix("GM") == AMSTERDAM_CODE:
        from core.sources.boundaries import assign_buurten  # reads the assets' buurten only here

        places = assign_buurten(ids)
    else:
        places = pd.DataFrame(
            {c: "" for c in ("buurt_code", "buurt_naam", "cbs_code", "district")},
            index=range(len(ids)),
        )
    places["district"] = places["district"].replace("", municipality.name)
    write_grid(
        to_geodataframe(ids, **{c: places[c].to_numpy() for c in places}, labelled=labelled),
        root.grid,
    )
    return len(ids)


def _aerial_step(config: FetchConfig, municipality: Municipality, root: DataRoot) -> Step:
    bbox = aerial_bbox(municipality)
    params = {
        "endpoint": config.endpoints["wmts"],
        "year": config.year,
        "resolution": config.resolution,
        "bbox": bbox,
    }

    def step() -> dict:
        done = fetch_aerial(
            root.root,
            bbox,
            config.year,
            resolution=config.resolution,
            endpoint=config.endpoints["wmts"],
            client=_client(config, "wmts"),
            progress=config.progress,
        )
        return {
            "outputs": _relative(root, done.path),
            "layer": done.layer,
            "tile_matrix": done.matrix.identifier,
            "metres_per_pixel": round(done.matrix.resolution, 4),
            "tiles": len(done.tiles),
            "fetched": done.fetched,
            "skipped": done.skipped,
            "missing": len(done.missing),
        }

    return params, step


def _osm_step(config: FetchConfig, municipality: Municipality, root: DataRoot) -> Step:
    outline = municipality.geometry
    if config.osm_file is not None:
        params = {"file": str(config.osm_file)}

        def run() -> tuple[Path, ...]:
            return (
                import_streets(root, config.osm_file, outline),
                *import_context(root, config.osm_file, outline),
            )
    else:
        params = {"endpoint": config.endpoints["overpass"], "bbox": municipality.bbox_rd}

        def run() -> tuple[Path, ...]:
            client = _client(config, "overpass")
            url = config.endpoints["overpass"]
            return (
                fetch_streets(root, outline, client, url),
                *fetch_context(root, outline, client, url),
            )

    def step() -> dict:
        paths = run()
        counts = {
            layer: int(pyogrio.read_info(root.streets, layer=layer)["features"])
            for layer in ("nodes", "edges")
        }
        return {
            "outputs": _relative(root, *paths),
            "street_nodes": counts["nodes"],
            "street_edges": counts["edges"],
        }

    return params, step


def _flickr_step(config: FetchConfig, municipality: Municipality, root: DataRoot) -> Step:
    bbox = lonlat_bbox(municipality)
    licences = None if config.flickr_licenses is None else sorted(config.flickr_licenses)
    params = {
        "endpoint": config.endpoints["flickr"],
        "bbox_lonlat": bbox,
        "since": config.flickr_since.isoformat(),
        "licenses": licences,
    }

    def step() -> dict:
        key = _key("flickr")
        until = datetime.now().replace(microsecond=0)
        done = flickr.fetch_flickr(
            root,
            bbox,
            min_taken=config.flickr_since,
            max_taken=until,
            licenses=config.flickr_licenses,
            api_key=key,
            client=_client(config, "flickr", [key]),
            image_client=_client(config, "flickr-images", [key]),
            endpoint=config.endpoints["flickr"],
            progress=config.progress,
        )
        return {
            "outputs": _relative(root, done.catalog),
            "until": until.isoformat(),
            "photos": len(done.rows),
            "fetched": done.report.fetched,
            "skipped": done.report.skipped,
            "photos_per_licence": {
                str(k): int(n) for k, n in done.rows["license"].value_counts().items()
            },
        }

    return params, step


def street_points(root: DataRoot, municipality: Municipality, spacing_m: float) -> np.ndarray:
    """WGS84 points every ``spacing_m`` along the streets whose cell is in the municipality."""
    points = gsv.street_points_lonlat(root.streets, spacing_m)
    x, y = Transformer.from_crs(WGS84, RD_NEW, always_xy=True).transform(points[:, 0], points[:, 1])
    return points[np.isin(cell_id(x, y), grid_for_boundary(municipality.geometry))]


def _gsv_step(
    config: FetchConfig, municipality: Municipality, root: DataRoot, say: Callable[[str], None]
) -> Step:
    params = {
        "endpoint": config.endpoints["gsv"],
        "headings": config.gsv_headings,
        "spacing_m": config.gsv_spacing_m,
        "panos": config.gsv_panos,
    }

    def step() -> dict:
        key = _key("gsv")
        secret = os.environ.get(gsv.SIGNING_SECRET_ENV, "").strip()
        if root.streets.is_file():
            points = street_points(root, municipality, config.gsv_spacing_m)
        else:
            say(
                "gsv: no streets on disk (add osm to --sources); looking for panoramas at the cell centres"
            )
            points = gsv.cell_centres_lonlat(root.grid)
        extra = len(gsv.read_pano_ids(config.gsv_panos)) if config.gsv_panos else 0
        e = gsv.estimate_gsv(
            len(points), config.gsv_headings, extra, politeness=config.politeness("gsv")
        )
        say(f"gsv: {len(points):,} lookup points; {e.note}")
        done = gsv.fetch_gsv(
            root,
            points,
            headings=config.gsv_headings,
            pano_csv=config.gsv_panos,
            max_requests=config.gsv_max_requests,
            api_key=key,
            client=_client(config, "gsv", [key, secret]),
            endpoint=config.endpoints["gsv"],
            progress=config.progress,
        )
        return {
            "outputs": _relative(root, done.catalog),
            "lookup_points": len(points),
            "panoramas": int(done.rows["pano_id"].nunique()),
            "views": len(done.rows),
            "fetched": done.report.fetched,
            "skipped": done.report.skipped,
            "copyright": {str(k): int(n) for k, n in done.rows["copyright"].value_counts().items()},
        }

    return params, step


def ensure_catalog(root: DataRoot) -> bool:
    """Write an empty catalog when no street-level source wrote one, so that readers and
    ``summary`` work on an aerial-only root; True if written."""
    if root.catalog.exists():
        return False
    write_catalog(pd.DataFrame({c: [] for c in (*REQUIRED_COLUMNS, "x", "y")}), root.catalog)
    return True


# --- the command -----------------------------------------------------------------------------


def run_fetch(config: FetchConfig, say: Callable[[str], None] = print) -> int:
    """Print the plan, then (unless a dry run) fetch every chosen source into ``config.out``.

    Returns:
        0 when done, 1 when a step failed (the steps before it are kept and recorded).

    Raises:
        ValueError, FileNotFoundError: for a keyed source asked for without its key, a missing
            import file, or an unknown or ambiguous municipality.
        FetchError: when the municipality's outline cannot be fetched.
    """
    chosen, skipped = choose_sources(config)
    municipality = find_municipality(config)
    say(format_plan(municipality, config.out, make_plan(config, municipality, chosen, skipped)))
    if config.dry_run:
        say("dry run: nothing fetched")
        return 0

    root = DataRoot(config.out)
    root.root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(
        root,
        {
            "municipality": {
                "name": municipality.name,
                "code": municipality.code,
                "province": municipality.province,
                "area_km2": round(municipality.geometry.area / 1e6, 3),
                "bbox_rd": municipality.bbox_rd,
            },
            "year": config.year,
            "label_years": config.years,
            "sources": chosen,
            "skipped": skipped,
            "endpoints": {name: redact(url) for name, url in config.endpoints.items()},
            "licences": {s: LICENCES[s] for s in ("pdok", *SOURCES)},
            "not_fetched": NOT_FETCHED,
        },
    )
    steps: list[tuple[str, Step, str]] = []
    if "lbm" in chosen:
        steps.append(("lbm", _lbm_step(config, municipality, root), LICENCES["lbm"]))
    steps.append(
        (
            "grid",
            (
                {
                    "municipality": municipality.code,
                    "label_years": config.years if "lbm" in chosen else [],
                },
                lambda: {
                    "outputs": _relative(root, root.grid),
                    "cells": build_grid(root, municipality),
                },
            ),
            "",
        )
    )
    builders = {"aerial": _aerial_step, "osm": _osm_step, "flickr": _flickr_step}
    for source in ("aerial", "osm", "flickr"):
        if source in chosen:
            steps.append((source, builders[source](config, municipality, root), LICENCES[source]))
    if "gsv" in chosen:
        steps.append(("gsv", _gsv_step(config, municipality, root, say), LICENCES["gsv"]))

    for name, (params, step), licence in steps:
        if name not in config.redo and manifest.done(name, params):
            say(f"{name}: done before, skipped (--redo {name} runs it again)")
            continue
        say(f"{name}: fetching ...")
        try:
            info = step()
        except (FetchError, ValueError, FileNotFoundError, OSError) as exc:
            message = _redacted(exc)
            manifest.record(name, params, "failed", error=message, licence=licence)
            say(
                f"error: {name} failed: {message}\nthe steps before it are kept in {root.root} "
                f"(see {MANIFEST}); rerun the same command to resume"
            )
            return 1
        manifest.record(name, params, "done", licence=licence, **info)
        say(f"{name}: done " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "outputs"))
    if ensure_catalog(root):
        say(f"no street-level images fetched: wrote an empty {root.catalog}")
    say(f"fetched into {root.root}; see {root.root / MANIFEST}")
    return 0
