"""Google Street View images into the street-level catalog (Street View Static API).

Two endpoints: the metadata endpoint finds the panorama nearest a point (free, no quota) and
the image endpoint renders one view of a panorama (billed per request). Panoramas are looked
up near points (the grid's cell centres or points along the streets), deduplicated by
``pano_id``, and each is fetched at a few headings into
``street/images/gsv/<block>/gsv_<pano id>_<heading>.jpg``; the catalog gets one row per view
with the panorama id, heading, capture month and position of the panorama.

The official API returns only the latest panorama at a location. Older captures can be added
from a CSV of panorama ids (column ``pano_id``); their metadata gives position and date.

The key comes from ``$GOOGLE_MAPS_API_KEY``; with ``$GOOGLE_MAPS_SIGNING_SECRET`` every URL
is signed (needed above 25,000 requests a day). Neither is ever written anywhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
from collections.abc import Sequence
from os import PathLike
from typing import Any
from urllib.parse import urlsplit

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from tqdm.auto import tqdm

from core.dataroot import DataRoot
from core.grid import RD_NEW, read_grid
from core.io import read_table, require_columns
from core.sources.catalog import merge_catalog
from core.sources.http import Estimate, FetchError, HttpClient, Politeness, with_params
from core.sources.street_fetch import (
    StreetFetch,
    download_images,
    env_secret,
    image_paths,
    lonlat_to_rd,
    rd_to_lonlat,
    remove_corrupt_images,
    safe_name,
)

log = logging.getLogger(__name__)

GOOGLE_MAPS = "https://maps.googleapis.com"
METADATA_PATH = "/maps/api/streetview/metadata"
IMAGE_PATH = "/maps/api/streetview"
API_KEY_ENV = "GOOGLE_MAPS_API_KEY"
SIGNING_SECRET_ENV = "GOOGLE_MAPS_SIGNING_SECRET"
DEFAULT_HEADINGS = (0.0, 90.0, 180.0, 270.0)
#: Price of the "Static Street View" SKU per 1,000 image requests, 0-100,000 a month
#: (5.60 USD from 100,001 to 500,000); metadata requests are free.
USD_PER_1000 = 7.00
#: Requests a day above which Google requires signed URLs.
UNSIGNED_PER_DAY = 25_000
#: Rough bytes of one 640x640 view, for estimates.
BYTES_PER_IMAGE = 80_000
#: Far below the API's 30,000 queries per minute; keeps a shared key usable for others.
POLITENESS = Politeness(requests_per_second=10.0, concurrency=4)
_NO_PANORAMA = frozenset({"ZERO_RESULTS", "NOT_FOUND"})


class GsvError(FetchError):
    """The Street View API answered a status other than OK / ZERO_RESULTS / NOT_FOUND.

    Attributes:
        api_status: the answer's ``status`` ("OVER_QUERY_LIMIT", ...); ``status`` (the HTTP
            status of a :class:`FetchError`) is None, the answer came with HTTP 200.
    """

    def __init__(self, message: str, api_status: str) -> None:
        super().__init__(message)
        self.api_status = api_status


def sign_url(url: str, secret: str) -> str:
    """``url`` with a ``signature`` parameter: HMAC-SHA1 of its path and query.

    Args:
        url: the complete request URL (key included), exactly as it will be sent.
        secret: the URL signing secret (URL-safe base64, as the Cloud console shows it).
    """
    try:
        key = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    except (binascii.Error, ValueError):
        raise ValueError(
            f"the URL signing secret (${SIGNING_SECRET_ENV}) is not URL-safe base64"
        ) from None
    parts = urlsplit(url)
    digest = hmac.new(key, f"{parts.path}?{parts.query}".encode(), hashlib.sha1).digest()
    return f"{url}&signature={base64.urlsafe_b64encode(digest).decode()}"


def _request_url(
    endpoint: str, path: str, params: dict[str, Any], signing_secret: str | None
) -> str:
    url = with_params(endpoint.rstrip("/") + path, params)
    return sign_url(url, signing_secret) if signing_secret else url


def pano_metadata(
    client: HttpClient,
    api_key: str,
    *,
    location: tuple[float, float] | None = None,
    pano: str | None = None,
    radius: float = 50,
    source: str = "outdoor",
    signing_secret: str | None = None,
    endpoint: str = GOOGLE_MAPS,
) -> dict | None:
    """Metadata of the panorama nearest ``location`` (lon, lat) or of panorama ``pano``.

    ``UNKNOWN_ERROR`` (a temporary server error) is retried ``client.politeness.retries``
    times, with the client's backoff.

    Returns:
        The answer (``pano_id``, ``date`` "YYYY-MM", ``location`` {lat, lng}, ``copyright``),
        or None when there is no panorama (``ZERO_RESULTS`` / ``NOT_FOUND``).

    Raises:
        GsvError: ``OVER_QUERY_LIMIT`` (quota exhausted), ``REQUEST_DENIED`` (bad key, API not
            enabled, bad signature), ``INVALID_REQUEST``, or ``UNKNOWN_ERROR`` after retries.
    """
    if (location is None) == (pano is None):
        raise ValueError("give either a location or a panorama id")
    params: dict[str, Any] = {"key": api_key}
    if pano is not None:
        params["pano"] = pano
        what = f"panorama {pano}"
    else:
        lon, lat = location
        params.update(location=f"{lat:.7f},{lon:.7f}", radius=f"{radius:g}", source=source)
        what = f"lon={lon:.6f}, lat={lat:.6f}"
    url = _request_url(endpoint, METADATA_PATH, params, signing_secret)
    retries = client.politeness.retries
    for attempt in range(retries + 1):
        answer = client.get_json(url)
        status = str(answer.get("status", "")) if isinstance(answer, dict) else ""
        if status != "UNKNOWN_ERROR" or attempt == retries:
            break
        client.backoff(attempt, f"Street View metadata for {what}: UNKNOWN_ERROR")
    if status == "OK":
        if "pano_id" not in answer or not {"lat", "lng"} <= set(answer.get("location") or {}):
            raise GsvError(
                f"Street View metadata for {what}: OK without pano_id/location: "
                f"{client.redact(str(answer))[:200]!r}",
                status,
            )
        return answer
    if status in _NO_PANORAMA:
        return None
    detail = client.redact(str(answer.get("error_message", ""))) if isinstance(answer, dict) else ""
    problem = {
        "OVER_QUERY_LIMIT": "quota exhausted; try again later or raise the project's quota",
        "REQUEST_DENIED": f"request denied; check ${API_KEY_ENV} (and ${SIGNING_SECRET_ENV}) and that "
        "the Street View Static API is enabled for the key's project",
        "INVALID_REQUEST": "malformed request",
        "UNKNOWN_ERROR": f"server error, {client.politeness.retries + 1} attempts",
    }.get(status, f"unexpected answer {client.redact(str(answer))[:200]!r}")
    raise GsvError(
        f"Street View metadata for {what}: {status or 'no status'}: {problem}"
        + (f" ({detail})" if detail else ""),
        status,
    )


def cell_centres_lonlat(grid: str | PathLike) -> np.ndarray:
    """(n, 2) WGS84 lon/lat of the centres of a grid file's cells."""
    centres = read_grid(grid).geometry.centroid
    return rd_to_lonlat(centres.x.to_numpy(), centres.y.to_numpy())


