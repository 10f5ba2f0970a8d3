"""The Amsterdam panorama client against a fake panorama API on loopback."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from werkzeug import Response

from core.dataroot import DataRoot
from core.sources.amsterdam_panorama import (
    SOURCE,
    ViewSpec,
    estimate_amsterdam_panorama,
    fetch_amsterdam_panorama,
    perspective,
    search_panoramas,
)
from core.sources.catalog import read_catalog
from core.sources.http import FetchError, HttpClient, cached_session
from core.sources.street_fetch import grid_bbox_wgs84
from tests.fakes import FAST, Sleeps
from tests.fakes.amsterdam_panorama import decode_bearing, install_amsterdam_panorama

SPEC = ViewSpec(headings=(0.0, 90.0, 180.0, 270.0), fov=60.0, width=48, height=32)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(sleeps) -> HttpClient:
    return HttpClient(FAST, sleep=sleeps)


@pytest.fixture(scope="module")
def bbox(tiny_demo):
    return grid_bbox_wgs84(DataRoot(tiny_demo).grid)


def grid_root(tiny_demo, tmp_path: Path) -> DataRoot:
    """An empty data root holding only the demo's grid."""
    root = DataRoot(tmp_path)
    root.grid.parent.mkdir(parents=True, exist_ok=True)
    root.grid.write_bytes(DataRoot(tiny_demo).grid.read_bytes())
    return root


