"""A fake Google Street View Static API serving a demo data root's GSV panoramas.

It answers what ``https://maps.googleapis.com`` answers on the two Street View endpoints:

- ``/maps/api/streetview/metadata?location=lat,lng&radius=..`` (or ``pano=..``): JSON with
  ``status`` OK (``copyright``, ``date`` "YYYY-MM", ``location`` {lat, lng}, ``pano_id``),
  ZERO_RESULTS, REQUEST_DENIED (with ``error_message``) or INVALID_REQUEST. Like the real API
  it returns the latest panorama nearest the location within the radius (default 50 m);
  older captures at the same place are reachable only by their ``pano`` id.
- ``/maps/api/streetview?size=WxH&pano=..&heading=..&fov=..&pitch=..``: the demo's JPEG of
  that panorama whose heading is nearest the one asked for; an unknown panorama gives the
  grey "no imagery" JPEG, or 404 with ``return_error_code=true``; a bad key gives 403.

With a signing secret, requests must carry a valid ``signature`` (HMAC-SHA1 of path and
query), else 403. Faults (429, 5xx, corrupt payloads, metadata statuses) can be queued.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image
from pyproj import Transformer
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from core.dataroot import DataRoot
from core.sources.catalog import read_catalog

METADATA_PATH = "/maps/api/streetview/metadata"
IMAGE_PATH = "/maps/api/streetview"
_EARTH_RADIUS_M = 6_371_000.0


@dataclass
class FakeGsv:
    """A running fake; see :func:`install_gsv`.

    Attributes:
        endpoint: scheme and host (what ``GOOGLE_MAPS`` is for the real service).
        api_key: the only key it accepts.
        signing_secret: when set, every request must be signed with it.
        panoramas: one row per demo panorama: ``pano_id, lon, lat, date``.
        views: one row per demo image: ``pano_id, heading, file``.
        metadata_requests: how many metadata requests came.
        image_requests: how often each (pano id, heading) view was asked for.
        faults: responses queued for ``"metadata"`` or a pano id, served (and consumed) first.
    """

    endpoint: str
    api_key: str
    signing_secret: str | None
    panoramas: pd.DataFrame
    views: pd.DataFrame
    metadata_requests: int = 0
    image_requests: Counter = field(default_factory=Counter)
    faults: dict[str, list[Response]] = field(default_factory=dict)

    def inject(self, target: str, *responses: Response) -> None:
        """Answer the next requests for ``target`` ("metadata" or a pano id) with ``responses``."""
        self.faults.setdefault(target, []).extend(responses)


def install_gsv(
    server: HTTPServer,
    root: str | DataRoot,
    *,
    api_key: str = "fake-gsv-key",
    signing_secret: str | None = None,
) -> FakeGsv:
    """Serve the GSV panoramas of the demo data root ``root`` on ``server``."""
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    images = read_catalog(root.catalog).images
    images = images[images["source"] == "gsv"].reset_index(drop=True)
    lon, lat = Transformer.from_crs("EPSG:28992", "EPSG:4326", always_xy=True).transform(
        images["x"].to_numpy(), images["y"].to_numpy()
    )
    views = pd.DataFrame(
        {
            "pano_id": images["pano_id"].astype(str),
            "heading": images["heading"],
            "file": images["path"],
            "lon": lon,
            "lat": lat,
            "date": images["captured_at"].dt.strftime("%Y-%m"),
        }
    )
    panoramas = (
        views.groupby("pano_id", sort=True)
        .agg(lon=("lon", "first"), lat=("lat", "first"), date=("date", "first"))
        .reset_index()
    )
    fake = FakeGsv(
        endpoint=server.url_for("").rstrip("/"),
        api_key=api_key,
        signing_secret=signing_secret,
        panoramas=panoramas,
        views=views[["pano_id", "heading", "file"]],
    )
    server.expect_request(METADATA_PATH).respond_with_handler(
        lambda request: _metadata(fake, request)
    )
    server.expect_request(IMAGE_PATH).respond_with_handler(lambda request: _image(fake, request))
    return fake


def _json(body: dict) -> Response:
    return Response(json.dumps(body), 200, mimetype="application/json")


def _auth_problem(fake: FakeGsv, request: Request) -> str | None:
    key = request.args.get("key")
    if not key:
        return "You must use an API key to authenticate each request to Google Maps Platform APIs."
    if key != fake.api_key:
        return "The provided API key is invalid."
    if fake.signing_secret is None:
        return None
    query = request.query_string.decode()
    unsigned, _, signature = query.rpartition("&signature=")
    secret = base64.urlsafe_b64decode(fake.signing_secret + "=" * (-len(fake.signing_secret) % 4))
    expected = base64.urlsafe_b64encode(
        hmac.new(secret, f"{request.path}?{unsigned}".encode(), hashlib.sha1).digest()
    ).decode()
    if not unsigned or not hmac.compare_digest(signature, expected):
        return "Unable to authenticate the request. Provided 'signature' is not valid."
    return None


def _metadata(fake: FakeGsv, request: Request) -> Response:
    fake.metadata_requests += 1
    queued = fake.faults.get("metadata")
    if queued:
        return queued.pop(0)
    problem = _auth_problem(fake, request)
    if problem:
        return _json({"error_message": problem, "status": "REQUEST_DENIED"})
    args = request.args
    panos = fake.panoramas
    if "pano" in args:
        found = panos[panos["pano_id"] == args["pano"]]
    elif "location" in args:
        try:
            lat, lon = (float(v) for v in args["location"].split(","))
            radius = float(args.get("radius", 50))
        except ValueError:
            return _json({"status": "INVALID_REQUEST"})
        distance = _metres(lon, lat, panos["lon"].to_numpy(), panos["lat"].to_numpy())
        near = distance <= radius
        if near.any():  # the nearest place, and there its latest capture
            near &= distance <= distance[near].min() + 1.0
        found = panos[near].sort_values("date").iloc[-1:]
    else:
        return _json({"status": "INVALID_REQUEST"})
    if found.empty:
        return _json({"status": "ZERO_RESULTS"})
    pano = found.iloc[0]
    return _json(
        {
            "copyright": "© Google",
            "date": pano["date"],
            "location": {"lat": round(float(pano["lat"]), 7), "lng": round(float(pano["lon"]), 7)},
            "pano_id": pano["pano_id"],
            "status": "OK",
        }
    )


def _metres(lon: float, lat: float, lons: np.ndarray, lats: np.ndarray) -> np.ndarray:
    dx = np.radians(lons - lon) * np.cos(np.radians(lat))
    return _EARTH_RADIUS_M * np.hypot(dx, np.radians(lats - lat))


def _image(fake: FakeGsv, request: Request) -> Response:
    args = request.args
    pano_id, heading = args.get("pano", ""), float(args.get("heading", 0))
    fake.image_requests[(pano_id, heading)] += 1
    queued = fake.faults.get(pano_id)
    if queued:
        return queued.pop(0)
    problem = _auth_problem(fake, request)
    if problem:
        return Response(f"The Google Maps Platform server rejected your request. {problem}", 403)
    try:
        width, height = (int(v) for v in args.get("size", "").split("x"))
    except ValueError:
        return Response("Invalid request. Invalid 'size' parameter.", 400)
    if not (0 < width <= 640 and 0 < height <= 640):
        return Response("Invalid request. Invalid 'size' parameter.", 400)
    views = fake.views[fake.views["pano_id"] == pano_id]
    if views.empty:
        if args.get("return_error_code") == "true":
            return Response("", 404)
        return Response(_no_imagery(width, height), 200, mimetype="image/jpeg")
    gap = np.abs((views["heading"].to_numpy() - heading + 180) % 360 - 180)
    with open(views["file"].iloc[int(np.argmin(gap))], "rb") as f:
        return Response(f.read(), 200, mimetype="image/jpeg")


def _no_imagery(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (228, 227, 223)).save(buffer, "JPEG")
    return buffer.getvalue()
