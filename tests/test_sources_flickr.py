"""The Flickr client against a fake Flickr serving the tiny demo city's photos."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from werkzeug import Response

from core.dataroot import DataRoot
from core.sources.catalog import read_catalog
from core.sources.flickr import (
    API_KEY_ENV,
    FlickrError,
    estimate_flickr,
    fetch_flickr,
    search_photos,
)
from core.sources.http import FetchError, HttpClient
from core.sources.street_fetch import grid_bbox_wgs84, validate_jpeg
from tests.fakes import FAST, Sleeps
from tests.fakes.flickr import install_flickr

KEY = "flickr-key-0123456789abcdef"
SINCE = datetime(2000, 1, 1)
UNTIL = datetime(2025, 1, 1)  # after the demo's last Flickr year, 2024


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(sleeps) -> HttpClient:
    return HttpClient(FAST, secrets=[KEY], sleep=sleeps)


@pytest.fixture(scope="module")
def bbox(tiny_demo):
    return grid_bbox_wgs84(DataRoot(tiny_demo).grid)


def fetch(fake, root: Path, client: HttpClient, bbox, **options):
    options = {
        "min_taken": SINCE,
        "max_taken": UNTIL,
        "api_key": KEY,
        "client": client,
        "endpoint": fake.endpoint,
        "show_progress": False,
        **options,
    }
    return fetch_flickr(root, bbox, **options)


def test_fetch_writes_every_demo_photo_with_its_metadata(
    httpserver, tiny_demo, tmp_path, client, bbox
):
    fake = install_flickr(httpserver, tiny_demo, api_key=KEY)
    result = fetch(fake, tmp_path, client, bbox)

    catalog = read_catalog(DataRoot(tmp_path).catalog)
    assert catalog.problems.empty
    images = catalog.images.set_index("id")
    assert len(images) == len(fake.photos) == 95
    assert set(images["source"]) == {"flickr"}
    demo = read_catalog(DataRoot(tiny_demo).catalog).images.set_index("id")
    for photo in fake.photos.itertuples():
        mine, theirs = images.loc[f"flickr_{photo.photo_id}"], demo.loc[photo.demo_id]
        assert abs(mine["x"] - theirs["x"]) < 0.5 and abs(mine["y"] - theirs["y"]) < 0.5
        assert mine["captured_at"] == theirs["captured_at"]
        assert mine["title"] == theirs["title"] and mine["tags"] == theirs["tags"]
        assert Path(mine["path"]).read_bytes() == Path(theirs["path"]).read_bytes()
        assert Path(mine["path"]).is_relative_to(tmp_path / "street" / "images" / "flickr")
    stored = pd.read_parquet(DataRoot(tmp_path).catalog)
    assert set(stored["license"]) == {"Attribution License"}
    assert set(stored["license_url"]) == {"https://creativecommons.org/licenses/by/2.0/"}
    assert stored["owner"].str.endswith(tuple(f"@N0{i}" for i in range(8))).all()
    assert stored["owner_name"].str.startswith("demo photographer").all()
    assert (stored["size"] == "z").all()
    assert result.report.fetched == 95 and not result.report.failed
    assert fake.calls["flickr.photos.licenses.getInfo"] == 1


def test_paging_and_the_result_cap_find_every_photo_once(httpserver, tiny_demo, client, bbox):
    fake = install_flickr(httpserver, tiny_demo, api_key=KEY, cap=20)
    photos = search_photos(
        client,
        KEY,
        bbox,
        min_taken=SINCE,
        max_taken=UNTIL,
        endpoint=fake.endpoint,
        per_page=7,
        cap=20,
    )
    ids = [p["id"] for p in photos]
    assert len(ids) == len(set(ids)) == len(fake.photos)
    assert fake.calls["flickr.photos.search"] > 95 / 7  # split into windows, each paged


def test_a_capped_query_without_split_would_lose_photos(httpserver, tiny_demo, client, bbox):
    fake = install_flickr(httpserver, tiny_demo, api_key=KEY, cap=20)
    pages = [
        client.get_json(
            fake.endpoint,
            {
                "method": "flickr.photos.search",
                "api_key": KEY,
                "format": "json",
                "nojsoncallback": 1,
                "bbox": ",".join(map(str, bbox)),
                "min_taken_date": "2000-01-01 00:00:00",
                "sort": "date-taken-asc",
                "per_page": 10,
                "page": page,
            },
        )
        for page in range(1, 11)
    ]
    seen = {p["id"] for page in pages for p in page["photos"]["photo"]}
    assert pages[0]["photos"]["total"] == 95 and len(seen) == 20  # pages past the cap repeat


def test_cap_split_in_space_when_time_cannot_split(httpserver, tiny_demo, client, bbox):
    fake = install_flickr(httpserver, tiny_demo, api_key=KEY, cap=10)
    photos = search_photos(
        client,
        KEY,
        bbox,
        min_taken=SINCE,
        max_taken=UNTIL,
        endpoint=fake.endpoint,
        per_page=5,
        cap=10,
        min_window=UNTIL - SINCE,
    )
    assert sorted(p["id"] for p in photos) == sorted(fake.photos["photo_id"])


def test_licence_filter_keeps_only_allowed_licences(httpserver, tiny_demo, tmp_path, client, bbox):
    fake = install_flickr(httpserver, tiny_demo, api_key=KEY, license_ids=(0, 4, 5))
    fetch(fake, tmp_path, client, bbox, licenses={4, 5})
    stored = pd.read_parquet(DataRoot(tmp_path).catalog)
    allowed = fake.photos[fake.photos["license"].isin([4, 5])]
    assert sorted(stored["id"]) == sorted(f"flickr_{i}" for i in allowed["photo_id"])
    assert set(stored["license_id"]) == {4, 5}
    assert set(stored["license"]) == {"Attribution License", "Attribution-ShareAlike License"}
    with pytest.raises(ValueError, match=r"unknown Flickr licence ids \[99\]"):
        fetch(fake, tmp_path, client, bbox, licenses={4, 99})


def test_size_preference_falls_back_when_a_size_is_missing(
    httpserver, tiny_demo, tmp_path, client, bbox
):
    fake = install_flickr(httpserver, tiny_demo, api_key=KEY)
    fetch(fake, tmp_path, client, bbox, sizes=("c", "z"))
    stored = pd.read_parquet(DataRoot(tmp_path).catalog).set_index("id")
    taken = fake.photos.set_index("photo_id")["datetaken"]
    expected = np.where(taken.dt.year >= 2010, "c", "z")
    assert list(stored.loc[[f"flickr_{i}" for i in taken.index], "size"]) == list(expected)
    assert 0 < (expected == "z").sum() < len(expected)


def test_invalid_key_is_a_clear_error_without_the_key(
    httpserver, tiny_demo, tmp_path, client, bbox
):
    fake = install_flickr(httpserver, tiny_demo, api_key="the-right-key")
    with pytest.raises(FlickrError, match=rf"error 100: Invalid API Key.*\${API_KEY_ENV}") as error:
        fetch(fake, tmp_path, client, bbox)
    assert error.value.code == 100 and KEY not in str(error.value)
    assert not DataRoot(tmp_path).catalog.exists()


def test_stat_fail_of_the_search_is_an_error(httpserver, tiny_demo, tmp_path, client, bbox):
    fake = install_flickr(httpserver, tiny_demo, api_key=KEY)
    fake.inject(
        "search",
        Response(
            '{"stat":"fail","code":10,"message":"Sorry, the Flickr search API is not '
            'currently available."}',
            200,
            mimetype="application/json",
        ),
    )
    with pytest.raises(FlickrError, match="flickr.photos.search failed: error 10: Sorry") as error:
        fetch(fake, tmp_path, client, bbox)
    assert error.value.code == 10
    fake.inject(
        "search",
        Response('{"stat":"ok"}', 200, mimetype="application/json"),
        Response("<html>maintenance</html>", 200, mimetype="text/html"),
    )
    with pytest.raises(FetchError, match="answered without photos"):
        fetch(fake, tmp_path, client, bbox)
    with pytest.raises(FetchError, match="not JSON: '<html>maintenance"):
        fetch(fake, tmp_path, client, bbox)


def test_missing_key_names_the_environment_variable(monkeypatch, tmp_path, bbox):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=API_KEY_ENV):
        fetch_flickr(tmp_path, bbox, show_progress=False)


def test_429_retry_after_and_5xx_are_retried(httpserver, tiny_demo, tmp_path, client, sleeps, bbox):
    fake = install_flickr(httpserver, tiny_demo, api_key=KEY)
    fake.inject(
        "search",
        Response("Too Many Requests", 429, headers={"Retry-After": "7"}),
        Response("Bad Gateway", 502),
    )
    first = fake.photos["photo_id"].iloc[0]
    fake.inject(first, Response("Service Unavailable", 503))
    fetch(fake, tmp_path, client, bbox)
    assert sleeps[0] == 7.0 and len(sleeps) == 3
    assert fake.image_requests[first] == 2
    assert len(read_catalog(DataRoot(tmp_path).catalog).images) == 95


def test_corrupt_images_are_fetched_again(httpserver, tiny_demo, tmp_path, client, bbox):
    fake = install_flickr(httpserver, tiny_demo, api_key=KEY)
    first, second = fake.photos["photo_id"].iloc[:2]
    good = Path(fake.photos["file"].iloc[0]).read_bytes()
    fake.inject(first, Response(good[: len(good) // 2], 200, mimetype="image/jpeg"))
    fetch(fake, tmp_path, client, bbox)
    assert fake.image_requests[first] == 2
    stored = read_catalog(DataRoot(tmp_path).catalog).images.set_index("id")
    validate_jpeg(Path(stored.loc[f"flickr_{first}", "path"]).read_bytes())

    on_disk = Path(stored.loc[f"flickr_{second}", "path"])
    on_disk.write_bytes(on_disk.read_bytes()[:100])  # truncated by a crash outside the client
    result = fetch(fake, tmp_path, client, bbox)
    assert result.report.fetched == 1 and result.report.skipped == 94
    assert fake.image_requests[second] == 2
    validate_jpeg(on_disk.read_bytes())


def test_interrupted_download_resumes_without_refetching(
    httpserver, tiny_demo, tmp_path, client, bbox
):
    fake = install_flickr(httpserver, tiny_demo, api_key=KEY)
    broken = list(fake.photos["photo_id"].iloc[[3, 40]])
    for photo_id in broken:
        fake.inject(photo_id, Response("Not Found", 404))
    with pytest.raises(FetchError, match="2 Flickr image downloads failed"):
        fetch(fake, tmp_path, client, bbox)
    assert not DataRoot(tmp_path).catalog.exists()  # nothing half-written
    assert len(list((tmp_path / "street").rglob("*.jpg"))) == 93

    result = fetch(fake, tmp_path, client, bbox)
    assert result.report.fetched == 2 and result.report.skipped == 93
    assert all(fake.image_requests[i] == 2 for i in broken)
    assert all(n == 1 for i, n in fake.image_requests.items() if i not in broken)
    assert len(read_catalog(DataRoot(tmp_path).catalog).images) == 95


def test_the_key_is_never_logged_or_written(httpserver, tiny_demo, tmp_path, client, bbox, caplog):
    fake = install_flickr(httpserver, tiny_demo, api_key=KEY)
    fake.inject("search", Response(f"echo api_key={KEY}", 500))
    fake.inject(fake.photos["photo_id"].iloc[0], Response(f"bad key {KEY}", 403))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(FetchError) as error:
        fetch(fake, tmp_path, client, bbox)
    fetch(fake, tmp_path, client, bbox)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("core."))
    assert KEY not in str(error.value) and KEY not in ours
    assert "api_key=***" in ours
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_estimate_counts_from_one_search_request(httpserver, tiny_demo, client, bbox):
    fake = install_flickr(httpserver, tiny_demo, api_key=KEY, cap=40)
    estimate = estimate_flickr(
        bbox,
        min_taken=SINCE,
        max_taken=UNTIL,
        api_key=KEY,
        client=client,
        endpoint=fake.endpoint,
        per_page=10,
        cap=40,
    )
    assert fake.calls["flickr.photos.search"] == 1
    assert estimate.requests >= 95 + 10  # images + pages
    assert estimate.bytes > 0 and estimate.seconds > 0
    assert "95 photos" in estimate.note and "3600 queries/hour" in estimate.note
    assert "split into at least 3 parts" in estimate.note


def test_bad_bbox_is_rejected(client):
    with pytest.raises(ValueError, match="bbox must be WGS84"):
        search_photos(client, KEY, (52.3, 4.8, 52.4, 4.9, 0), min_taken=SINCE)
    with pytest.raises(ValueError, match="max_taken"):
        search_photos(
            client,
            KEY,
            (4.8, 52.3, 4.9, 52.4),
            min_taken=SINCE,
            max_taken=SINCE - timedelta(days=1),
        )
