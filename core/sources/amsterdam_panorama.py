"""The City of Amsterdam's street-level panoramas into the street-level catalog.

The panorama API (``https://api.data.amsterdam.nl/panorama/panoramas/``, open, no key) lists the
panoramas in a box as HAL JSON: ``_embedded.panoramas`` with ``pano_id``, ``timestamp``,
``geometry`` (GeoJSON point, lon/lat with ``srid=4326``), the car's ``heading``/``roll``/
``pitch``, ``mission_year``, ``tags`` and ``_links.equirectangular_{full,medium,small}`` (8000,
4000 and 2000 px wide JPEGs); pages follow ``_links.next.href``. Filters: ``bbox`` (north-west
then south-east corner), ``timestamp_after``/``timestamp_before`` (ISO dates), ``tags``,
``newest_in_range``. Captures exist from 2016 on, most streets once a year: real temporal pairs.

The published equirectangular images are normalised (the city's own renderer applies heading,
pitch and roll): the centre column looks north and compass bearings grow to the right, so a
view at compass heading ``h`` is cut at ``h`` from the centre (the API's own thumbnail service
crops at ``width / 2 + heading * width / 360``). Each panorama is downloaded once, cut into
perspective views at the chosen headings and field of view with py360convert, and deleted;
views go to ``street/images/amsterdam_panorama/<block>/<id>.jpg`` and one catalog row each.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
import py360convert
from PIL import Image

from core.dataroot import DataRoot
from core.io import write_atomic
from core.sources.catalog import merge_catalog
from core.sources.http import (
    DownloadReport,
    Estimate,
    FetchError,
    HttpClient,
    Politeness,
    with_params,
)
from core.sources.street_fetch import (
    BBox,
    StreetFetch,
    grid_bbox_wgs84,
    image_paths,
    lonlat_to_rd,
    remove_corrupt_images,
    safe_name,
    validate_jpeg,
)

log = logging.getLogger(__name__)

SOURCE = "amsterdam_panorama"
PANORAMA_API = "https://api.data.amsterdam.nl/panorama/panoramas/"
LICENCE = (
    "Gemeente Amsterdam panoramabeelden: open data (data.amsterdam.nl); attribute "
    "'Gemeente Amsterdam'"
)
#: Equirectangular widths the API links to, by the name of its ``_links`` entry.
SIZES = {"full": 8000, "medium": 4000, "small": 2000}
#: Rough JPEG bytes of one panorama of each size, for estimates (only views are kept).
BYTES_PER_PANORAMA = {"full": 9_000_000, "medium": 2_500_000, "small": 700_000}
BYTES_PER_VIEW = 90_000
DEFAULT_HEADINGS = (0.0, 90.0, 180.0, 270.0)
PAGE_SIZE = 100
#: Panoramas downloaded, cut and deleted per batch: bounds the disk a fetch holds at once.
BATCH = 32
#: No published limit; an open city service, asked gently.
API_POLITENESS = Politeness(requests_per_second=2.0, concurrency=1)
IMAGE_POLITENESS = Politeness(requests_per_second=4.0, concurrency=4)
#: Compass heading of the centre column of the API's normalised equirectangular images.
CENTRE_HEADING = 0.0


@dataclass(frozen=True)
class ViewSpec:
    """How panoramas are cut into views.

    Attributes:
        headings: compass headings of the views, degrees.
        fov: horizontal field of view, degrees (0, 180).
        width: view width in pixels.
        height: view height in pixels.
        pitch: camera pitch, degrees (up positive).
    """

    headings: tuple[float, ...] = DEFAULT_HEADINGS
    fov: float = 90.0
    width: int = 640
    height: int = 640
    pitch: float = 0.0

    def __post_init__(self) -> None:
        if not self.headings:
            raise ValueError("give at least one view heading")
        if not 0 < self.fov < 180 or self.width <= 0 or self.height <= 0:
            raise ValueError(
                f"views need 0 < fov < 180 and a positive size, got fov={self.fov}, "
                f"{self.width}x{self.height}"
            )


# --- the API ---------------------------------------------------------------------------------


def search_panoramas(
    client: HttpClient,
    bbox_wgs84: BBox,
    *,
    after: date | None = None,
    before: date | None = None,
    tags: Sequence[str] = (),
    newest_in_range: bool = False,
    endpoint: str = PANORAMA_API,
    page_size: int = PAGE_SIZE,
) -> list[dict]:
    """Every panorama in ``bbox_wgs84`` taken in the window, each once, following the pages.

    Args:
        client: the client for the API.
        bbox_wgs84: (min lon, min lat, max lon, max lat).
        after: only panoramas taken after this date (``timestamp_after``).
        before: only panoramas taken before this date (``timestamp_before``).
        tags: keep panoramas with these tags (e.g. ``mission-2020``).
        newest_in_range: only the newest panorama at each place.
        endpoint: the panoramas endpoint.
        page_size: results per page.

    Returns:
        The panorama records as the API sends them, in the order found.

    Raises:
        FetchError: on HTTP failures after retries, or an answer without
            ``_embedded.panoramas``.
    """
    first = with_query(endpoint, bbox_wgs84, after, before, tags, newest_in_range, page_size)
    found: dict[str, dict] = {}
    url: str | None = first
    seen: set[str] = set()
    while url is not None:
        if url in seen:
            raise FetchError(f"{url}: the panorama API's next page points back to a page read")
        seen.add(url)
        answer = client.get_json(url)
        records = _embedded(answer, url)
        for record in records:
            found.setdefault(str(record["pano_id"]), record)
        url = ((answer.get("_links") or {}).get("next") or {}).get("href") or None
    log.info("Amsterdam panoramas: %d in %s", len(found), bbox_wgs84)
    return list(found.values())


def count_panoramas(
    client: HttpClient,
    bbox_wgs84: BBox,
    *,
    after: date | None = None,
    before: date | None = None,
    tags: Sequence[str] = (),
    newest_in_range: bool = False,
    endpoint: str = PANORAMA_API,
) -> int:
    """How many panoramas a search would find: the ``count`` of a one-result page."""
    url = with_query(endpoint, bbox_wgs84, after, before, tags, newest_in_range, 1)
    answer = client.get_json(url)
    _embedded(answer, url)
    if not isinstance(answer.get("count"), int):
        raise FetchError(f"{url}: the panorama API answered without a count")
    return int(answer["count"])


def with_query(
    endpoint: str,
    bbox_wgs84: BBox,
    after: date | None,
    before: date | None,
    tags: Sequence[str],
    newest_in_range: bool,
    page_size: int,
) -> str:
    """The first search URL: lon/lat (``srid=4326``), the box as north-west, south-east."""
    min_lon, min_lat, max_lon, max_lat = bbox_wgs84
    if not (-180 <= min_lon < max_lon <= 180 and -90 <= min_lat < max_lat <= 90):
        raise ValueError(
            f"bbox must be WGS84 (min lon, min lat, max lon, max lat), got {bbox_wgs84}"
        )
    if after and before and before <= after:
        raise ValueError(f"the capture window is empty: after {after}, before {before}")
    params = {
        "srid": 4326,
        "bbox": ",".join(f"{v:.7f}" for v in (min_lon, max_lat, max_lon, min_lat)),
        "page_size": page_size,
        "timestamp_after": after.isoformat() if after else None,
        "timestamp_before": before.isoformat() if before else None,
        "tags": ",".join(tags) or None,
        "newest_in_range": "true" if newest_in_range else None,
    }
    return with_params(endpoint, params)


def _embedded(answer: object, url: str) -> list[dict]:
    try:
        records = answer["_embedded"]["panoramas"]  # type: ignore[index]
        if not isinstance(records, list) or not all("pano_id" in r for r in records):
            raise TypeError
    except (KeyError, TypeError):
        raise FetchError(
            f"{url}: the panorama API answered without _embedded.panoramas: {str(answer)[:200]!r}"
        ) from None
    return records


def panorama_table(records: Sequence[dict], size: str = "medium") -> pd.DataFrame:
    """One row per panorama: ``pano_id, lon, lat, x, y, pano_heading, captured_at,
    mission_year, tags, url`` (the equirectangular image of ``size``) and ``license``.

    Records without a position or an image of ``size`` are left out (counted in a log line).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    kept = [
        r
        for r in records
        if ((r.get("_links") or {}).get(f"equirectangular_{size}") or {}).get("href")
        and len((r.get("geometry") or {}).get("coordinates") or ()) >= 2
    ]
    if len(kept) < len(records):
        log.warning(
            "Amsterdam panoramas: %d of %d without a position or a %s image were left out",
            len(records) - len(kept),
            len(records),
            size,
        )
    lon = np.array([float(r["geometry"]["coordinates"][0]) for r in kept], dtype=np.float64)
    lat = np.array([float(r["geometry"]["coordinates"][1]) for r in kept], dtype=np.float64)
    x, y = lonlat_to_rd(lon, lat)
    return pd.DataFrame(
        {
            "pano_id": [str(r["pano_id"]) for r in kept],
            "lon": lon,
            "lat": lat,
            "x": x,
            "y": y,
            "pano_heading": [
                np.nan if r.get("heading") is None else float(r["heading"]) for r in kept
            ],
            "captured_at": pd.to_datetime([r.get("timestamp") for r in kept], utc=True),
            "mission_year": [r.get("mission_year") for r in kept],
            "tags": [",".join(r.get("tags") or ()) for r in kept],
            "url": [str(r["_links"][f"equirectangular_{size}"]["href"]) for r in kept],
            "license": LICENCE,
        }
    )