def street_points_lonlat(streets: str | PathLike, spacing_m: float = 20.0) -> np.ndarray:
    """(n, 2) WGS84 lon/lat of points every ``spacing_m`` along the edges of a street graph.

    ``streets`` is a GeoPackage with an ``edges`` layer (osmnx's format, any projected CRS).
    """
    if spacing_m <= 0:
        raise ValueError(f"spacing_m must be positive, got {spacing_m}")
    edges = gpd.read_file(streets, layer="edges").to_crs(RD_NEW)
    lines = edges.geometry.to_numpy()
    counts = np.maximum(1, np.ceil(shapely.length(lines) / spacing_m).astype(int))
    line_of = np.repeat(np.arange(len(lines)), counts)
    fraction = (
        np.concatenate([(np.arange(n) + 0.5) / n for n in counts]) if len(lines) else np.zeros(0)
    )
    points = shapely.line_interpolate_point(lines[line_of], fraction, normalized=True)
    return rd_to_lonlat(shapely.get_x(points), shapely.get_y(points))


def read_pano_ids(path: str | PathLike) -> list[str]:
    """Panorama ids (column ``pano_id``) of a CSV or Parquet file, blanks and repeats dropped."""
    table = read_table(path, "panorama id")
    require_columns(table, ("pano_id",), path)
    ids = table["pano_id"].dropna().astype(str).str.strip()
    return list(dict.fromkeys(ids[ids != ""]))


