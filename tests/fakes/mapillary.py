"""A fake Mapillary Graph API (v4) and thumbnail CDN.

It answers what ``https://graph.mapillary.com/images`` answers: ``{"data": [...]}`` with the
``fields`` asked for (``id`` always; ``captured_at`` in milliseconds, ``compass_angle``,
``computed_compass_angle``, ``geometry``/``computed_geometry`` as GeoJSON points,
``sequence``, ``is_pano``, ``creator`` {``id``, ``username``}, ``thumb_1024_url``), for the
images inside ``bbox=west,south,east,north``, at most ``limit`` (default and most 2,000);
``start_captured_at``/``end_captured_at`` filter by time. With ``page_size`` set, answers come
in pages linked by ``paging.next`` (with ``paging.cursors``), as Graph API collections do.
A token other than the one it knows gets HTTP 401 with the Graph API's error JSON
(``OAuthException`` code 190, "Error validating access token: Session has expired ...").
Thumbnails are JPEGs on a CDN path with signed-looking parameters. Faults can be queued.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from PIL import Image
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

IMAGES_PATH = "/images"
_THUMB = re.compile(r"^/m1/v/t6/(\d+)_1024\.jpg$")
EXPIRED = {
    "error": {
        "message": "Error validating access token: Session has expired on Tuesday, 01-Dec-26 "
        "10:00:00 PST. The current time is Wednesday, 02-Dec-26 02:00:00 PST.",
        "type": "OAuthException",
        "code": 190,
        "error_subcode": 463,
        "fbtrace_id": "AbCdEf0123456789",
    }
}


def thumbnail() -> bytes:
    pixels = np.full((48, 64, 3), (90, 140, 200), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG")
    return out.getvalue()


@dataclass
class FakeMapillary:
    """A running fake; see :func:`install_mapillary`.

    Attributes:
        endpoint: the Graph API base URL (what ``GRAPH`` is for the real service).
        token: the only token it accepts.
        images: one row per image: ``id, lon, lat, captured_at (ms), compass, sequence``.
        searches: ``/images`` requests answered (faults included).
        thumb_requests: thumbnail requests per image id.
        faults: responses queued for ``"search"`` or per image id, served first.
    """

    endpoint: str
    token: str
    images: pd.DataFrame
    page_size: int | None = None
    searches: int = 0
    thumb_requests: Counter = field(default_factory=Counter)
    faults: dict[str, list[Response]] = field(default_factory=dict)
    jpeg: bytes = field(default_factory=thumbnail)

    def inject(self, target: str, *responses: Response) -> None:
        """Answer the next requests for ``target`` ("search" or an image id) with these."""
        self.faults.setdefault(target, []).extend(responses)

    def record(self, row: pd.Series, fields: set[str]) -> dict:
        point = {"type": "Point", "coordinates": [row["lon"], row["lat"]]}
        full = {
            "id": row["id"],
            "captured_at": int(row["captured_at"]),
            "compass_angle": row["compass"],
            "computed_compass_angle": (row["compass"] + 2.5) % 360,
            "geometry": {"type": "Point", "coordinates": [row["lon"] + 1e-5, row["lat"]]},
            "computed_geometry": point,
            "sequence": row["sequence"],
            "is_pano": False,
            "creator": {"id": "10001", "username": f"mapper{int(row['id']) % 3}"},
            "thumb_1024_url": f"{self.endpoint}/m1/v/t6/{row['id']}_1024.jpg"
            f"?stp=s1024x768&ccb=10-5&oh=00_AfB{row['id'][-6:]}&oe=6A1B2C3D&_nc_sid=201bca",
        }
        return {k: v for k, v in full.items() if k in fields or k == "id"}


def install_mapillary(
    server: HTTPServer,
    bbox_wgs84: tuple[float, float, float, float],
    *,
    token: str,
    count: int = 30,
    page_size: int | None = None,
    seed: int = 1,
) -> FakeMapillary:
    """Serve ``count`` images inside ``bbox_wgs84`` on ``server`` for ``token``."""
    rng = np.random.default_rng(seed)
    min_lon, min_lat, max_lon, max_lat = bbox_wgs84
    lon = min_lon + (max_lon - min_lon) * rng.uniform(0.25, 0.75, count)
    lat = min_lat + (max_lat - min_lat) * rng.uniform(0.25, 0.75, count)
    start = datetime(2015, 1, 1, tzinfo=UTC).timestamp() * 1000
    span = (datetime(2024, 1, 1, tzinfo=UTC).timestamp() * 1000) - start
    images = pd.DataFrame(
        {
            "id": [str(300_000_000_000_000 + 7919 * i) for i in range(count)],
            "lon": np.round(lon, 7),
            "lat": np.round(lat, 7),
            "captured_at": (start + span * rng.uniform(0, 1, count)).astype(np.int64),
            "compass": np.round(rng.uniform(0, 360, count), 3),
            "sequence": [f"seq{i // 5:04d}abcdefghij" for i in range(count)],
        }
    )
    fake = FakeMapillary(
        endpoint=server.url_for("").rstrip("/"), token=token, images=images, page_size=page_size
    )
    server.expect_request(IMAGES_PATH).respond_with_handler(lambda r: _images(fake, r))
    server.expect_request(_THUMB).respond_with_handler(lambda r: _thumb(fake, r))
    return fake


def _json(payload: dict, status: int = 200) -> Response:
    return Response(json.dumps(payload), status, mimetype="application/json")


def _ms(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000


def _images(fake: FakeMapillary, request: Request) -> Response:
    fake.searches += 1
    queued = fake.faults.get("search")
    if queued:
        return queued.pop(0)
    args = request.args
    if args.get("access_token") != fake.token:
        return _json(EXPIRED, 401)
    try:
        west, south, east, north = (float(v) for v in args["bbox"].split(","))
    except (KeyError, ValueError):
        return _json(
            {"error": {"message": "Invalid bbox", "type": "MLYApiException", "code": 100}}, 400
        )
    table = fake.images
    table = table[table["lon"].between(west, east) & table["lat"].between(south, north)]
    if "start_captured_at" in args:
        table = table[table["captured_at"] >= _ms(args["start_captured_at"])]
    if "end_captured_at" in args:
        table = table[table["captured_at"] <= _ms(args["end_captured_at"])]
    table = table.iloc[: min(int(args.get("limit", 2000)), 2000)]
    fields = set(args.get("fields", "id").split(","))
    start = int(args.get("after", 0))
    size = fake.page_size or len(table) or 1
    rows = table.iloc[start : start + size]
    answer: dict = {"data": [fake.record(row, fields) for _, row in rows.iterrows()]}
    if fake.page_size is not None and start + size < len(table):
        query = {**args.to_dict(), "after": start + size}
        answer["paging"] = {
            "cursors": {"before": str(start), "after": str(start + size)},
            "next": f"{fake.endpoint}{IMAGES_PATH}?"
            + "&".join(f"{k}={v}" for k, v in query.items()),
        }
    return _json(answer)


def _thumb(fake: FakeMapillary, request: Request) -> Response:
    match = _THUMB.match(request.path)
    image_id = match.group(1) if match else ""
    fake.thumb_requests[image_id] += 1
    queued = fake.faults.get(image_id)
    if queued:
        return queued.pop(0)
    if image_id not in set(fake.images["id"]):
        return Response("URL signature expired", 403)
    return Response(fake.jpeg, 200, mimetype="image/jpeg")
