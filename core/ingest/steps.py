"""The download sources of a fetch, one :class:`~core.ingest.source.Source` each, and their
registry :data:`SOURCES` in data-flow order:

1. ``lbm``: Leefbaarometer labels (WFS, or an imported release) for the label years, cells
   whose centre lies in the outline (then the grid is built, see :mod:`core.ingest.grid`);
2. ``aerial``: the PDOK aerial mosaic of the year;
3. ``osm``: OpenStreetMap streets, water and parks (Overpass, or a local OSM file);
4. ``flickr``: Flickr photos, and 5. ``gsv``: Google Street View views along the OSM streets,
   into the catalog;
6. ``amsterdam_panorama``: the City of Amsterdam's panoramas cut into views, and
   7. ``mapillary``: Mapillary images, into the catalog (both only when ``--sources`` names
   them; their search answers are cached under ``cache/http/``).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyogrio
from pyproj import Transformer
from typing_extensions import override

from core.dataroot import DataRoot
from core.grid import RD_NEW, Bounds, cell_id, grid_for_boundary
from core.ingest.area import FetchArea, Outline
from core.ingest.source import Say, Service, Source, outputs
from core.sources import amsterdam_panorama, flickr, gsv, mapillary
from core.sources.catalog import WGS84
from core.sources.http import Estimate, Politeness, redact
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
from core.sources.wmts import PDOK_WMTS, estimate_aerial, fetch_aerial


class LbmSource(Source):
    """Leefbaarometer 3.0 labels of the label years: from the WFS, or from a downloaded release
    (``lbm_release``)."""

    name = "lbm"
    licence = "Leefbaarometer 3.0 (Ministerie van BZK): open data, see leefbaarometer.nl"
    service = "lbm"
    endpoint = LBM_WFS_URL
    politeness = {"lbm": LBM_POLITENESS}
    feeds_grid = True

    @override
    def params(self, area: FetchArea) -> dict[str, Any]:
        if self.config.release is not None:
            return {"release": self._release_files(), "years": self.config.years}
        return {"endpoint": self.endpoint, "years": self.config.years, "bbox": area.bbox_rd}

    @override
    def estimate(self, root: DataRoot, area: FetchArea) -> Estimate:
        if self.config.release is not None:
            files = ", ".join(self._release_files())
            return Estimate(
                "Leefbaarometer release import", 0, 0, 0.0, f"from {files}; {self.licence}"
            )
        years = self.config.years
        e = estimate_lbm(area.bbox_rd, years, self.client(), self.endpoint)
        return replace(e, note=f"years {years}; {e.note} (terms: leefbaarometer.nl)")

    @override
    def fetch(self, root: DataRoot, area: FetchArea, say: Say = print) -> dict[str, Any]:
        years = self.config.years
        if self.config.release is not None:
            scores, grid = self.config.release
            paths = import_lbm_release(root, scores, grid, boundary=area.outline, years=years)
        else:
            paths = fetch_lbm(
                root,
                area.bbox_rd,
                years,
                boundary=area.outline,
                client=self.client(),
                endpoint=self.endpoint,
            )
        labels = read_lbm(root.scores, root.lbm_grid)
        return {
            "outputs": outputs(root, *paths),
            "cells_per_year": {str(y): int(n) for y, n in labels.groupby("jaar").size().items()},
        }

    def _release_files(self) -> list[str]:
        return [str(p) for p in self.config.release or () if p]


class AerialSource(Source):
    """The PDOK aerial orthomosaic of ``year`` over the outline's box and a margin
    (``aerial/aerial.tif``), and of each of ``aerial_years`` (``aerial/<year>.tif``)."""

    name = "aerial"
    licence = (
        "PDOK Luchtfoto RGB (Beeldmateriaal Nederland): CC BY 4.0, attribute Beeldmateriaal "
        "Nederland"
    )
    service = "wmts"
    endpoint = PDOK_WMTS
    politeness = {"wmts": Politeness()}
    margin_m: ClassVar[float] = 150.0
    """Metres of imagery beyond the outline's box: a 256 m patch around an edge cell's centre."""

    @classmethod
    def bbox_rd(cls, area: FetchArea) -> Bounds:
        """The outline's box grown by :attr:`margin_m`."""
        minx, miny, maxx, maxy = area.bbox_rd
        m = cls.margin_m
        return minx - m, miny - m, maxx + m, maxy + m

    @override
    def params(self, area: FetchArea) -> dict[str, Any]:
        params = {
            "endpoint": self.endpoint,
            "year": self.config.year,
            "resolution": self.config.resolution,
            "bbox": self.bbox_rd(area),
        }
        if self.config.aerial_years:  # only then, so earlier fetches stay done
            params["other_years"] = self.config.aerial_years
        return params

    @override
    def estimate(self, root: DataRoot, area: FetchArea) -> Estimate:
        c = self.config
        years = [c.year, *c.aerial_years]
        each = [
            estimate_aerial(self.bbox_rd(area), y, c.resolution, self.politeness["wmts"])
            for y in years
        ]
        first = each[0]
        return replace(
            first,
            source=first.source + "".join(f" + {y}" for y in c.aerial_years),
            requests=sum(e.requests for e in each),
            bytes=sum(e.bytes for e in each),
            note=f"{first.note}; CC BY 4.0 Beeldmateriaal Nederland",
        )

    @override
    def fetch(self, root: DataRoot, area: FetchArea, say: Say = print) -> dict[str, Any]:
        years = [self.config.year, *self.config.aerial_years]
        done = [
            fetch_aerial(
                root.root,
                self.bbox_rd(area),
                year,
                resolution=self.config.resolution,
                endpoint=self.endpoint,
                client=self.client(),
                show_progress=self.config.show_progress,
                mosaic_name="aerial.tif" if year == self.config.year else f"{year}.tif",
            )
            for year in years
        ]
        main = done[0]
        return {
            "outputs": outputs(root, *(d.path for d in done)),
            "layer": main.layer,
            "other_layers": [d.layer for d in done[1:]],
            "tile_matrix": main.matrix.identifier,
            "metres_per_pixel": round(main.matrix.resolution, 4),
            "tiles": sum(len(d.tiles) for d in done),
            "fetched": sum(d.fetched for d in done),
            "skipped": sum(d.skipped for d in done),
            "missing": sum(len(d.missing) for d in done),
        }


