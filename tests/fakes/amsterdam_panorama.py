"""A fake City of Amsterdam panorama API and image host.

It answers what ``https://api.data.amsterdam.nl/panorama/panoramas/`` answers: HAL JSON with
``_links`` (``self``, ``next``, ``previous``), ``count``, ``page_size`` and
``_embedded.panoramas``, each panorama with ``pano_id``, ``timestamp``, ``geometry`` (GeoJSON
point, lon/lat for ``srid=4326``), ``heading``/``roll``/``pitch``, ``mission_year``,
``mission_type``, ``tags`` and ``_links.equirectangular_{full,medium,small}``. Filters: ``bbox``
as ``<north-west>,<south-east>``, ``timestamp_after``/``timestamp_before`` (ISO dates),
``tags``; pages by ``page`` and ``page_size``. The equirectangular images are synthetic JPEGs
whose colour encodes the compass bearing of each column (red = cos, green = sin; the centre
column looks north, as in the city's normalised images), so a cut view can be checked.
Faults (429, 5xx) can be queued for the search or per panorama.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import numpy as np
import pandas as pd
from PIL import Image
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

API_PATH = "/panorama/panoramas/"
_IMAGE = re.compile(r"^/panorama/(\d{4})/([A-Za-z0-9_-]+)/equirectangular/panorama_(\d+)\.jpg$")
#: Width of the synthetic panoramas (all sizes are served this small, to keep tests fast).
WIDTH = 256


def bearing_image(width: int = WIDTH) -> bytes:
    """A JPEG equirectangular panorama whose red and green encode each column's bearing."""
    bearing = np.radians((np.arange(width) + 0.5) / width * 360 - 180)
    row = np.stack(
        [128 + 120 * np.cos(bearing), 128 + 120 * np.sin(bearing), np.full(width, 60.0)], -1
    )
    pixels = np.repeat(row[None], width // 2, axis=0).round().astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95)
    return out.getvalue()


def decode_bearing(pixel: np.ndarray) -> float:
    """The compass bearing, degrees in [0, 360), a pixel of :func:`bearing_image` shows."""
    red, green = (float(pixel[0]) - 128) / 120, (float(pixel[1]) - 128) / 120
    return float(np.degrees(np.arctan2(green, red)) % 360)


@dataclass
class FakePanoramaApi:
    """A running fake; see :func:`install_amsterdam_panorama`.

    Attributes:
        endpoint: the panoramas endpoint (what ``PANORAMA_API`` is for the real service).
        panoramas: one row per panorama: ``pano_id, lon, lat, timestamp, heading, year``.
        api_requests: search requests answered (faults included).
        image_requests: requests per panorama id.
        faults: responses queued for ``"search"`` or per panorama id, served first.
    """

    endpoint: str
    base_url: str
    panoramas: pd.DataFrame
    api_requests: int = 0
    image_requests: Counter = field(default_factory=Counter)
    faults: dict[str, list[Response]] = field(default_factory=dict)
    image: bytes = field(default_factory=bearing_image)

    def inject(self, target: str, *responses: Response) -> None:
        """Answer the next requests for ``target`` ("search" or a pano id) with ``responses``."""
        self.faults.setdefault(target, []).extend(responses)

    def record(self, row: pd.Series) -> dict:
        year = int(row["year"])
        links = {
            f"equirectangular_{name}": {
                "href": f"{self.base_url}/panorama/{year}/{row['pano_id']}/equirectangular/"
                f"panorama_{width}.jpg"
            }
            for name, width in (("full", 8000), ("medium", 4000), ("small", 2000))
        }
        return {
            "_links": {
                "self": {"href": f"{self.endpoint}{row['pano_id']}/"},
                **links,
                "cubic_img_preview": {"href": f"{self.base_url}/cubic/preview.jpg"},
                "thumbnail": {"href": f"{self.base_url}/panorama/thumbnail/{row['pano_id']}/"},
                "adjacencies": {"href": f"{self.endpoint}{row['pano_id']}/adjacencies/"},
            },
            "cubic_img_baseurl": f"{self.base_url}/panorama/{year}/{row['pano_id']}/cubic/",
            "cubic_img_pattern": "{a}/{b}/{c}.jpg",
            "geometry": {"type": "Point", "coordinates": [row["lon"], row["lat"], 0.0]},
            "pano_id": row["pano_id"],
            "timestamp": row["timestamp"],
            "filename": "panorama.jpg",
            "surface_type": "L",
            "mission_distance": 5,
            "mission_type": "bi",
            "mission_year": str(year),
            "tags": [f"mission-{year}", "mission-bi", "surface-land"],
            "roll": 0.12,
            "pitch": -0.4,
            "heading": row["heading"],
        }


def install_amsterdam_panorama(
    server: HTTPServer,
    bbox_wgs84: tuple[float, float, float, float],
    *,
    count: int = 12,
    years: tuple[int, ...] = (2017, 2019, 2021),
    seed: int = 0,
) -> FakePanoramaApi:
    """Serve ``count`` panoramas inside ``bbox_wgs84`` on ``server``, captured in ``years``."""
    rng = np.random.default_rng(seed)
    min_lon, min_lat, max_lon, max_lat = bbox_wgs84
    # inside the box's inner half, so every panorama lies on the demo's grid
    lon = min_lon + (max_lon - min_lon) * rng.uniform(0.25, 0.75, count)
    lat = min_lat + (max_lat - min_lat) * rng.uniform(0.25, 0.75, count)
    year = [years[i % len(years)] for i in range(count)]
    panoramas = pd.DataFrame(
        {
            "pano_id": [f"TMX7316010203-{i:06d}_pano_0000_{i:06d}" for i in range(count)],
            "lon": np.round(lon, 7),
            "lat": np.round(lat, 7),
            "timestamp": [
                datetime(y, 5, 1 + i % 28, 10, 30, tzinfo=UTC).isoformat().replace("+00:00", "Z")
                for i, y in enumerate(year)
            ],
            "heading": np.round(rng.uniform(0, 360, count), 2),
            "year": year,
        }
    )
    fake = FakePanoramaApi(
        endpoint=server.url_for(API_PATH),
        base_url=server.url_for("").rstrip("/"),
        panoramas=panoramas,
    )
    server.expect_request(API_PATH).respond_with_handler(lambda r: _search(fake, r))
    server.expect_request(_IMAGE).respond_with_handler(lambda r: _image(fake, r))
    return fake


def _json(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload), status, mimetype="application/json")


