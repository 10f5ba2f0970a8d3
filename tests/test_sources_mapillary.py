"""The Mapillary client against a fake Graph API on loopback."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
from werkzeug import Response

from core.dataroot import DataRoot
from core.sources.catalog import read_catalog
from core.sources.http import FetchError, HttpClient, cached_session
from core.sources.mapillary import (
    SOURCE,
    MapillaryError,
    estimate_mapillary,
    fetch_mapillary,
    search_images,
    tiles,
)
from core.sources.street_fetch import grid_bbox_wgs84
from tests.fakes import FAST, Sleeps
from tests.fakes.mapillary import install_mapillary

TOKEN = "MLY|4242424242424242|0123456789abcdef0123456789abcdef"


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(sleeps) -> HttpClient:
    return HttpClient(FAST, secrets=[TOKEN], sleep=sleeps)


@pytest.fixture(scope="module")
def bbox(tiny_demo):
    return grid_bbox_wgs84(DataRoot(tiny_demo).grid)


def fetch(fake, root: Path, client: HttpClient, bbox, **options):
    options = {
        "token": TOKEN,
        "client": client,
        "image_client": client,
        "endpoint": fake.endpoint,
        "show_progress": False,
        **options,
    }
    return fetch_mapillary(root, bbox, **options)


def test_tiles_cover_the_box_without_gaps():
    parts = tiles((4.80, 52.30, 4.825, 52.305), 0.01)
    assert len(parts) == 3
    assert parts[0][:2] == (4.80, 52.30) and parts[-1][2:] == (4.825, 52.305)
    assert all(b[2] - b[0] <= 0.01 + 1e-12 and b[3] - b[1] <= 0.01 + 1e-12 for b in parts)
    with pytest.raises(ValueError, match="bbox must be WGS84"):
        tiles((4.9, 52.3, 4.8, 52.4))


def test_fetch_writes_every_image_with_heading_time_and_licence(httpserver, tmp_path, client, bbox):
    fake = install_mapillary(httpserver, bbox, token=TOKEN, count=30)
    done = fetch(fake, tmp_path, client, bbox)
    catalog = read_catalog(DataRoot(tmp_path).catalog, check_images=True)
    assert catalog.problems.empty
    images = catalog.images.set_index("id")
    assert len(images) == 30 and set(images["source"]) == {SOURCE}
    for row in fake.images.itertuples():
        image = images.loc[f"{SOURCE}_{row.id}"]
        assert image["heading"] == pytest.approx((row.compass + 2.5) % 360)  # computed angle
        assert image["captured_at"] == pd.Timestamp(row.captured_at, unit="ms", tz="UTC")
    stored = pd.read_parquet(DataRoot(tmp_path).catalog)
    assert set(stored["license"]) == {"CC BY-SA 4.0"}
    assert set(stored["license_url"]) == {"https://creativecommons.org/licenses/by-sa/4.0/"}
    assert stored["creator"].str.startswith("mapper").all()
    assert stored["sequence"].str.startswith("seq").all()
    assert done.report.fetched == 30


def test_paging_next_and_full_tiles_find_every_image_once(httpserver, client, bbox):
    fake = install_mapillary(httpserver, bbox, token=TOKEN, count=40, page_size=7)
    found = search_images(client, TOKEN, bbox, endpoint=fake.endpoint, limit=15, tile_deg=1.0)
    ids = [r["id"] for r in found]
    assert sorted(ids) == sorted(fake.images["id"]) and len(set(ids)) == len(ids)
    # the one tile was full (15 of 40): split in quadrants, each paged by 7
    assert fake.searches > 5


def test_the_capture_window_is_sent(httpserver, client, bbox):
    fake = install_mapillary(httpserver, bbox, token=TOKEN, count=30)
    since, until = datetime(2018, 1, 1), datetime(2020, 1, 1)
    found = search_images(client, TOKEN, bbox, since=since, until=until, endpoint=fake.endpoint)
    expected = fake.images[
        fake.images["captured_at"].between(
            since.timestamp() * 1000 + 0, until.timestamp() * 1000 + 0
        )
    ]
    assert 0 < len(found) < 30
    assert sorted(r["id"] for r in found) == sorted(expected["id"])


def test_an_empty_area_finds_nothing(httpserver, client, bbox):
    fake = install_mapillary(httpserver, bbox, token=TOKEN)
    assert search_images(client, TOKEN, (5.5, 53.0, 5.51, 53.01), endpoint=fake.endpoint) == []


def test_an_expired_token_is_a_clear_error_without_the_token(
    httpserver, tmp_path, bbox, sleeps, caplog
):
    fake = install_mapillary(httpserver, bbox, token="MLY|other|token")
    client = HttpClient(FAST, secrets=[TOKEN], sleep=sleeps)
    with caplog.at_level(logging.DEBUG), pytest.raises(MapillaryError) as caught:
        fetch(fake, tmp_path, client, bbox)
    error = caught.value
    assert error.code == 190 and error.kind == "OAuthException" and error.status == 401
    text = str(error)
    assert "Session has expired" in text and "MAPILLARY_TOKEN" in text
    assert "access_token=***" in text
    assert TOKEN not in text and "0123456789abcdef" not in text
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("core.")]
    assert not any("0123456789abcdef" in line for line in ours)
    assert fake.searches == 1  # a refused token is not retried


def test_a_rate_limit_is_waited_out_and_retried(httpserver, tmp_path, client, sleeps, bbox):
    fake = install_mapillary(httpserver, bbox, token=TOKEN, count=5)
    fake.inject("search", Response("", 429, headers={"Retry-After": "3"}))
    throttled = '{"error": {"message": "Application request limit reached", "type": '
    throttled += '"OAuthException", "code": 4, "fbtrace_id": "x"}}'
    fake.inject("search", Response(throttled, 400, mimetype="application/json"))
    done = fetch(fake, tmp_path, client, bbox)
    assert len(done.rows) == 5 and fake.searches == len(tiles(bbox)) + 2
    assert sleeps[0] == 3.0 and len(sleeps) == 2


def test_a_thumbnail_failing_for_good_is_named(httpserver, tmp_path, client, bbox):
    fake = install_mapillary(httpserver, bbox, token=TOKEN, count=4)
    image = fake.images["id"][2]
    fake.inject(image, Response("URL signature expired", 403))
    with pytest.raises(FetchError, match=f"1 Mapillary image downloads failed.*{image}"):
        fetch(fake, tmp_path, client, bbox)
    assert not DataRoot(tmp_path).catalog.exists()
    fetch(fake, tmp_path, client, bbox)  # the rerun fetches only that one
    assert fake.thumb_requests[image] == 2 and sum(fake.thumb_requests.values()) == 5


def test_the_cache_answers_a_rerun_and_never_stores_the_token(httpserver, tmp_path, sleeps, bbox):
    fake = install_mapillary(httpserver, bbox, token=TOKEN, count=12, page_size=5)
    cache = tmp_path / "cache" / "http" / "mapillary.sqlite"

    def search() -> tuple[list[dict], HttpClient]:
        api = HttpClient(FAST, secrets=[TOKEN], session=cached_session(cache), sleep=sleeps)
        return search_images(api, TOKEN, bbox, endpoint=fake.endpoint), api

    first, _ = search()
    asked = fake.searches
    second, api = search()
    assert second == first and fake.searches == asked and api.requests_made == 0
    stored = b"".join(p.read_bytes() for p in cache.parent.iterdir())
    assert b"0123456789abcdef" not in stored and b"4242424242424242" not in stored


def test_the_estimate_counts_a_sample_of_tiles(httpserver, client, bbox):
    fake = install_mapillary(httpserver, bbox, token=TOKEN, count=20)
    estimate = estimate_mapillary(bbox, token=TOKEN, client=client, endpoint=fake.endpoint)
    n = len(tiles(bbox))
    assert estimate.requests >= n
    assert "MAPILLARY_TOKEN" in estimate.note and "CC BY-SA 4.0" in estimate.note
    assert fake.searches == min(4, n)