class OsmSource(Source):
    """OpenStreetMap streets, water and parks: from Overpass, or from a local file
    (``osm_file``)."""

    name = "osm"
    licence = "(c) OpenStreetMap contributors, ODbL 1.0"
    service = "overpass"
    endpoint = OVERPASS_URL
    politeness = {"overpass": OSM_POLITENESS}

    @override
    def params(self, area: FetchArea) -> dict[str, Any]:
        if self.config.osm_file is not None:
            return {"file": str(Path(self.config.osm_file))}
        return {"endpoint": self.endpoint, "bbox": area.bbox_rd}

    @override
    def estimate(self, root: DataRoot, area: FetchArea) -> Estimate:
        if self.config.osm_file is not None:
            return Estimate(
                "OpenStreetMap file import",
                0,
                0,
                0.0,
                f"from {Path(self.config.osm_file)}; {self.licence}",
            )
        rate = self.politeness["overpass"].requests_per_second
        return estimate_osm(area.outline, requests_per_second=rate)

    @override
    def fetch(self, root: DataRoot, area: FetchArea, say: Say = print) -> dict[str, Any]:
        if self.config.osm_file is not None:
            osm_file = Path(self.config.osm_file)
            paths = (
                import_streets(root, osm_file, area.outline),
                *import_context(root, osm_file, area.outline),
            )
        else:
            client = self.client()
            paths = (
                fetch_streets(root, area.outline, client, self.endpoint),
                *fetch_context(root, area.outline, client, self.endpoint),
            )
        counts = {
            layer: int(pyogrio.read_info(root.streets, layer=layer)["features"])
            for layer in ("nodes", "edges")
        }
        return {
            "outputs": outputs(root, *paths),
            "street_nodes": counts["nodes"],
            "street_edges": counts["edges"],
        }