# --- views -----------------------------------------------------------------------------------


def perspective(
    equirectangular: np.ndarray,
    heading: float,
    spec: ViewSpec,
    centre_heading: float = CENTRE_HEADING,
) -> np.ndarray:
    """The perspective view at compass ``heading`` of an equirectangular panorama.

    Args:
        equirectangular: (H, W) or (H, W, C) array, 360 x 180 degrees.
        heading: compass heading of the view's centre, degrees.
        spec: field of view, size and pitch.
        centre_heading: compass heading of the panorama's centre column.

    Returns:
        (spec.height, spec.width[, C]) array of ``equirectangular``'s dtype.
    """
    yaw = (heading - centre_heading + 180.0) % 360.0 - 180.0  # py360convert: [-180, 180], + right
    vertical = 2 * math.degrees(
        math.atan(math.tan(math.radians(spec.fov) / 2) * spec.height / spec.width)
    )
    return py360convert.e2p(
        equirectangular,
        fov_deg=(spec.fov, vertical),
        u_deg=yaw,
        v_deg=spec.pitch,
        out_hw=(spec.height, spec.width),
        mode="bilinear",
    )


def view_rows(panoramas: pd.DataFrame, spec: ViewSpec) -> pd.DataFrame:
    """One catalog row (stored form) per panorama and view heading.

    Extra columns: ``lon, lat, pano_heading`` (the car's heading), ``fov``, ``mission_year``.
    """
    k = len(spec.headings)
    rep = {c: np.repeat(panoramas[c].to_numpy(), k) for c in panoramas.columns}
    heading = np.tile(np.asarray(spec.headings, dtype=np.float64) % 360, len(panoramas))
    ids = [
        f"{SOURCE}_{safe_name(p)}_{int(round(h)) % 360:03d}"
        for p, h in zip(rep["pano_id"], heading, strict=True)
    ]
    x, y = rep["x"].astype(np.float64), rep["y"].astype(np.float64)
    return pd.DataFrame(
        {
            "id": ids,
            "source": SOURCE,
            "path": image_paths(SOURCE, ids, x, y),
            "heading": heading,
            "captured_at": pd.to_datetime(rep["captured_at"], utc=True),
            "x": x,
            "y": y,
            "pano_id": rep["pano_id"],
            "title": None,
            "tags": rep["tags"],
            "license": rep["license"],
            "lon": rep["lon"].astype(np.float64),
            "lat": rep["lat"].astype(np.float64),
            "pano_heading": rep["pano_heading"].astype(np.float64),
            "fov": float(spec.fov),
            "mission_year": rep["mission_year"],
        }
    )


