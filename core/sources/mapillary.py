"""Mapillary street-level images (API v4) into the street-level catalog.

``GET https://graph.mapillary.com/images?bbox=west,south,east,north&fields=...&limit=...``
lists the images in a box as ``{"data": [...]}``, each with the fields asked for: ``id``,
``captured_at`` (milliseconds since 1970, UTC), ``compass_angle`` and
``computed_compass_angle`` (degrees), ``geometry`` and ``computed_geometry`` (GeoJSON points,
the computed ones corrected by Mapillary's structure from motion), ``sequence``, ``is_pano``,
``creator`` and ``thumb_1024_url`` (a signed CDN URL that expires). A box search is not paged
reliably and returns at most ``limit`` (2,000) images, so the area is tiled (0.01 degree
tiles), a full tile is split in quadrants, and ``paging.next`` is followed where the API gives
it. Refusals come as JSON ``{"error": {"message", "type", "code", ...}}``: an expired or
invalid token is ``OAuthException`` code 190.

The token comes from ``$MAPILLARY_TOKEN`` (the ``access_token`` parameter) and is never written
anywhere. Every image is CC BY-SA 4.0 (recorded per row, with its creator for attribution).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from datetime import datetime
from os import PathLike

import numpy as np
import pandas as pd

from core.dataroot import DataRoot
from core.sources.catalog import merge_catalog
from core.sources.http import Estimate, FetchError, HttpClient, Politeness, with_params
from core.sources.street_fetch import (
    BBox,
    StreetFetch,
    download_images,
    env_secret,
    grid_bbox_wgs84,
    image_paths,
    lonlat_to_rd,
    remove_corrupt_images,
    safe_name,
)

log = logging.getLogger(__name__)

SOURCE = "mapillary"
GRAPH = "https://graph.mapillary.com"
IMAGES_PATH = "/images"
TOKEN_ENV = "MAPILLARY_TOKEN"
LICENCE = "CC BY-SA 4.0"
LICENCE_URL = "https://creativecommons.org/licenses/by-sa/4.0/"
FIELDS = (
    "id",
    "captured_at",
    "compass_angle",
    "computed_compass_angle",
    "geometry",
    "computed_geometry",
    "sequence",
    "is_pano",
    "creator",
    "thumb_1024_url",
)
#: The most images one box search returns.
LIMIT = 2000
#: Side of the tiles a box is searched in, degrees (a box search must stay small).
TILE_DEG = 0.01
#: Below this a full tile is not split further (its first ``LIMIT`` images are kept).
MIN_TILE_DEG = 1e-4
BYTES_PER_IMAGE = 150_000
#: Tiles searched to estimate the number of images of an area for the plan.
SAMPLE_TILES = 4
#: The search API allows 10,000 requests a minute per app; a tenth of a percent of that.
API_POLITENESS = Politeness(requests_per_second=5.0, concurrency=1)
IMAGE_POLITENESS = Politeness(requests_per_second=10.0, concurrency=4)
#: Graph API error codes for throttling (answered as errors, retried with backoff).
THROTTLED = frozenset({4, 17, 32, 613})


class MapillaryError(FetchError):
    """The Mapillary API refused a request with an error JSON.

    Attributes:
        code: the error's ``code`` (190 = invalid or expired token); -1 when there was none.
        kind: the error's ``type`` (``OAuthException``, ...).
    """

    def __init__(self, message: str, code: int, kind: str, status: int | None) -> None:
        super().__init__(message, status)
        self.code = code
        self.kind = kind


def search_box(
    client: HttpClient,
    token: str,
    box: BBox,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    fields: Sequence[str] = FIELDS,
    limit: int = LIMIT,
    endpoint: str = GRAPH,
) -> list[dict]:
    """The images of one small box: one search, and its ``paging.next`` pages if any.

    Raises:
        MapillaryError: the API refused (bad or expired token, throttled after retries, ...).
        FetchError: HTTP failures after retries, or an answer without ``data``.
    """
    params = {
        "access_token": token,
        "bbox": ",".join(f"{v:.7f}" for v in box),
        "fields": ",".join(fields),
        "limit": limit,
        "start_captured_at": _iso(since),
        "end_captured_at": _iso(until),
    }
    url: str | None = with_params(endpoint.rstrip("/") + IMAGES_PATH, params)
    records: list[dict] = []
    while url is not None:
        answer = call_graph(client, url)
        if not isinstance(answer.get("data"), list):
            raise FetchError(
                f"{client.redact(url)}: Mapillary answered without data: "
                f"{client.redact(str(answer))[:200]!r}"
            )
        records += answer["data"]
        following = (answer.get("paging") or {}).get("next")
        # the next URL repeats the token, redacted where answers are cached: put it back
        url = with_params(following, {"access_token": token}) if following else None
    return records


def call_graph(client: HttpClient, url: str) -> dict:
    """GET one Graph API URL; an error JSON becomes a :class:`MapillaryError`.

    Throttling codes (:data:`THROTTLED`, answered with HTTP 400 or 429) are retried with the
    client's backoff.
    """
    attempt = 0
    while True:
        try:
            answer = client.get_json(url)
        except FetchError as exc:
            error = _graph_error(exc.body)
            if error is None:
                raise
            code, kind, message = error
            if code in THROTTLED and attempt < client.politeness.retries:
                client.backoff(attempt, f"Mapillary: throttled (code {code})")
                attempt += 1
                continue
            hint = (
                f"; the token is invalid or expired: set ${TOKEN_ENV} to a valid client token "
                "(https://www.mapillary.com/dashboard/developers)"
                if code == 190
                else ""
            )
            raise MapillaryError(
                f"{client.redact(url)}: Mapillary refused: {kind} code {code}: "
                f"{client.redact(message)}{hint}",
                code,
                kind,
                exc.status,
            ) from None
        if not isinstance(answer, dict):
            raise FetchError(f"{client.redact(url)}: Mapillary answered {str(answer)[:200]!r}")
        return answer


def _graph_error(body: str) -> tuple[int, str, str] | None:
    """(code, type, message) of a Graph API error JSON, or None when ``body`` is none."""
    try:
        error = json.loads(body)["error"]
        return int(error.get("code", -1)), str(error.get("type", "")), str(error.get("message"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def tiles(bbox_wgs84: BBox, size: float = TILE_DEG) -> list[BBox]:
    """``bbox_wgs84`` cut into tiles of at most ``size`` degrees a side, row by row."""
    x0, y0, x1, y1 = bbox_wgs84
    if not (-180 <= x0 < x1 <= 180 and -90 <= y0 < y1 <= 90):
        raise ValueError(
            f"bbox must be WGS84 (min lon, min lat, max lon, max lat), got {bbox_wgs84}"
        )
    nx, ny = math.ceil((x1 - x0) / size - 1e-9), math.ceil((y1 - y0) / size - 1e-9)
    xs, ys = np.linspace(x0, x1, nx + 1), np.linspace(y0, y1, ny + 1)
    return [
        (float(xs[i]), float(ys[j]), float(xs[i + 1]), float(ys[j + 1]))
        for j in range(ny)
        for i in range(nx)
    ]


def search_images(
    client: HttpClient,
    token: str,
    bbox_wgs84: BBox,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    fields: Sequence[str] = FIELDS,
    tile_deg: float = TILE_DEG,
    limit: int = LIMIT,
    endpoint: str = GRAPH,
) -> list[dict]:
    """Every image in ``bbox_wgs84`` (in the capture window), each once.

    The box is searched in tiles of ``tile_deg``; a tile answering ``limit`` images may hold
    more and is split in quadrants down to :data:`MIN_TILE_DEG`.
    """
    found: dict[str, dict] = {}
    queue = tiles(bbox_wgs84, tile_deg)
    while queue:
        box = queue.pop()
        records = search_box(
            client,
            token,
            box,
            since=since,
            until=until,
            fields=fields,
            limit=limit,
            endpoint=endpoint,
        )
        if len(records) >= limit and box[2] - box[0] > MIN_TILE_DEG:
            xm, ym = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            queue += [
                (box[0], box[1], xm, ym),
                (xm, box[1], box[2], ym),
                (box[0], ym, xm, box[3]),
                (xm, ym, box[2], box[3]),
            ]
            continue
        for record in records:
            found.setdefault(str(record["id"]), record)
    log.info("Mapillary: %d images in %s", len(found), bbox_wgs84)
    return list(found.values())


def image_rows(images: Sequence[dict]) -> tuple[pd.DataFrame, list[str]]:
    """Catalog rows (stored form) of Mapillary image records, and the thumbnail URL of each.

    Position and heading are the computed ones where Mapillary has them, else the camera's.
    Records without a position or a thumbnail are left out (counted in a log line).

    Returns:
        Rows with the catalog columns plus ``lon, lat, sequence, is_pano, creator,
        license_url, photo_page``; and the URL to fetch per row.
    """
    kept = [
        r
        for r in images
        if r.get("thumb_1024_url") and (r.get("computed_geometry") or r.get("geometry"))
    ]
    if len(kept) < len(images):
        log.info(
            "Mapillary: %d of %d images without a position or thumbnail were left out",
            len(images) - len(kept),
            len(images),
        )
    points = [(r.get("computed_geometry") or r["geometry"])["coordinates"] for r in kept]
    lon = np.array([float(p[0]) for p in points], dtype=np.float64)
    lat = np.array([float(p[1]) for p in points], dtype=np.float64)
    x, y = lonlat_to_rd(lon, lat)
    ids = [f"{SOURCE}_{safe_name(str(r['id']))}" for r in kept]
    heading = [_heading(r) for r in kept]
    return (
        pd.DataFrame(
            {
                "id": ids,
                "source": SOURCE,
                "path": image_paths(SOURCE, ids, x, y),
                "heading": np.array(heading, dtype=np.float64),
                "captured_at": pd.to_datetime(
                    [r.get("captured_at") for r in kept], unit="ms", utc=True
                ),
                "x": x,
                "y": y,
                "pano_id": None,
                "title": None,
                "tags": None,
                "license": LICENCE,
                "lon": lon,
                "lat": lat,
                "sequence": [str(r.get("sequence") or "") for r in kept],
                "is_pano": [bool(r.get("is_pano")) for r in kept],
                "creator": [str((r.get("creator") or {}).get("username") or "") for r in kept],
                "license_url": LICENCE_URL,
                "photo_page": [f"https://www.mapillary.com/app/?pKey={r['id']}" for r in kept],
            }
        ),
        [str(r["thumb_1024_url"]) for r in kept],
    )


def _heading(record: dict) -> float:
    for name in ("computed_compass_angle", "compass_angle"):
        value = record.get(name)
        if value is not None:
            return float(value) % 360
    return math.nan


def _iso(when: datetime | None) -> str | None:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ") if when else None


def fetch_mapillary(
    root: str | PathLike | DataRoot,
    bbox_wgs84: BBox | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    token: str | None = None,
    client: HttpClient | None = None,
    image_client: HttpClient | None = None,
    endpoint: str = GRAPH,
    tile_deg: float = TILE_DEG,
    limit: int = LIMIT,
    show_progress: bool = True,
) -> StreetFetch:
    """Search, download and catalog the Mapillary images of a box into a data root.

    Rerunning resumes: images on disk are kept (corrupt ones fetched again), and the catalog
    is written only when every image is on disk.

    Args:
        root: the data root (``street/`` is filled).
        bbox_wgs84: (min lon, min lat, max lon, max lat); default: around the root's grid.
        since: earliest capture time.
        until: latest capture time.
        token: the client token (default: ``$MAPILLARY_TOKEN``).
        client: client for the API (default: :data:`API_POLITENESS`, no cache).
        image_client: client for the thumbnails (default: :data:`IMAGE_POLITENESS`).
        endpoint: the Graph API's base URL.
        tile_deg: side of the search tiles, degrees.
        limit: images per search.
        show_progress: show a progress bar for the downloads.

    Raises:
        ValueError: no token or a bad bbox.
        MapillaryError: the API refused (invalid or expired token, ...).
        FetchError: some images failed for good (the others stay on disk; rerun to resume).
    """
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    token = token or env_secret(TOKEN_ENV, "Mapillary")
    client = client or HttpClient(API_POLITENESS, secrets=[token])
    image_client = image_client or HttpClient(IMAGE_POLITENESS, secrets=[token])
    bbox_wgs84 = bbox_wgs84 or grid_bbox_wgs84(root.grid)
    images = search_images(
        client,
        token,
        bbox_wgs84,
        since=since,
        until=until,
        tile_deg=tile_deg,
        limit=limit,
        endpoint=endpoint,
    )
    rows, urls = image_rows(images)
    street = root.catalog.parent
    remove_corrupt_images(street / p for p in rows["path"])
    report = download_images(image_client, rows, urls, street, "mapillary images", show_progress)
    report.raise_for_failures("Mapillary image downloads")
    return StreetFetch(rows=rows, report=report, catalog=merge_catalog(rows, root.catalog))


def estimate_mapillary(
    bbox_wgs84: BBox,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    token: str | None = None,
    client: HttpClient | None = None,
    endpoint: str = GRAPH,
    tile_deg: float = TILE_DEG,
    limit: int = LIMIT,
    image_politeness: Politeness = IMAGE_POLITENESS,
) -> Estimate:
    """Plan a Mapillary fetch: the tiles, and images counted in a sample of them (ids only)."""
    token = token or env_secret(TOKEN_ENV, "Mapillary")
    client = client or HttpClient(API_POLITENESS, secrets=[token])
    boxes = tiles(bbox_wgs84, tile_deg)
    step = max(1, len(boxes) // SAMPLE_TILES)
    sample = boxes[step // 2 :: step][:SAMPLE_TILES]
    counts = [
        len(
            search_box(
                client,
                token,
                b,
                since=since,
                until=until,
                fields=("id",),
                limit=limit,
                endpoint=endpoint,
            )
        )
        for b in sample
    ]
    images = round(sum(counts) / len(sample) * len(boxes))
    api_rate = client.politeness.requests_per_second or API_POLITENESS.requests_per_second
    image_rate = image_politeness.requests_per_second
    seconds = len(boxes) / api_rate + (images / image_rate if image_rate > 0 else 0.0)
    note = (
        f"about {images:,} images (counted in {len(sample)} of {len(boxes)} tiles of "
        f"{tile_deg:g} degrees); needs ${TOKEN_ENV}; free; the search API allows 10,000 "
        f"requests a minute per app; every image {LICENCE} (creator recorded per row, "
        "attribution and share-alike needed)"
    )
    if any(c >= limit for c in counts):
        note += f"; some tiles are full ({limit} images): more images and split searches"
    return Estimate(
        source="Mapillary",
        requests=len(boxes) + images,
        bytes=images * BYTES_PER_IMAGE,
        requests_per_second=(len(boxes) + images) / seconds if seconds else 0.0,
        note=note,
    )