class FlickrSource(Source):
    """Geotagged Flickr photos in the outline's WGS84 box, taken since ``flickr_since``, under
    the ``flickr_licenses`` allowed."""

    name = "flickr"
    licence = (
        "each photo under its owner's licence (catalog columns license, license_url, "
        "owner_name, photo_page); attribution needed"
    )
    service = "flickr"
    endpoint = flickr.FLICKR_REST
    politeness = {"flickr": flickr.API_POLITENESS, "flickr-images": flickr.IMAGE_POLITENESS}
    key_env = flickr.API_KEY_ENV
    key_help = "https://www.flickr.com/services/api/keys/"

    @override
    def params(self, area: FetchArea) -> dict[str, Any]:
        licences = self.config.licence_ids
        return {
            "endpoint": self.endpoint,
            "bbox_lonlat": area.bbox_wgs84,
            "since": self.config.since.isoformat(),
            "licenses": None if licences is None else sorted(licences),
        }

    @override
    def estimate(self, root: DataRoot, area: FetchArea) -> Estimate:
        return flickr.estimate_flickr(
            area.bbox_wgs84,
            min_taken=self.config.since,
            licenses=self.config.licence_ids,
            api_key=self.key(),
            client=self.client("flickr"),
            endpoint=self.endpoint,
            image_politeness=self.politeness["flickr-images"],
        )

    @override
    def fetch(self, root: DataRoot, area: FetchArea, say: Say = print) -> dict[str, Any]:
        until = datetime.now().replace(microsecond=0)
        done = flickr.fetch_flickr(
            root,
            area.bbox_wgs84,
            min_taken=self.config.since,
            max_taken=until,
            licenses=self.config.licence_ids,
            api_key=self.key(),
            client=self.client("flickr"),
            image_client=self.client("flickr-images"),
            endpoint=self.endpoint,
            show_progress=self.config.show_progress,
        )
        return {
            "outputs": outputs(root, done.catalog),
            "until": until.isoformat(),
            "photos": len(done.rows),
            "fetched": done.report.fetched,
            "skipped": done.report.skipped,
            "photos_per_licence": {
                str(k): int(n) for k, n in done.rows["license"].value_counts().items()
            },
        }


