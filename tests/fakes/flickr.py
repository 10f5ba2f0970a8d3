"""A fake Flickr REST API and static image host serving a demo data root's Flickr photos.

It answers what ``https://api.flickr.com/services/rest/`` answers with ``format=json&
nojsoncallback=1``: ``flickr.photos.licenses.getInfo`` (the real licence list) and
``flickr.photos.search`` over the demo's Flickr rows (bbox, ``min/max_taken_date`` as MySQL
datetimes or unix times, ``license``, ``extras``, ``sort``, ``per_page`` up to 500, ``page``).
Like Flickr it reports the true ``total`` but lists at most ``cap`` results per query: pages
past the cap repeat the last reachable page. Errors come as HTTP 200 with ``stat: fail``
(code 100 for a bad key; a geo search without a date limit finds only the last 12 hours,
i.e. nothing). Images are served at ``url_z`` (640 px; and ``url_c``, 800 px, for photos
taken from 2010 on, as Flickr has no 800 px size for older uploads) as the demo's JPEG files.
Faults (429, 5xx, corrupt payloads) can be queued per photo or for the search.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd
from pyproj import Transformer
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from core.dataroot import DataRoot
from core.sources.catalog import read_catalog

REST_PATH = "/services/rest/"
STATIC_PREFIX = "/flickr-static/65535"
FIRST_PHOTO_ID = 52_000_000_000
#: flickr.photos.licenses.getInfo as Flickr answers it (ids 0..10).
LICENSES = [
    {"id": 0, "name": "All Rights Reserved", "url": ""},
    {"id": 4, "name": "Attribution License", "url": "https://creativecommons.org/licenses/by/2.0/"},
    {
        "id": 6,
        "name": "Attribution-NoDerivs License",
        "url": "https://creativecommons.org/licenses/by-nd/2.0/",
    },
    {
        "id": 3,
        "name": "Attribution-NonCommercial-NoDerivs License",
        "url": "https://creativecommons.org/licenses/by-nc-nd/2.0/",
    },
    {
        "id": 2,
        "name": "Attribution-NonCommercial License",
        "url": "https://creativecommons.org/licenses/by-nc/2.0/",
    },
    {
        "id": 1,
        "name": "Attribution-NonCommercial-ShareAlike License",
        "url": "https://creativecommons.org/licenses/by-nc-sa/2.0/",
    },
    {
        "id": 5,
        "name": "Attribution-ShareAlike License",
        "url": "https://creativecommons.org/licenses/by-sa/2.0/",
    },
    {
        "id": 7,
        "name": "No known copyright restrictions",
        "url": "https://www.flickr.com/commons/usage/",
    },
    {"id": 8, "name": "United States Government Work", "url": "http://www.usa.gov/copyright.shtml"},
    {
        "id": 9,
        "name": "Public Domain Dedication (CC0)",
        "url": "https://creativecommons.org/publicdomain/zero/1.0/",
    },
    {
        "id": 10,
        "name": "Public Domain Mark",
        "url": "https://creativecommons.org/publicdomain/mark/1.0/",
    },
]
_IMAGE = re.compile(r"^" + STATIC_PREFIX + r"/(\d+)_([0-9a-f]{10})_([a-z])\.jpg$")


@dataclass
class FakeFlickr:
    """A running fake; see :func:`install_flickr`.

    Attributes:
        endpoint: the REST endpoint (what ``FLICKR_REST`` is for the real service).
        api_key: the only key it accepts.
        cap: the most results one search lists.
        photos: one row per demo photo: ``photo_id, demo_id, lon, lat, datetaken, title, tags,
            license, owner, ownername, secret, file``.
        calls: how often each API method was called.
        image_requests: how often each photo id's image was asked for.
        faults: responses queued per photo id, or for ``"search"``, served (and consumed)
            before the real answer.
    """

    endpoint: str
    api_key: str
    cap: int
    photos: pd.DataFrame
    base_url: str
    calls: Counter = field(default_factory=Counter)
    image_requests: Counter = field(default_factory=Counter)
    faults: dict[str, list[Response]] = field(default_factory=dict)

    def inject(self, target: str, *responses: Response) -> None:
        """Answer the next requests for ``target`` (a photo id or "search") with ``responses``."""
        self.faults.setdefault(target, []).extend(responses)

    def image_url(self, photo: pd.Series, size: str) -> str:
        return f"{self.base_url}{STATIC_PREFIX}/{photo['photo_id']}_{photo['secret']}_{size}.jpg"


def install_flickr(
    server: HTTPServer,
    root: str | DataRoot,
    *,
    api_key: str = "fake-flickr-key",
    cap: int = 4000,
    license_ids: tuple[int, ...] = (4,),
) -> FakeFlickr:
    """Serve the Flickr photos of the demo data root ``root`` on ``server``.

    Args:
        server: a running pytest-httpserver.
        root: a demo data root.
        api_key: the key the fake accepts.
        cap: results listed per query at most (Flickr: 4,000); small in tests.
        license_ids: licences given to the photos in turn (the demo's are all CC BY 2.0 = 4).
    """
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    images = read_catalog(root.catalog).images
    images = images[images["source"] == "flickr"].sort_values("id").reset_index(drop=True)
    lon, lat = Transformer.from_crs("EPSG:28992", "EPSG:4326", always_xy=True).transform(
        images["x"].to_numpy(), images["y"].to_numpy()
    )
    ids = [str(FIRST_PHOTO_ID + i) for i in range(len(images))]
    photos = (
        pd.DataFrame(
            {
                "photo_id": ids,
                "demo_id": images["id"],
                "lon": np.round(lon, 6),
                "lat": np.round(lat, 6),
                "datetaken": images["captured_at"].dt.tz_localize(None),
                "title": images["title"].fillna(""),
                "tags": [
                    " ".join(str(t).split(",")) if isinstance(t, str) else ""
                    for t in images["tags"]
                ],
                "license": [license_ids[i % len(license_ids)] for i in range(len(images))],
                "owner": [f"{10_000_000 + i % 37}@N0{i % 8}" for i in range(len(images))],
                "ownername": [f"demo photographer {i % 37}" for i in range(len(images))],
                "secret": [hashlib.md5(i.encode()).hexdigest()[:10] for i in ids],
                "file": images["path"],
            }
        )
        .sort_values("datetaken", kind="stable")
        .reset_index(drop=True)
    )
    fake = FakeFlickr(
        endpoint=server.url_for(REST_PATH),
        api_key=api_key,
        cap=cap,
        photos=photos,
        base_url=server.url_for("").rstrip("/"),
    )
    server.expect_request(REST_PATH).respond_with_handler(lambda request: _rest(fake, request))
    server.expect_request(_IMAGE).respond_with_handler(lambda request: _image(fake, request))
    return fake


def _fail(code: int, message: str) -> Response:
    return Response(
        json.dumps({"stat": "fail", "code": code, "message": message}),
        200,
        mimetype="application/json",
    )


def _rest(fake: FakeFlickr, request: Request) -> Response:
    args = request.args
    method = args.get("method", "")
    fake.calls[method] += 1
    if args.get("format") != "json" or args.get("nojsoncallback") != "1":
        return Response(
            '<rsp stat="fail"><err code="111" msg="Format not found" /></rsp>',
            200,
            mimetype="text/xml",
        )
    if args.get("api_key") != fake.api_key:
        return _fail(100, "Invalid API Key (Key has invalid format)")
    if method == "flickr.photos.licenses.getInfo":
        return Response(
            json.dumps({"licenses": {"license": LICENSES}, "stat": "ok"}),
            200,
            mimetype="application/json",
        )
    if method != "flickr.photos.search":
        return _fail(112, f'Method "{method}" not found')
    queued = fake.faults.get("search")
    if queued:
        return queued.pop(0)
    return _search(fake, args)


def _taken_limit(value: str | None) -> datetime | None:
    if not value:
        return None
    if value.isdigit():
        return datetime.fromtimestamp(int(value), tz=UTC).replace(tzinfo=None)
    return datetime.fromisoformat(value)


def _search(fake: FakeFlickr, args) -> Response:
    photos = fake.photos
    low, high = _taken_limit(args.get("min_taken_date")), _taken_limit(args.get("max_taken_date"))
    if low is None and not (args.get("min_upload_date") or args.get("tags") or args.get("text")):
        photos = photos.iloc[:0]  # geo queries without a limiting agent: last 12 hours only
    if "bbox" in args:
        try:
            x0, y0, x1, y1 = (float(v) for v in args["bbox"].split(","))
        except ValueError:
            return _fail(18, "Illogical arguments")
        photos = photos[
            (photos["lon"] >= x0)
            & (photos["lon"] <= x1)
            & (photos["lat"] >= y0)
            & (photos["lat"] <= y1)
        ]
    if low is not None:
        photos = photos[photos["datetaken"] >= low]
    if high is not None:
        photos = photos[photos["datetaken"] <= high]
    if args.get("license"):
        photos = photos[photos["license"].isin([int(v) for v in args["license"].split(",")])]
    if args.get("sort", "date-posted-desc") != "date-taken-asc":
        photos = photos.sort_values("photo_id", ascending=False)
    per_page = min(500, int(args.get("per_page", 100)))
    page = max(1, int(args.get("page", 1)))
    total = len(photos)
    listed = photos.iloc[: fake.cap]
    start = (page - 1) * per_page
    if start >= len(listed) and len(listed):  # past the cap Flickr repeats its last page
        start = (math.ceil(len(listed) / per_page) - 1) * per_page
    extras = set(args.get("extras", "").split(","))
    records = [
        _record(fake, row, extras) for _, row in listed.iloc[start : start + per_page].iterrows()
    ]
    body = {
        "photos": {
            "page": page,
            "pages": math.ceil(total / per_page),
            "perpage": per_page,
            "total": total,
            "photo": records,
        },
        "stat": "ok",
    }
    return Response(json.dumps(body), 200, mimetype="application/json")


def _record(fake: FakeFlickr, photo: pd.Series, extras: set[str]) -> dict:
    record = {
        "id": photo["photo_id"],
        "owner": photo["owner"],
        "secret": photo["secret"],
        "server": "65535",
        "farm": 66,
        "title": photo["title"],
        "ispublic": 1,
        "isfriend": 0,
        "isfamily": 0,
    }
    if "license" in extras:
        record["license"] = str(photo["license"])
    if "date_taken" in extras:
        record.update(
            datetaken=photo["datetaken"].strftime("%Y-%m-%d %H:%M:%S"),
            datetakengranularity=0,
            datetakenunknown="0",
        )
    if "owner_name" in extras:
        record["ownername"] = photo["ownername"]
    if "tags" in extras:
        record["tags"] = photo["tags"]
    if "geo" in extras:
        record.update(
            latitude=f"{photo['lat']:.6f}",
            longitude=f"{photo['lon']:.6f}",
            accuracy="16",
            context=0,
            place_id="",
            woeid="727232",
            geo_is_public=1,
            geo_is_contact=0,
            geo_is_friend=0,
            geo_is_family=0,
        )
    sizes = {"z": 640} | ({"c": 800} if photo["datetaken"].year >= 2010 else {})
    for size, edge in sizes.items():
        if f"url_{size}" in extras:
            record.update(
                {
                    f"url_{size}": fake.image_url(photo, size),
                    f"height_{size}": edge * 3 // 4,
                    f"width_{size}": edge,
                }
            )
    return record


def _image(fake: FakeFlickr, request: Request) -> Response:
    photo_id, secret, size = _IMAGE.match(request.path).groups()
    fake.image_requests[photo_id] += 1
    queued = fake.faults.get(photo_id)
    if queued:
        return queued.pop(0)
    match = fake.photos[fake.photos["photo_id"] == photo_id]
    if match.empty or match["secret"].iloc[0] != secret or size not in ("z", "c"):
        return Response("Not Found", 404)
    with open(match["file"].iloc[0], "rb") as f:
        return Response(f.read(), 200, mimetype="image/jpeg")