def bearings(width: int = 360) -> np.ndarray:
    """An equirectangular image (unit vectors of each column's bearing, centre = north)."""
    bearing = np.radians((np.arange(width) + 0.5) / width * 360 - 180)
    row = np.stack([np.cos(bearing), np.sin(bearing)], -1)
    return np.repeat(row[None], width // 2, axis=0)


@pytest.mark.parametrize("heading", [0.0, 37.5, 90.0, 180.0, 271.0, 359.0])
def test_a_view_looks_at_its_compass_heading(heading):
    view = perspective(bearings(), heading, ViewSpec(fov=60, width=65, height=33))
    seen = np.degrees(np.arctan2(view[..., 1], view[..., 0])) % 360
    assert seen[16, 32] == pytest.approx(heading, abs=0.6)
    # a pinhole camera: the edge columns on the horizon look fov / 2 to either side
    assert (seen[16, -1] - heading) % 360 == pytest.approx(30, abs=0.6)
    assert (heading - seen[16, 0]) % 360 == pytest.approx(30, abs=0.6)


def test_search_follows_the_pages_and_filters_by_time(httpserver, client, bbox):
    fake = install_amsterdam_panorama(httpserver, bbox, count=12)
    records = search_panoramas(client, bbox, endpoint=fake.endpoint, page_size=5)
    assert sorted(r["pano_id"] for r in records) == sorted(fake.panoramas["pano_id"])
    assert fake.api_requests == 3

    recent = search_panoramas(
        client, bbox, after=date(2018, 1, 1), before=date(2020, 12, 31), endpoint=fake.endpoint
    )
    assert {r["mission_year"] for r in recent} == {"2019"}


def test_an_empty_area_finds_nothing_and_writes_an_empty_catalog_part(
    httpserver, tiny_demo, tmp_path, client, bbox
):
    fake = install_amsterdam_panorama(httpserver, bbox)
    far = (5.5, 53.0, 5.51, 53.01)
    assert search_panoramas(client, far, endpoint=fake.endpoint) == []
    done = fetch_amsterdam_panorama(
        grid_root(tiny_demo, tmp_path),
        far,
        spec=SPEC,
        client=client,
        image_client=client,
        endpoint=fake.endpoint,
        show_progress=False,
    )
    assert done.rows.empty and not fake.image_requests


def test_fetch_cuts_views_with_position_heading_time_and_licence(
    httpserver, tiny_demo, tmp_path, client, bbox
):
    fake = install_amsterdam_panorama(httpserver, bbox, count=6)
    root = grid_root(tiny_demo, tmp_path)
    done = fetch_amsterdam_panorama(
        root,
        bbox,
        spec=SPEC,
        client=client,
        image_client=client,
        endpoint=fake.endpoint,
        show_progress=False,
        batch=4,
    )
    catalog = read_catalog(root.catalog, check_images=True)
    assert catalog.problems.empty
    images = catalog.images.set_index("id")
    assert len(images) == 6 * 4 and set(images["source"]) == {SOURCE}
    for pano in fake.panoramas.itertuples():
        for heading in SPEC.headings:
            view = images.loc[f"{SOURCE}_{pano.pano_id}_{int(heading):03d}"]
            assert view["pano_id"] == pano.pano_id and view["heading"] == heading
            assert view["captured_at"] == pd.Timestamp(pano.timestamp)
            pixels = np.asarray(Image.open(view["path"]))
            assert pixels.shape == (32, 48, 3)
            shown = decode_bearing(pixels[16, 24])
            assert min(abs(shown - heading), 360 - abs(shown - heading)) < 4
    stored = pd.read_parquet(root.catalog)
    assert stored["license"].str.contains("Gemeente Amsterdam").all()
    assert set(stored["mission_year"]) == {"2017", "2019", "2021"}
    assert not list((root.cache / SOURCE).glob("*.jpg"))  # panoramas deleted once cut
    assert done.report.fetched == 6 and sum(fake.image_requests.values()) == 6

    again = fetch_amsterdam_panorama(
        root,
        bbox,
        spec=SPEC,
        client=client,
        image_client=client,
        endpoint=fake.endpoint,
        show_progress=False,
    )
    assert again.report.skipped == 6 and sum(fake.image_requests.values()) == 6


def test_a_rate_limit_answer_is_waited_out_and_retried(
    httpserver, tiny_demo, tmp_path, client, sleeps, bbox
):
    fake = install_amsterdam_panorama(httpserver, bbox, count=3)
    fake.inject("search", Response("slow down", 429, headers={"Retry-After": "7"}))
    pano = fake.panoramas["pano_id"][0]
    fake.inject(pano, Response("busy", 503))
    done = fetch_amsterdam_panorama(
        grid_root(tiny_demo, tmp_path),
        bbox,
        spec=SPEC,
        client=client,
        image_client=client,
        endpoint=fake.endpoint,
        show_progress=False,
    )
    assert len(done.rows) == 3 * 4
    assert 7.0 in sleeps and fake.image_requests[pano] == 2


def test_a_panorama_failing_for_good_names_it_and_keeps_the_others(
    httpserver, tiny_demo, tmp_path, client, bbox
):
    fake = install_amsterdam_panorama(httpserver, bbox, count=3)
    pano = fake.panoramas["pano_id"][1]
    fake.inject(pano, *[Response("gone", 404)])
    root = grid_root(tiny_demo, tmp_path)
    with pytest.raises(FetchError, match=f"1 Amsterdam panorama downloads failed.*{pano}"):
        fetch_amsterdam_panorama(
            root,
            bbox,
            spec=SPEC,
            client=client,
            image_client=client,
            endpoint=fake.endpoint,
            show_progress=False,
        )
    views = list((root.catalog.parent / "images" / SOURCE).rglob("*.jpg"))
    assert len(views) == 2 * 4 and not root.catalog.exists()


def test_the_cache_answers_a_rerun_without_asking_the_api_again(
    httpserver, tiny_demo, tmp_path, sleeps, bbox
):
    fake = install_amsterdam_panorama(httpserver, bbox, count=7)
    cache = tmp_path / "cache" / "http" / f"{SOURCE}.sqlite"

    def search() -> tuple[list[dict], HttpClient]:
        api = HttpClient(FAST, session=cached_session(cache), sleep=sleeps)
        return search_panoramas(api, bbox, endpoint=fake.endpoint, page_size=3), api

    first, api = search()
    assert fake.api_requests == api.requests_made == 3
    second, api = search()
    assert second == first
    assert fake.api_requests == 3 and api.requests_made == 0  # no rate-limit wait either


def test_a_bad_answer_names_the_url(httpserver, client, bbox):
    fake = install_amsterdam_panorama(httpserver, bbox)
    fake.inject("search", Response('{"detail": "Not found."}', 200, mimetype="application/json"))
    with pytest.raises(FetchError, match="without _embedded.panoramas"):
        search_panoramas(client, bbox, endpoint=fake.endpoint)


def test_the_estimate_counts_panoramas_and_views(httpserver, client, bbox):
    fake = install_amsterdam_panorama(httpserver, bbox, count=9)
    estimate = estimate_amsterdam_panorama(bbox, spec=SPEC, client=client, endpoint=fake.endpoint)
    assert estimate.requests == 1 + 9
    assert "9 panoramas" in estimate.note and "36 views" in estimate.note
    assert "no key, free" in estimate.note and "Gemeente Amsterdam" in estimate.note