def cut_views(panorama: Path, views: pd.DataFrame, street: Path, spec: ViewSpec) -> None:
    """Cut the views of one downloaded panorama and write each as a JPEG, atomically."""
    with Image.open(panorama) as image:
        pixels = np.asarray(image.convert("RGB"))
    for view in views.itertuples():
        array = perspective(pixels, float(view.heading), spec)
        out = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
        write_atomic(street / view.path, lambda tmp, out=out: out.save(tmp, "JPEG", quality=90))


# --- fetch -----------------------------------------------------------------------------------


def fetch_amsterdam_panorama(
    root: str | PathLike | DataRoot,
    bbox_wgs84: BBox | None = None,
    *,
    after: date | None = None,
    before: date | None = None,
    tags: Sequence[str] = (),
    newest_in_range: bool = False,
    spec: ViewSpec | None = None,
    size: str = "medium",
    client: HttpClient | None = None,
    image_client: HttpClient | None = None,
    endpoint: str = PANORAMA_API,
    page_size: int = PAGE_SIZE,
    batch: int = BATCH,
    show_progress: bool = True,
) -> StreetFetch:
    """Search the panoramas of a box, cut their views and catalog them into a data root.

    Panoramas whose views are all on disk are not downloaded again; the others are fetched in
    batches of ``batch`` into ``cache/amsterdam_panorama/``, cut, and deleted. The catalog is
    written only when every view is on disk.

    Args:
        root: the data root (``street/`` is filled).
        bbox_wgs84: (min lon, min lat, max lon, max lat); default: around the root's grid.
        after: only panoramas taken after this date.
        before: only panoramas taken before this date.
        tags: only panoramas with these tags.
        newest_in_range: only the newest panorama at each place.
        spec: headings, field of view and size of the views.
        size: the equirectangular size to cut from: ``full``, ``medium`` or ``small``.
        client: client for the API (default: :data:`API_POLITENESS`, no cache).
        image_client: client for the panoramas (default: :data:`IMAGE_POLITENESS`).
        endpoint: the panoramas endpoint.
        page_size: results per search page.
        batch: panoramas downloaded and cut at a time.
        show_progress: show progress bars.

    Raises:
        ValueError: a bad box, window, size or view spec.
        FetchError: the search failed, or some panoramas failed for good (the views of the
            others stay on disk; rerun to resume).
    """
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    spec = spec or ViewSpec()
    client = client or HttpClient(API_POLITENESS)
    image_client = image_client or HttpClient(IMAGE_POLITENESS)
    bbox_wgs84 = bbox_wgs84 or grid_bbox_wgs84(root.grid)
    records = search_panoramas(
        client,
        bbox_wgs84,
        after=after,
        before=before,
        tags=tags,
        newest_in_range=newest_in_range,
        endpoint=endpoint,
        page_size=page_size,
    )
    panoramas = panorama_table(records, size)
    rows = view_rows(panoramas, spec)
    street = root.catalog.parent
    remove_corrupt_images(street / p for p in rows["path"])
    missing = rows.loc[[not (street / p).is_file() for p in rows["path"]], "pano_id"]
    todo = panoramas[panoramas["pano_id"].isin(set(missing))]
    report = DownloadReport(skipped=len(panoramas) - len(todo))
    folder = root.cache / SOURCE
    for start in range(0, len(todo), max(1, batch)):
        part = todo.iloc[start : start + max(1, batch)]
        files = [folder / f"{safe_name(p)}.jpg" for p in part["pano_id"]]
        done = image_client.download_many(
            ((u, f, None) for u, f in zip(part["url"], files, strict=True)),
            validate=validate_jpeg,
            desc="amsterdam panoramas",
            total=len(files),
            show_progress=show_progress,
        )
        report.fetched += done.fetched + done.skipped
        report.bytes += done.bytes
        report.failed += done.failed
        failed = {f for f, _ in done.failed}
        for pano_id, file in zip(part["pano_id"], files, strict=True):
            if file in failed:
                continue
            cut_views(file, rows[rows["pano_id"] == pano_id], street, spec)
            file.unlink()
    log.info(
        "Amsterdam panoramas: %d cut into %d views, %d already on disk, %d failed (%.1f MB)",
        report.fetched,
        report.fetched * len(spec.headings),
        report.skipped,
        len(report.failed),
        report.bytes / 1e6,
    )
    report.raise_for_failures("Amsterdam panorama downloads")
    return StreetFetch(rows=rows, report=report, catalog=merge_catalog(rows, root.catalog))


