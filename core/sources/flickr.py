"""Geotagged Flickr photos of a bounding box into the street-level catalog.

``flickr.photos.search`` (REST, JSON) lists the public geotagged photos in a WGS84 box with
their position, capture time, tags, owner, licence and image URLs. Flickr returns at most
about 4,000 results per query, so a query whose ``total`` is above that cap is split (first
its capture-time window in halves, then its box in quadrants) until every part fits; photo ids
are deduplicated. The images are downloaded at the first available size of a preference list
and written to ``street/images/flickr/<block>/flickr_<photo id>.jpg``; the catalog
``street/catalog.parquet`` gets one row per photo (existing rows of other ids are kept).

The API key comes from ``$FLICKR_API_KEY`` and is never written anywhere. The API terms
allow 3,600 queries per hour per key; every photo keeps its own licence (recorded per row
with its owner, for attribution), and ``licenses=`` keeps only the licences a user allows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from os import PathLike
from typing import Any

import numpy as np
import pandas as pd

from core.dataroot import DataRoot
from core.sources.catalog import merge_catalog
from core.sources.http import Estimate, FetchError, HttpClient, Politeness
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

FLICKR_REST = "https://api.flickr.com/services/rest/"
API_KEY_ENV = "FLICKR_API_KEY"
#: Flickr returns at most the first 4,000 results of any search (flickr.photos.search docs).
RESULT_CAP = 4000
#: Results per search page; 250 is the page size Flickr allows for geo queries.
PER_PAGE = 250
#: Queries per hour per API key allowed by the Flickr API terms.
QUERIES_PER_HOUR = 3600
#: Size suffixes tried in order: z = 640 px, c = 800 px, b = 1024 px on the long side, o = original.
SIZES = ("z", "c", "b", "o")
#: Rough JPEG bytes per image of each size, for estimates.
BYTES_PER_SIZE = {"z": 120_000, "c": 180_000, "b": 300_000, "o": 3_000_000}
#: Licences that allow reuse, adaptation and commercial use (CC BY, CC BY-SA, no known
#: copyright restrictions, US government work, CC0, public domain mark).
REUSABLE_LICENSES = frozenset({4, 5, 7, 8, 9, 10})
#: The API at its terms' rate, one request at a time; images come from the static CDN.
API_POLITENESS = Politeness(requests_per_second=QUERIES_PER_HOUR / 3600, concurrency=1)
IMAGE_POLITENESS = Politeness()
FIRST_TAKEN = datetime(1900, 1, 1)
#: Below these a query over the cap is split in space instead of time, then not at all.
MIN_WINDOW = timedelta(days=1)
MIN_BOX_DEG = 1e-4

_SEARCH_EXTRAS = ("geo", "date_taken", "tags", "license", "owner_name")
_TAKEN_FORMAT = "%Y-%m-%d %H:%M:%S"


class FlickrError(FetchError):
    """The Flickr API answered ``stat: fail`` (HTTP 200 with an error code and message)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class License:
    """A Flickr licence as ``flickr.photos.licenses.getInfo`` lists it."""

    id: int
    name: str
    url: str


# --- Flickr API ------------------------------------------------------------------------------


def call_flickr(
    client: HttpClient, api_key: str, method: str, endpoint: str = FLICKR_REST, **params: Any
) -> dict:
    """Call one Flickr REST method (JSON) and return the decoded answer.

    Raises:
        FlickrError: when Flickr answers ``stat: fail`` (code 100 = invalid API key).
        FetchError: on HTTP failures after retries or a body that is not JSON.
    """
    answer = client.get_json(
        endpoint,
        {"method": method, "api_key": api_key, "format": "json", "nojsoncallback": 1, **params},
    )
    if not isinstance(answer, dict) or answer.get("stat") != "ok":
        answer = answer if isinstance(answer, dict) else {}
        code = int(answer.get("code", -1))
        message = client.redact(str(answer.get("message", "no 'stat: ok' in the answer")))
        hint = f" (check ${API_KEY_ENV})" if code == 100 else ""
        raise FlickrError(f"Flickr {method} failed: error {code}: {message}{hint}", code)
    return answer


def flickr_licenses(
    client: HttpClient, api_key: str, endpoint: str = FLICKR_REST
) -> dict[int, License]:
    """The licences Flickr knows, by id (``flickr.photos.licenses.getInfo``)."""
    answer = call_flickr(client, api_key, "flickr.photos.licenses.getInfo", endpoint)
    return {
        int(item["id"]): License(int(item["id"]), str(item["name"]), str(item.get("url") or ""))
        for item in answer["licenses"]["license"]
    }