def find_panoramas(
    client: HttpClient,
    api_key: str,
    points: np.ndarray,
    *,
    pano_ids: Sequence[str] = (),
    radius: float = 50,
    source: str = "outdoor",
    signing_secret: str | None = None,
    endpoint: str = GOOGLE_MAPS,
    show_progress: bool = True,
) -> pd.DataFrame:
    """The panoramas nearest ``points`` and the given ``pano_ids``, each once.

    Returns:
        Columns ``pano_id, lon, lat, date`` ("YYYY-MM", may be empty) and ``copyright``.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    found: dict[str, dict] = {}
    lookups = [{"location": (float(lon), float(lat))} for lon, lat in points] + [
        {"pano": p} for p in pano_ids
    ]
    missing = []
    for lookup in tqdm(lookups, desc="gsv metadata", unit="req", disable=not show_progress):
        answer = pano_metadata(
            client,
            api_key,
            radius=radius,
            source=source,
            signing_secret=signing_secret,
            endpoint=endpoint,
            **lookup,
        )
        if answer is None:
            missing.append(lookup)
        else:
            found.setdefault(str(answer["pano_id"]), answer)
    unknown = [m["pano"] for m in missing if "pano" in m]
    if unknown:
        log.warning("Street View: %d given panorama ids not found: %s", len(unknown), unknown[:5])
    log.info(
        "Street View: %d panoramas near %d points (%d points without one), %d given ids",
        len(found),
        len(points),
        len(missing) - len(unknown),
        len(pano_ids),
    )
    return pd.DataFrame(
        {
            "pano_id": list(found),
            "lon": [float(a["location"]["lng"]) for a in found.values()],
            "lat": [float(a["location"]["lat"]) for a in found.values()],
            "date": [str(a.get("date") or "") for a in found.values()],
            "copyright": [str(a.get("copyright") or "") for a in found.values()],
        }
    )


def view_rows(panoramas: pd.DataFrame, headings: Sequence[float]) -> pd.DataFrame:
    """One catalog row (stored form) per panorama and heading.

    Extra columns: ``lon, lat`` of the panorama, ``capture_date`` ("YYYY-MM") and
    ``copyright``; ``license`` holds the copyright line too.
    """
    if not headings:
        raise ValueError("give at least one heading")
    n, k = len(panoramas), len(headings)
    pano = np.repeat(panoramas["pano_id"].to_numpy(dtype=object), k)
    heading = np.tile(np.asarray(headings, dtype=np.float64) % 360, n)
    lon = np.repeat(panoramas["lon"].to_numpy(dtype=np.float64), k)
    lat = np.repeat(panoramas["lat"].to_numpy(dtype=np.float64), k)
    date = np.repeat(panoramas["date"].to_numpy(dtype=object), k)
    copyright_ = np.repeat(panoramas["copyright"].to_numpy(dtype=object), k)
    x, y = lonlat_to_rd(lon, lat)
    ids = [
        f"gsv_{safe_name(p)}_{int(round(h)) % 360:03d}" for p, h in zip(pano, heading, strict=True)
    ]
    return pd.DataFrame(
        {
            "id": ids,
            "source": "gsv",
            "path": image_paths("gsv", ids, x, y),
            "heading": heading,
            "captured_at": pd.to_datetime(
                [f"{d}-01" if d else None for d in date], format="%Y-%m-%d"
            ),
            "x": x,
            "y": y,
            "pano_id": pano,
            "title": None,
            "tags": None,
            "license": copyright_,
            "lon": lon,
            "lat": lat,
            "capture_date": date,
            "copyright": copyright_,
        }
    )


def fetch_gsv(
    root: str | PathLike | DataRoot,
    points: np.ndarray | None = None,
    *,
    headings: Sequence[float] = DEFAULT_HEADINGS,
    pano_csv: str | PathLike | None = None,
    radius: float = 50,
    source: str = "outdoor",
    size: tuple[int, int] = (640, 640),
    fov: float = 90,
    pitch: float = 0,
    max_requests: int | None = None,
    api_key: str | None = None,
    signing_secret: str | None = None,
    client: HttpClient | None = None,
    endpoint: str = GOOGLE_MAPS,
    show_progress: bool = True,
) -> StreetFetch:
    """Find panoramas, download their views and catalog them into a data root.

    Rerunning resumes: views on disk are not requested again (corrupt ones are), and the
    catalog is written only when every view is on disk.

    Args:
        root: the data root (``street/`` is filled).
        points: (n, 2) WGS84 lon/lat to look for panoramas at; default: the grid's cell
            centres (see also :func:`street_points_lonlat`).
        headings: compass headings of the views, degrees.
        pano_csv: a CSV/Parquet of extra panorama ids (older captures) to fetch as well.
        radius: metres around a point to look for a panorama.
        source: ``outdoor`` skips indoor panoramas; ``default`` allows them.
        size: width, height in pixels (at most 640 each).
        fov: horizontal field of view, degrees (at most 120).
        pitch: camera pitch, degrees.
        max_requests: refuse (before any billed request) when more image requests are needed.
        api_key: default ``$GOOGLE_MAPS_API_KEY``.
        signing_secret: default ``$GOOGLE_MAPS_SIGNING_SECRET`` (unsigned when unset).
        client: the HTTP client (default: :data:`POLITENESS`).
        endpoint: scheme and host of the API.
        show_progress: show progress bars.

    Raises:
        ValueError: no key, bad sizes, or the plan exceeds ``max_requests``.
        GsvError: the metadata endpoint refused (bad key, quota, ...).
        FetchError: some views failed for good (the others stay on disk; rerun to resume).
    """
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    if not (0 < size[0] <= 640 and 0 < size[1] <= 640) or not 0 < fov <= 120:
        raise ValueError(f"size must be at most 640x640 and fov in (0, 120], got {size}, {fov}")
    api_key = api_key or env_secret(API_KEY_ENV, "Google Street View")
    signing_secret = signing_secret or os.environ.get(SIGNING_SECRET_ENV, "").strip() or None
    client = client or HttpClient(POLITENESS, secrets=[api_key, signing_secret or ""])
    points = cell_centres_lonlat(root.grid) if points is None else points
    pano_ids = read_pano_ids(pano_csv) if pano_csv is not None else []
    panoramas = find_panoramas(
        client,
        api_key,
        points,
        pano_ids=pano_ids,
        radius=radius,
        source=source,
        signing_secret=signing_secret,
        endpoint=endpoint,
        show_progress=show_progress,
    )
    rows = view_rows(panoramas, headings)
    street = root.catalog.parent
    remove_corrupt_images(street / p for p in rows["path"])
    needed = sum(not (street / p).is_file() for p in rows["path"])
    if max_requests is not None and needed > max_requests:
        raise ValueError(
            f"Street View: {needed} image requests needed (about "
            f"{needed * USD_PER_1000 / 1000:.2f} USD), above max_requests={max_requests}; "
            "nothing was downloaded"
        )
    if needed > UNSIGNED_PER_DAY and not signing_secret:
        log.warning(
            "Street View: %d image requests without a signing secret; Google requires signed "
            "URLs above %d a day (set $%s)",
            needed,
            UNSIGNED_PER_DAY,
            SIGNING_SECRET_ENV,
        )
    urls = [
        _request_url(
            endpoint,
            IMAGE_PATH,
            {
                "size": f"{size[0]}x{size[1]}",
                "pano": p,
                "heading": f"{h:g}",
                "fov": f"{fov:g}",
                "pitch": f"{pitch:g}",
                "return_error_code": "true",
                "key": api_key,
            },
            signing_secret,
        )
        for p, h in zip(rows["pano_id"], rows["heading"], strict=True)
    ]
    report = download_images(client, rows, urls, street, "gsv images", show_progress)
    report.raise_for_failures("Street View image downloads")
    return StreetFetch(rows=rows, report=report, catalog=merge_catalog(rows, root.catalog))


def estimate_gsv(
    locations: int,
    headings: Sequence[float] = DEFAULT_HEADINGS,
    extra_panos: int = 0,
    politeness: Politeness = POLITENESS,
) -> Estimate:
    """Plan a Street View fetch without any request: an upper bound (one panorama per point).

    Args:
        locations: points to look up (e.g. cells, or points along the streets).
        headings: views per panorama.
        extra_panos: panorama ids given in a CSV.
        politeness: the rate the fetch runs at.
    """
    lookups = locations + extra_panos
    images = lookups * len(headings)
    cost = images * USD_PER_1000 / 1000
    note = (
        f"{lookups} metadata requests (free) and at most {images} image requests, at most "
        f"{cost:,.2f} USD at {USD_PER_1000:.2f} USD per 1,000 Static Street View requests "
        "(0-100k a month; 5.60 USD per 1,000 above; a monthly free allowance may apply); "
        f"needs ${API_KEY_ENV}; above {UNSIGNED_PER_DAY:,} requests a day also "
        f"${SIGNING_SECRET_ENV}; points sharing a panorama make the real count lower"
    )
    return Estimate(
        source="Google Street View",
        requests=lookups + images,
        bytes=images * BYTES_PER_IMAGE,
        requests_per_second=politeness.requests_per_second,
        note=note,
    )