def _search(fake: FakePanoramaApi, request: Request) -> Response:
    fake.api_requests += 1
    queued = fake.faults.get("search")
    if queued:
        return queued.pop(0)
    args = request.args
    if args.get("srid") != "4326":
        return _json({"detail": "this fake answers srid=4326 only"}, 400)
    table = fake.panoramas
    if "bbox" in args:
        west, north, east, south = (float(v) for v in args["bbox"].split(","))
        table = table[table["lon"].between(west, east) & table["lat"].between(south, north)]
    day = table["timestamp"].str[:10].map(date.fromisoformat)
    if "timestamp_after" in args:
        table = table[day >= date.fromisoformat(args["timestamp_after"])]
    if "timestamp_before" in args:
        table = table[day.loc[table.index] <= date.fromisoformat(args["timestamp_before"])]
    if "tags" in args:
        wanted = set(args["tags"].split(","))
        table = table[[wanted <= {f"mission-{y}", "mission-bi"} for y in table["year"]]]
    size = int(args.get("page_size", 20))
    page = int(args.get("page", 1))
    rows = table.iloc[(page - 1) * size : page * size]

    def link(number: int) -> dict:
        query = {**args.to_dict(), "page": number}
        return {"href": f"{fake.endpoint}?" + "&".join(f"{k}={v}" for k, v in query.items())}

    return _json(
        {
            "_links": {
                "self": link(page),
                "next": link(page + 1) if page * size < len(table) else {"href": None},
                "previous": link(page - 1) if page > 1 else {"href": None},
            },
            "count": len(table),
            "page_size": size,
            "_embedded": {"panoramas": [fake.record(row) for _, row in rows.iterrows()]},
        }
    )


def _image(fake: FakePanoramaApi, request: Request) -> Response:
    match = _IMAGE.match(request.path)
    pano_id = match.group(2) if match else ""
    fake.image_requests[pano_id] += 1
    queued = fake.faults.get(pano_id)
    if queued:
        return queued.pop(0)
    if pano_id not in set(fake.panoramas["pano_id"]):
        return Response("Not Found", 404)
    return Response(fake.image, 200, mimetype="image/jpeg")