def _search_page(
    client: HttpClient,
    api_key: str,
    endpoint: str,
    box: BBox,
    window: tuple[datetime, datetime],
    page: int,
    per_page: int,
    sizes: Sequence[str],
    licenses: Collection[int] | None,
) -> dict:
    params = {
        "bbox": ",".join(f"{v:.6f}" for v in box),
        "has_geo": 1,
        "media": "photos",
        "min_taken_date": window[0].strftime(_TAKEN_FORMAT),
        "max_taken_date": window[1].strftime(_TAKEN_FORMAT),
        "extras": ",".join((*_SEARCH_EXTRAS, *(f"url_{s}" for s in sizes))),
        "sort": "date-taken-asc",
        "per_page": per_page,
        "page": page,
    }
    if licenses is not None:
        params["license"] = ",".join(str(i) for i in sorted(licenses))
    answer = call_flickr(client, api_key, "flickr.photos.search", endpoint, **params)
    try:
        photos = answer["photos"]
        return {
            "total": int(photos["total"]),
            "pages": int(photos["pages"]),
            "photo": list(photos["photo"]),
        }
    except (KeyError, TypeError, ValueError):
        raise FetchError(
            f"{endpoint}: flickr.photos.search answered without photos/total/pages/photo: "
            f"{client.redact(str(answer))[:200]!r}"
        ) from None


def search_photos(
    client: HttpClient,
    api_key: str,
    bbox_wgs84: BBox,
    *,
    min_taken: datetime = FIRST_TAKEN,
    max_taken: datetime | None = None,
    licenses: Collection[int] | None = None,
    sizes: Sequence[str] = SIZES,
    endpoint: str = FLICKR_REST,
    per_page: int = PER_PAGE,
    cap: int = RESULT_CAP,
    min_window: timedelta = MIN_WINDOW,
) -> list[dict]:
    """Every public geotagged photo in ``bbox_wgs84`` taken in the window, each once.

    A query whose ``total`` is above ``cap`` is split, its time window in halves down to
    ``min_window``, then its box in quadrants, so that each part can be paged completely.

    Args:
        client: the client for the API (rate limited to the API terms).
        api_key: the Flickr API key.
        bbox_wgs84: (min lon, min lat, max lon, max lat).
        min_taken: earliest capture time (Flickr needs a limit on geo queries).
        max_taken: latest capture time (default: now).
        licenses: licence ids to keep (``None`` = all).
        sizes: size suffixes whose URLs are requested.
        endpoint: the REST endpoint.
        per_page: results per page.
        cap: the most results Flickr returns for one query.
        min_window: the shortest time window split in time; shorter ones are split in space.

    Returns:
        The photo records as Flickr sends them, in the order found.
    """
    _check_bbox(bbox_wgs84)
    max_taken = max_taken or datetime.now().replace(microsecond=0)
    if max_taken < min_taken:
        raise ValueError(f"max_taken {max_taken} is before min_taken {min_taken}")
    found: dict[str, dict] = {}
    queries = [(bbox_wgs84, (min_taken, max_taken))]
    while queries:
        box, window = queries.pop()
        first = _search_page(client, api_key, endpoint, box, window, 1, per_page, sizes, licenses)
        if first["total"] > cap:
            parts = _split(box, window, min_window)
            if parts:
                queries.extend(parts)
                continue
            log.warning(
                "Flickr: %d photos in a %.0e degree box within %s; only the first %d can be listed",
                first["total"],
                box[2] - box[0],
                min_window,
                cap,
            )
        pages = min(first["pages"], math.ceil(cap / per_page))
        records = list(first["photo"])
        for page in range(2, pages + 1):
            records += _search_page(
                client, api_key, endpoint, box, window, page, per_page, sizes, licenses
            )["photo"]
        for record in records:
            found.setdefault(str(record["id"]), record)
    log.info("Flickr: %d photos in %s", len(found), bbox_wgs84)
    return list(found.values())


def _check_bbox(bbox_wgs84: BBox) -> None:
    box = bbox_wgs84
    if len(box) != 4 or not (-180 <= box[0] < box[2] <= 180 and -90 <= box[1] < box[3] <= 90):
        raise ValueError(f"bbox must be WGS84 (min lon, min lat, max lon, max lat), got {box}")