class GsvSource(Source):
    """Google Street View views at ``gsv_headings`` of the panoramas along the streets (every
    ``gsv_spacing`` metres), and of the ids in ``gsv_panos``."""

    name = "gsv"
    licence = (
        "Google Maps Platform Terms of Service: images (c) Google, not to be stored long-term "
        "or redistributed"
    )
    service = "gsv"
    endpoint = gsv.GOOGLE_MAPS
    politeness = {"gsv": gsv.POLITENESS}
    key_env = gsv.API_KEY_ENV
    key_help = "a Google Maps Platform key with the Street View Static API enabled"
    street_m_per_cell: ClassVar[float] = 250.0
    """Assumed street length (footpaths and cycleways included) per 100 m cell, for the plan
    before the streets are fetched; the points are counted from the streets before the step."""

    @classmethod
    @override
    def secrets(cls) -> list[str]:
        signing = os.environ.get(gsv.SIGNING_SECRET_ENV, "").strip()
        return [s for s in (cls.key(), signing) if s]

    @override
    def params(self, area: FetchArea) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "headings": self.config.gsv_headings,
            "spacing_m": self.config.gsv_spacing,
            "panos": self._panos(),
        }

    @override
    def estimate(self, root: DataRoot, area: FetchArea) -> Estimate:
        spacing = self.config.gsv_spacing
        if root.streets.is_file():
            locations = len(street_points(root, area, spacing))
            counted = "points along the streets on disk"
        else:
            cells = len(grid_for_boundary(area.outline))
            locations = math.ceil(cells * self.street_m_per_cell / spacing)
            counted = (
                f"points assumed from {cells:,} cells x {self.street_m_per_cell:.0f} m of "
                "street, recounted from the streets before the Street View step"
            )
        e = self._estimate(locations)
        return replace(e, note=f"{locations:,} {counted}; {e.note}; {self.licence}")

    @override
    def fetch(self, root: DataRoot, area: FetchArea, say: Say = print) -> dict[str, Any]:
        if root.streets.is_file():
            points = street_points(root, area, self.config.gsv_spacing)
        else:
            say(
                "gsv: no streets on disk (add osm to --sources); looking for panoramas at the "
                "cell centres"
            )
            points = gsv.cell_centres_lonlat(root.grid)
        say(f"gsv: {len(points):,} lookup points; {self._estimate(len(points)).note}")
        done = gsv.fetch_gsv(
            root,
            points,
            headings=self.config.gsv_headings,
            pano_csv=self._panos(),
            max_requests=self.config.gsv_max_requests,
            api_key=self.key(),
            client=self.client(cache=root),  # metadata cached; the views are files
            endpoint=self.endpoint,
            show_progress=self.config.show_progress,
        )
        return {
            "outputs": outputs(root, done.catalog),
            "lookup_points": len(points),
            "panoramas": int(done.rows["pano_id"].nunique()),
            "views": len(done.rows),
            "fetched": done.report.fetched,
            "skipped": done.report.skipped,
            "copyright": {str(k): int(n) for k, n in done.rows["copyright"].value_counts().items()},
        }

    def _panos(self) -> Path | None:
        return Path(self.config.gsv_panos) if self.config.gsv_panos else None

    def _estimate(self, locations: int) -> Estimate:
        panos = self._panos()
        extra = len(gsv.read_pano_ids(panos)) if panos else 0
        return gsv.estimate_gsv(
            locations, self.config.gsv_headings, extra, politeness=self.politeness["gsv"]
        )


class AmsterdamPanoramaSource(Source):
    """The City of Amsterdam's panoramas in the outline's WGS84 box, captured between
    ``panorama_since`` and ``panorama_until``, cut into views at ``panorama_headings`` with
    ``panorama_fov``."""

    name = "amsterdam_panorama"
    licence = amsterdam_panorama.LICENCE
    service = "amsterdam_panorama"
    endpoint = amsterdam_panorama.PANORAMA_API
    politeness = {
        "amsterdam_panorama": amsterdam_panorama.API_POLITENESS,
        "amsterdam_panorama-images": amsterdam_panorama.IMAGE_POLITENESS,
    }
    opt_in = True

    @override
    def params(self, area: FetchArea) -> dict[str, Any]:
        c = self.config
        return {
            "endpoint": self.endpoint,
            "bbox_lonlat": area.bbox_wgs84,
            "since": c.panorama_since,
            "until": c.panorama_until,
            "headings": c.panorama_headings,
            "fov": c.panorama_fov,
        }

    @override
    def estimate(self, root: DataRoot, area: FetchArea) -> Estimate:
        return amsterdam_panorama.estimate_amsterdam_panorama(
            area.bbox_wgs84,
            **self._window(),
            spec=self._spec(),
            client=self.client("amsterdam_panorama"),
            endpoint=self.endpoint,
            image_politeness=self.politeness["amsterdam_panorama-images"],
        )

    @override
    def fetch(self, root: DataRoot, area: FetchArea, say: Say = print) -> dict[str, Any]:
        done = amsterdam_panorama.fetch_amsterdam_panorama(
            root,
            area.bbox_wgs84,
            **self._window(),
            spec=self._spec(),
            client=self.client("amsterdam_panorama", cache=root),
            image_client=self.client("amsterdam_panorama-images"),
            endpoint=self.endpoint,
            show_progress=self.config.show_progress,
        )
        years = done.rows.drop_duplicates("pano_id")["captured_at"].dt.year.value_counts()
        return {
            "outputs": outputs(root, done.catalog),
            "panoramas": int(done.rows["pano_id"].nunique()),
            "views": len(done.rows),
            "fetched": done.report.fetched,
            "skipped": done.report.skipped,
            "panoramas_per_year": {str(int(y)): int(n) for y, n in sorted(years.items())},
        }

    def _window(self) -> dict[str, Any]:
        since, until = (self.config.date_of(n) for n in ("panorama_since", "panorama_until"))
        return {"after": since and since.date(), "before": until and until.date()}

    def _spec(self) -> amsterdam_panorama.ViewSpec:
        c = self.config
        return amsterdam_panorama.ViewSpec(headings=tuple(c.panorama_headings), fov=c.panorama_fov)