def estimate_amsterdam_panorama(
    bbox_wgs84: BBox,
    *,
    after: date | None = None,
    before: date | None = None,
    tags: Sequence[str] = (),
    newest_in_range: bool = False,
    spec: ViewSpec | None = None,
    size: str = "medium",
    client: HttpClient | None = None,
    endpoint: str = PANORAMA_API,
    page_size: int = PAGE_SIZE,
    image_politeness: Politeness = IMAGE_POLITENESS,
) -> Estimate:
    """Plan a panorama fetch from one search request (its ``count``)."""
    spec = spec or ViewSpec()
    client = client or HttpClient(API_POLITENESS)
    total = count_panoramas(
        client,
        bbox_wgs84,
        after=after,
        before=before,
        tags=tags,
        newest_in_range=newest_in_range,
        endpoint=endpoint,
    )
    pages = max(1, math.ceil(total / page_size))
    api_rate = client.politeness.requests_per_second or API_POLITENESS.requests_per_second
    image_rate = image_politeness.requests_per_second
    seconds = pages / api_rate + (total / image_rate if image_rate > 0 else 0.0)
    views = total * len(spec.headings)
    note = (
        f"{total:,} panoramas ({size}, {SIZES[size]} px, {BYTES_PER_PANORAMA[size] / 1e6:.1f} "
        f"MB each, downloaded and deleted in batches) cut into {views:,} views; no key, free; "
        f"{LICENCE}"
    )
    return Estimate(
        source="Amsterdam panoramas",
        requests=pages + total,
        bytes=views * BYTES_PER_VIEW,
        requests_per_second=(pages + total) / seconds if seconds else 0.0,
        note=note,
    )