def _split(
    box: BBox, window: tuple[datetime, datetime], min_window: timedelta
) -> list[tuple[BBox, tuple[datetime, datetime]]]:
    """Two halves of the time window, else four quadrants of the box, else nothing."""
    start, end = window
    if end - start > min_window:
        middle = start + timedelta(seconds=int((end - start).total_seconds() // 2))
        return [(box, (start, middle)), (box, (middle + timedelta(seconds=1), end))]
    x0, y0, x1, y1 = box
    if x1 - x0 < MIN_BOX_DEG:
        return []
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    return [
        ((a, b, c, d), window)
        for a, b, c, d in ((x0, y0, xm, ym), (xm, y0, x1, ym), (x0, ym, xm, y1), (xm, ym, x1, y1))
    ]


def photo_rows(
    photos: Sequence[dict],
    licenses: dict[int, License],
    sizes: Sequence[str] = SIZES,
) -> tuple[pd.DataFrame, list[str]]:
    """Catalog rows of Flickr photo records and the image URL of each row.

    Photos without a URL at any of ``sizes`` are left out (counted in a log line).

    Returns:
        Rows in stored form with the catalog columns plus ``lon, lat, license_id,
        license_url, owner, owner_name, photo_page, size``; and the URL to fetch per row.
    """
    kept, urls, chosen = [], [], []
    for photo in photos:
        size = next((s for s in sizes if photo.get(f"url_{s}")), None)
        if size is None:
            continue
        kept.append(photo)
        urls.append(str(photo[f"url_{size}"]))
        chosen.append(size)
    if len(kept) < len(photos):
        log.info(
            "Flickr: %d of %d photos have no image at sizes %s and were left out",
            len(photos) - len(kept),
            len(photos),
            list(sizes),
        )
    lon = np.array([float(p["longitude"]) for p in kept], dtype=np.float64)
    lat = np.array([float(p["latitude"]) for p in kept], dtype=np.float64)
    x, y = lonlat_to_rd(lon, lat)
    ids = [f"flickr_{safe_name(str(p['id']))}" for p in kept]
    license_ids = [int(p.get("license", 0)) for p in kept]
    unknown = License(-1, "unknown", "")
    rows = pd.DataFrame(
        {
            "id": ids,
            "source": "flickr",
            "path": image_paths("flickr", ids, x, y),
            "heading": np.full(len(kept), np.nan),
            "captured_at": pd.to_datetime([_taken(p) for p in kept], format=_TAKEN_FORMAT),
            "x": x,
            "y": y,
            "pano_id": None,
            "title": [str(p.get("title") or "") for p in kept],
            "tags": [",".join(str(p.get("tags") or "").split()) for p in kept],
            "license": [licenses.get(i, unknown).name for i in license_ids],
            "lon": lon,
            "lat": lat,
            "license_id": np.array(license_ids, dtype=np.int64),
            "license_url": [licenses.get(i, unknown).url for i in license_ids],
            "owner": [str(p.get("owner") or "") for p in kept],
            "owner_name": [str(p.get("ownername") or "") for p in kept],
            "photo_page": [
                f"https://www.flickr.com/photos/{p.get('owner')}/{p['id']}" for p in kept
            ],
            "size": chosen,
        }
    )
    return rows, urls


def _taken(photo: dict) -> str | None:
    # Flickr fills an unknown capture date with the upload date; that is no capture time.
    if str(photo.get("datetakenunknown", "0")) == "1" or not photo.get("datetaken"):
        return None
    return str(photo["datetaken"])


def fetch_flickr(
    root: str | PathLike | DataRoot,
    bbox_wgs84: BBox | None = None,
    *,
    min_taken: datetime = FIRST_TAKEN,
    max_taken: datetime | None = None,
    licenses: Collection[int] | None = None,
    sizes: Sequence[str] = SIZES,
    api_key: str | None = None,
    client: HttpClient | None = None,
    image_client: HttpClient | None = None,
    endpoint: str = FLICKR_REST,
    per_page: int = PER_PAGE,
    cap: int = RESULT_CAP,
    show_progress: bool = True,
) -> StreetFetch:
    """Search, download and catalog the Flickr photos of a box into a data root.

    Rerunning resumes: images on disk are kept (corrupt ones fetched again), and the catalog
    is written only when every image is on disk.

    Args:
        root: the data root (``street/`` is filled).
        bbox_wgs84: (min lon, min lat, max lon, max lat); default: around the root's grid.
        min_taken: earliest capture time.
        max_taken: latest capture time (default: now).
        licenses: licence ids to keep, e.g. :data:`REUSABLE_LICENSES` (``None`` = all).
        sizes: image size suffixes in order of preference.
        api_key: the API key (default: ``$FLICKR_API_KEY``).
        client: client for the API (default: :data:`API_POLITENESS`).
        image_client: client for the images (default: ``client`` if given, else
            :data:`IMAGE_POLITENESS`).
        endpoint: the REST endpoint.
        per_page: results per search page.
        cap: the most results Flickr returns for one query.
        show_progress: show a progress bar for the downloads.

    Raises:
        ValueError: no API key, a bad bbox or an unknown licence id.
        FlickrError: Flickr refused a call (invalid key, ...).
        FetchError: some images failed for good (the others stay on disk; rerun to resume).
    """
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    api_key = api_key or env_secret(API_KEY_ENV, "Flickr")
    image_client = image_client or client or HttpClient(IMAGE_POLITENESS, secrets=[api_key])
    client = client or HttpClient(API_POLITENESS, secrets=[api_key])
    bbox_wgs84 = bbox_wgs84 or grid_bbox_wgs84(root.grid)
    known = flickr_licenses(client, api_key, endpoint)
    if licenses is not None and set(licenses) - set(known):
        raise ValueError(
            f"unknown Flickr licence ids {sorted(set(licenses) - set(known))}; "
            f"Flickr knows {sorted(known)}"
        )
    photos = search_photos(
        client,
        api_key,
        bbox_wgs84,
        min_taken=min_taken,
        max_taken=max_taken,
        licenses=licenses,
        sizes=sizes,
        endpoint=endpoint,
        per_page=per_page,
        cap=cap,
    )
    if licenses is not None:  # also enforced here: never keep a photo under a licence not allowed
        photos = [p for p in photos if int(p.get("license", -1)) in set(licenses)]
    rows, urls = photo_rows(photos, known, sizes)
    street = root.catalog.parent
    remove_corrupt_images(street / p for p in rows["path"])
    report = download_images(image_client, rows, urls, street, "flickr images", show_progress)
    report.raise_for_failures("Flickr image downloads")
    return StreetFetch(rows=rows, report=report, catalog=merge_catalog(rows, root.catalog))


def estimate_flickr(
    bbox_wgs84: BBox,
    *,
    min_taken: datetime = FIRST_TAKEN,
    max_taken: datetime | None = None,
    licenses: Collection[int] | None = None,
    sizes: Sequence[str] = SIZES,
    api_key: str | None = None,
    client: HttpClient | None = None,
    endpoint: str = FLICKR_REST,
    per_page: int = PER_PAGE,
    cap: int = RESULT_CAP,
    image_politeness: Politeness = IMAGE_POLITENESS,
) -> Estimate:
    """Plan a Flickr fetch from one search request (its ``total``).

    The request count is a lower bound when the total is above the cap (each split costs a
    request per part). The rate is the effective one of API calls at the API terms' rate
    and image downloads at ``image_politeness``.
    """
    _check_bbox(bbox_wgs84)
    api_key = api_key or env_secret(API_KEY_ENV, "Flickr")
    client = client or HttpClient(API_POLITENESS, secrets=[api_key])
    max_taken = max_taken or datetime.now().replace(microsecond=0)
    total = _search_page(
        client, api_key, endpoint, bbox_wgs84, (min_taken, max_taken), 1, 1, sizes, licenses
    )["total"]
    parts = max(1, math.ceil(total / cap))
    api_calls = 1 + max(parts, math.ceil(total / per_page)) + (2 * parts if parts > 1 else 0)
    api_rate = client.politeness.requests_per_second or API_POLITENESS.requests_per_second
    image_rate = image_politeness.requests_per_second  # 0 = no limit
    seconds = api_calls / api_rate + (total / image_rate if image_rate > 0 else 0.0)
    allowed = "all licences" if licenses is None else f"licences {sorted(licenses)}"
    note = (
        f"{total} photos ({allowed}); needs ${API_KEY_ENV}; the Flickr API terms allow "
        f"{QUERIES_PER_HOUR} queries/hour per key; each photo keeps its owner's licence "
        "(recorded per row with the owner, attribution needed)"
    )
    if parts > 1:
        note += f"; above the {cap}-result cap: the search is split into at least {parts} parts"
    return Estimate(
        source="Flickr",
        requests=api_calls + total,
        bytes=total * BYTES_PER_SIZE.get(sizes[0], 150_000),
        requests_per_second=(api_calls + total) / seconds if seconds else 0.0,
        note=note,
    )
