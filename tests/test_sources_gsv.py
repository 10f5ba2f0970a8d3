"""The Street View client against a fake Street View API serving the tiny demo city's panoramas."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pandas as pd
import pytest
from werkzeug import Response

from core.dataroot import DataRoot
from core.sources.catalog import read_catalog
from core.sources.flickr import fetch_flickr
from core.sources.gsv import (
    API_KEY_ENV,
    GsvError,
    cell_centres_lonlat,
    estimate_gsv,
    fetch_gsv,
    find_panoramas,
    pano_metadata,
    sign_url,
    street_points_lonlat,
)
from core.sources.http import FetchError, HttpClient
from core.sources.street_fetch import grid_bbox_wgs84, validate_jpeg
from tests.fakes import FAST, Sleeps
from tests.fakes.flickr import install_flickr
from tests.fakes.gsv import install_gsv

KEY = "AIzaFakeGsvKey0123456789"
SECRET = base64.urlsafe_b64encode(b"twenty bytes secret!").decode()
HEADINGS = (0.0, 180.0)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(sleeps) -> HttpClient:
    return HttpClient(FAST, secrets=[KEY, SECRET], sleep=sleeps)


@pytest.fixture(scope="module")
def points(tiny_demo) -> np.ndarray:
    return street_points_lonlat(DataRoot(tiny_demo).streets, spacing_m=20)


@pytest.fixture(scope="module")
def centres(tiny_demo) -> np.ndarray:
    return cell_centres_lonlat(DataRoot(tiny_demo).grid)[:12]


def fetch(fake, root: Path, client: HttpClient, points: np.ndarray, **options):
    options = {
        "headings": HEADINGS,
        "api_key": KEY,
        "client": client,
        "endpoint": fake.endpoint,
        "show_progress": False,
        **options,
    }
    return fetch_gsv(root, points, **options)


def latest_panoramas(fake) -> pd.DataFrame:
    """The panorama the official API exposes at each demo place: the latest capture."""
    panos = fake.panoramas.assign(place=fake.panoramas["pano_id"].str.rsplit("_", n=1).str[0])
    return panos.sort_values("date").groupby("place").tail(1)


def test_fetch_finds_the_latest_panorama_of_every_place(
    httpserver, tiny_demo, tmp_path, client, points
):
    fake = install_gsv(httpserver, tiny_demo, api_key=KEY)
    result = fetch(fake, tmp_path, client, points)

    catalog = read_catalog(DataRoot(tmp_path).catalog)
    assert catalog.problems.empty
    images = catalog.images
    expected = latest_panoramas(fake)
    assert sorted(images["pano_id"].unique()) == sorted(expected["pano_id"])
    assert len(images) == len(expected) * len(HEADINGS)
    assert set(images["source"]) == {"gsv"} and set(images["heading"]) == set(HEADINGS)
    assert fake.metadata_requests == len(points)
    assert result.report.fetched == len(images)

    demo = read_catalog(DataRoot(tiny_demo).catalog).images
    demo = demo[demo["source"] == "gsv"]
    for row in images.sample(20, random_state=0).itertuples():
        theirs = demo[demo["pano_id"] == row.pano_id]
        assert np.hypot(theirs["x"] - row.x, theirs["y"] - row.y).max() < 0.5
        month = theirs["captured_at"].iloc[0]
        assert (row.captured_at.year, row.captured_at.month) == (month.year, month.month)
        gap = np.abs((theirs["heading"].to_numpy() - row.heading + 180) % 360 - 180)
        assert (
            Path(row.path).read_bytes()
            == Path(theirs["path"].iloc[int(np.argmin(gap))]).read_bytes()
        )
    stored = pd.read_parquet(DataRoot(tmp_path).catalog)
    assert stored["capture_date"].str.fullmatch(r"\d{4}-\d{2}").all()
    assert set(stored["copyright"]) == {"© Google"}


def test_cell_centres_are_deduplicated_by_panorama(httpserver, tiny_demo, client, centres):
    fake = install_gsv(httpserver, tiny_demo, api_key=KEY)
    found = find_panoramas(
        client, KEY, np.vstack([centres, centres]), endpoint=fake.endpoint, show_progress=False
    )
    assert fake.metadata_requests == 2 * len(centres)
    assert 0 < len(found) <= len(centres) and found["pano_id"].is_unique


def test_older_captures_from_a_csv_are_fetched_too(
    httpserver, tiny_demo, tmp_path, client, centres
):
    fake = install_gsv(httpserver, tiny_demo, api_key=KEY)
    older = fake.panoramas[~fake.panoramas["pano_id"].isin(latest_panoramas(fake)["pano_id"])][
        "pano_id"
    ][:5]
    csv = tmp_path / "older.csv"
    pd.DataFrame({"pano_id": [*older, "no-such-pano", older.iloc[0]]}).to_csv(csv, index=False)
    fetch(fake, tmp_path / "root", client, centres[:2], pano_csv=csv)
    stored = pd.read_parquet(DataRoot(tmp_path / "root").catalog)
    assert set(older) <= set(stored["pano_id"])
    assert "no-such-pano" not in set(stored["pano_id"])
    dates = stored.drop_duplicates("pano_id").set_index("pano_id")["capture_date"]
    assert all(dates[p] == fake.panoramas.set_index("pano_id").loc[p, "date"] for p in older)


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ("OVER_QUERY_LIMIT", "quota exhausted"),
        ("INVALID_REQUEST", "malformed request"),
        ("UNKNOWN_ERROR", "server error, 4 attempts"),
        ("SOMETHING_NEW", "unexpected answer"),
    ],
)
def test_metadata_statuses_are_clear_errors(
    httpserver, tiny_demo, tmp_path, client, centres, status, message
):
    fake = install_gsv(httpserver, tiny_demo, api_key=KEY)
    fake.inject(
        "metadata", *[Response(f'{{"status": "{status}"}}', 200, mimetype="application/json")] * 4
    )
    with pytest.raises(GsvError, match=f"{status}: {message}") as error:
        fetch(fake, tmp_path, client, centres)
    assert error.value.api_status == status and error.value.status is None
    assert not fake.image_requests and not DataRoot(tmp_path).catalog.exists()


def test_unknown_error_is_retried_and_zero_results_skipped(
    httpserver, tiny_demo, client, sleeps, centres
):
    fake = install_gsv(httpserver, tiny_demo, api_key=KEY)
    fake.inject(
        "metadata", Response('{"status": "UNKNOWN_ERROR"}', 200, mimetype="application/json")
    )
    answer = pano_metadata(
        client, KEY, location=tuple(centres[0]), radius=500, endpoint=fake.endpoint
    )
    assert answer["status"] == "OK" and fake.metadata_requests == 2
    assert (
        len(sleeps) == 1 and 0 < sleeps[0] <= 1.5 * FAST.backoff_s
    )  # the client's backoff, not a real sleep
    assert (
        pano_metadata(client, KEY, location=(4.0, 52.0), endpoint=fake.endpoint) is None
    )  # in the fields
    assert pano_metadata(client, KEY, pano="no-such-pano", endpoint=fake.endpoint) is None
    fake.inject(
        "metadata", Response('{"status": "OK", "pano_id": "x"}', 200, mimetype="application/json")
    )
    with pytest.raises(GsvError, match="OK without pano_id/location"):
        pano_metadata(client, KEY, location=tuple(centres[0]), endpoint=fake.endpoint)


def test_a_bad_key_is_request_denied_without_the_key(
    httpserver, tiny_demo, tmp_path, client, centres
):
    fake = install_gsv(httpserver, tiny_demo, api_key="the-right-key")
    with pytest.raises(
        GsvError, match=rf"REQUEST_DENIED: .*\${API_KEY_ENV}.*\(The provided API key is invalid"
    ) as e:
        fetch(fake, tmp_path, client, centres)
    assert KEY not in str(e.value)


def test_missing_key_names_the_environment_variable(monkeypatch, tmp_path, centres):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=API_KEY_ENV):
        fetch_gsv(tmp_path, centres, show_progress=False)


def test_signed_urls_are_accepted_and_unsigned_refused(
    httpserver, tiny_demo, tmp_path, client, centres
):
    fake = install_gsv(httpserver, tiny_demo, api_key=KEY, signing_secret=SECRET)
    result = fetch(fake, tmp_path, client, centres[:3], signing_secret=SECRET)
    assert len(result.rows) > 0 and result.report.fetched == len(result.rows)
    with pytest.raises(GsvError, match="REQUEST_DENIED.*'signature' is not valid"):
        fetch(fake, tmp_path / "unsigned", client, centres[:3])


def test_sign_url_is_hmac_sha1_of_path_and_query():
    url = "https://maps.googleapis.com/maps/api/streetview?size=640x640&pano=abc&key=K"
    signed = sign_url(url, SECRET)
    signature = dict(parse_qsl(urlsplit(signed).query))["signature"]
    digest = hmac.new(
        b"twenty bytes secret!", b"/maps/api/streetview?size=640x640&pano=abc&key=K", hashlib.sha1
    )
    assert signed.startswith(url + "&signature=")
    assert base64.urlsafe_b64decode(signature) == digest.digest()
    with pytest.raises(ValueError, match="not URL-safe base64"):
        sign_url(url, "a")


def test_budget_refuses_before_any_image_request(httpserver, tiny_demo, tmp_path, client, centres):
    fake = install_gsv(httpserver, tiny_demo, api_key=KEY)
    with pytest.raises(
        ValueError, match=r"image requests needed \(about .* USD\), above max_requests=3"
    ):
        fetch(fake, tmp_path, client, centres, max_requests=3)
    assert not fake.image_requests and not list(tmp_path.rglob("*.jpg"))
    result = fetch(fake, tmp_path, client, centres, max_requests=1000)
    assert result.report.fetched == len(result.rows)


def test_429_and_5xx_on_images_are_retried(
    httpserver, tiny_demo, tmp_path, client, sleeps, centres
):
    fake = install_gsv(httpserver, tiny_demo, api_key=KEY)
    pano = find_panoramas(client, KEY, centres, endpoint=fake.endpoint, show_progress=False)[
        "pano_id"
    ].iloc[0]
    fake.inject(
        pano,
        Response("Too Many Requests", 429, headers={"Retry-After": "5"}),
        Response("Internal Server Error", 500),
    )
    fetch(fake, tmp_path, client, centres)
    assert 5.0 in sleeps and len(sleeps) == 2
    assert sum(fake.image_requests[(pano, h)] for h in HEADINGS) == len(HEADINGS) + 2


def test_corrupt_view_refetched_and_interrupted_fetch_resumed(
    httpserver, tiny_demo, tmp_path, client, centres
):
    fake = install_gsv(httpserver, tiny_demo, api_key=KEY)
    panos = list(
        find_panoramas(client, KEY, centres, endpoint=fake.endpoint, show_progress=False)["pano_id"]
    )
    good = Path(fake.views["file"].iloc[0]).read_bytes()
    fake.inject(panos[0], Response(good[:-50], 200, mimetype="image/jpeg"))
    fake.inject(panos[1], *[Response("", 404)] * len(HEADINGS))  # imagery gone for now
    with pytest.raises(FetchError, match=f"{len(HEADINGS)} Street View image downloads failed"):
        fetch(fake, tmp_path, client, centres)
    assert not DataRoot(tmp_path).catalog.exists()
    first = sum(fake.image_requests.values())

    result = fetch(fake, tmp_path, client, centres)
    assert result.report.fetched == len(HEADINGS)  # only the failed views
    assert sum(fake.image_requests.values()) == first + len(HEADINGS)
    for path in result.rows["path"]:
        validate_jpeg((tmp_path / "street" / path).read_bytes())
    assert len(read_catalog(DataRoot(tmp_path).catalog).images) == len(panos) * len(HEADINGS)


def test_keys_never_logged_or_written(httpserver, tiny_demo, tmp_path, client, centres, caplog):
    fake = install_gsv(httpserver, tiny_demo, api_key=KEY, signing_secret=SECRET)
    fake.inject("metadata", Response(f"upstream error for key={KEY}", 503))
    caplog.set_level(logging.DEBUG)
    fetch(fake, tmp_path, client, centres[:4], signing_secret=SECRET)
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("core."))
    assert "key=***" in ours and KEY not in ours and SECRET not in ours
    for path in tmp_path.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert KEY.encode() not in content and SECRET.encode() not in content, path


def test_flickr_and_gsv_share_one_catalog(httpserver, tiny_demo, tmp_path, client, centres):
    gsv = install_gsv(httpserver, tiny_demo, api_key=KEY)
    flickr = install_flickr(httpserver, tiny_demo, api_key=KEY)
    fetch(gsv, tmp_path, client, centres)
    fetch_flickr(
        tmp_path,
        grid_bbox_wgs84(DataRoot(tiny_demo).grid),
        min_taken=datetime(2000, 1, 1),
        api_key=KEY,
        client=client,
        endpoint=flickr.endpoint,
        show_progress=False,
    )
    fetch(gsv, tmp_path, client, centres)  # a rerun replaces its own rows, keeps Flickr's
    images = read_catalog(DataRoot(tmp_path).catalog).images
    counts = images["source"].value_counts()
    assert counts["flickr"] == len(flickr.photos) and counts["gsv"] > 0
    assert images["id"].is_unique


def test_estimate_is_an_upper_bound_with_the_price():
    estimate = estimate_gsv(1000, headings=(0, 90, 180, 270), extra_panos=50)
    assert estimate.requests == 1050 + 4200
    assert "at most 29.40 USD" in estimate.note and "7.00 USD per 1,000" in estimate.note
    assert "metadata requests (free)" in estimate.note and estimate.seconds > 0