class MapillarySource(Source):
    """Mapillary images in the outline's WGS84 box, captured since ``mapillary_since``."""

    name = "mapillary"
    licence = (
        f"Mapillary: every image {mapillary.LICENCE} ({mapillary.LICENCE_URL}); creator "
        "recorded per row, attribution and share-alike needed"
    )
    service = "mapillary"
    endpoint = mapillary.GRAPH
    politeness = {
        "mapillary": mapillary.API_POLITENESS,
        "mapillary-images": mapillary.IMAGE_POLITENESS,
    }
    key_env = mapillary.TOKEN_ENV
    key_help = "a client token from https://www.mapillary.com/dashboard/developers"
    opt_in = True
    cache_expiry = timedelta(days=1)
    """Short: the thumbnail URLs in the answers are signed and expire."""

    @override
    def params(self, area: FetchArea) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "bbox_lonlat": area.bbox_wgs84,
            "since": self.config.mapillary_since,
        }

    @override
    def estimate(self, root: DataRoot, area: FetchArea) -> Estimate:
        return mapillary.estimate_mapillary(
            area.bbox_wgs84,
            since=self.config.date_of("mapillary_since"),
            token=self.key(),
            client=self.client("mapillary"),
            endpoint=self.endpoint,
            image_politeness=self.politeness["mapillary-images"],
        )

    @override
    def fetch(self, root: DataRoot, area: FetchArea, say: Say = print) -> dict[str, Any]:
        done = mapillary.fetch_mapillary(
            root,
            area.bbox_wgs84,
            since=self.config.date_of("mapillary_since"),
            token=self.key(),
            client=self.client("mapillary", cache=root),
            image_client=self.client("mapillary-images"),
            endpoint=self.endpoint,
            show_progress=self.config.show_progress,
        )
        return {
            "outputs": outputs(root, done.catalog),
            "images": len(done.rows),
            "sequences": int(done.rows["sequence"].nunique()),
            "fetched": done.report.fetched,
            "skipped": done.report.skipped,
        }


def street_points(root: DataRoot, area: FetchArea, spacing_m: float) -> np.ndarray:
    """WGS84 points every ``spacing_m`` along the streets whose cell is in the area."""
    points = gsv.street_points_lonlat(root.streets, spacing_m)
    x, y = Transformer.from_crs(WGS84, RD_NEW, always_xy=True).transform(points[:, 0], points[:, 1])
    return points[np.isin(cell_id(x, y), grid_for_boundary(area.outline))]


#: The sources a fetch can run, by name, in data-flow order (a source may use what an earlier
#: one wrote: the grid the labels, Street View the OSM streets). Register a new source here.
SOURCES: dict[str, type[Source]] = {
    source.name: source
    for source in (
        LbmSource,
        AerialSource,
        OsmSource,
        FlickrSource,
        GsvSource,
        AmsterdamPanoramaSource,
        MapillarySource,
    )
}


def services() -> list[type[Service]]:
    """Every service a fetch may talk to: the outline's, then each registered source's."""
    return [Outline, *SOURCES.values()]


def endpoint_names() -> list[str]:
    """The service names ``--endpoint`` takes."""
    return [service.service for service in services()]


def client_names() -> list[str]:
    """The HTTP client names ``--rate`` takes (besides ``all``)."""
    return [name for service in services() for name in service.politeness]


def redact_secrets(text: str) -> str:
    """``text`` without any service's key or secret (nor secret URL parameters)."""
    return redact(text, [s for service in services() for s in service.secrets()])
