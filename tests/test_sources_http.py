"""The polite HTTP client against a loopback server (pytest-httpserver)."""

from __future__ import annotations

import logging

import pytest
from werkzeug import Response

from core.sources.http import (
    FetchError,
    HttpClient,
    Politeness,
    RateLimiter,
    cached_session,
    redact,
    retry_after_s,
)
from tests.fakes import FAST, Sleeps


def sequence(*responses: Response):
    """A handler answering the given responses in turn, then the last one forever."""
    queue = list(responses)

    def handler(request):
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return handler


def test_redact_hides_keys_in_urls_and_known_secrets():
    url = "https://api.flickr.com/services/rest?method=x&api_key=abc123&page=2"
    assert redact(url) == "https://api.flickr.com/services/rest?method=x&api_key=***&page=2"
    assert "s3cr3t" not in redact("header token s3cr3t", secrets=["s3cr3t"])
    assert redact("maps?key=K&signature=S") == "maps?key=***&signature=***"


def test_retry_after_accepts_seconds_and_http_dates():
    assert retry_after_s("7") == 7.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert retry_after_s("soon") is None
    assert retry_after_s(None) is None


def test_rate_limiter_spaces_requests():
    now = [0.0]
    waits = []

    def sleep(s):
        waits.append(s)
        now[0] += s

    limiter = RateLimiter(2.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.wait()
    assert waits == [0.5, 0.5]


def test_429_with_retry_after_is_obeyed(httpserver):
    httpserver.expect_request("/tile").respond_with_handler(
        sequence(
            Response("slow down", status=429, headers={"Retry-After": "3"}),
            Response(b"ok", status=200),
        )
    )
    sleeps = Sleeps()
    client = HttpClient(FAST, sleep=sleeps)
    assert client.get(httpserver.url_for("/tile")).content == b"ok"
    assert sleeps == [3.0]
    assert client.requests_made == 2


def test_5xx_is_retried_with_backoff_then_fails(httpserver):
    httpserver.expect_request("/x").respond_with_data("boom", status=503)
    sleeps = Sleeps()
    client = HttpClient(FAST, sleep=sleeps)
    with pytest.raises(FetchError, match="HTTP 503 after 4 attempts"):
        client.get(httpserver.url_for("/x"))
    assert len(sleeps) == 3
    assert sleeps[0] < sleeps[2]  # doubling backoff (jitter is at most x1.5 / x0.5)


def test_404_fails_at_once(httpserver):
    httpserver.expect_request("/missing").respond_with_data("no such layer", status=404)
    client = HttpClient(FAST, sleep=Sleeps())
    with pytest.raises(FetchError, match="HTTP 404 'no such layer'"):
        client.get(httpserver.url_for("/missing"))
    assert client.requests_made == 1


def test_fetch_errors_carry_the_http_status(httpserver):
    httpserver.expect_request("/missing").respond_with_data("gone", status=404)
    httpserver.expect_request("/busy").respond_with_data("busy", status=503)
    client = HttpClient(
        Politeness(requests_per_second=0, retries=1, backoff_s=0.01, timeout_s=1), sleep=Sleeps()
    )
    with pytest.raises(FetchError) as not_found:
        client.get(httpserver.url_for("/missing"))
    assert not_found.value.status == 404 and str(not_found.value).endswith(": HTTP 404 'gone'")
    with pytest.raises(FetchError, match="HTTP 503 after 2 attempts") as busy:
        client.get(httpserver.url_for("/busy"))
    assert busy.value.status == 503
    with pytest.raises(FetchError, match="ConnectionError") as refused:
        client.get("http://127.0.0.1:9/none")
    assert refused.value.status is None


def test_long_retry_after_is_a_clear_quota_error(httpserver):
    httpserver.expect_request("/q").respond_with_data(
        "", status=429, headers={"Retry-After": "86400"}
    )
    with pytest.raises(FetchError, match="asks to wait 86400 s"):
        HttpClient(FAST, sleep=Sleeps()).get(httpserver.url_for("/q"))


def test_keys_never_reach_errors_or_logs(httpserver, caplog):
    httpserver.expect_request("/rest").respond_with_data("overloaded", status=500)
    httpserver.expect_request("/denied").respond_with_data("bad key TOPSECRET", status=403)
    client = HttpClient(FAST, sleep=Sleeps())
    params = {"api_key": "TOPSECRET", "page": 1}
    with (
        caplog.at_level(logging.INFO, logger="core.sources.http"),
        pytest.raises(FetchError) as info,
    ):
        client.get(httpserver.url_for("/rest"), params=params)
    assert "api_key=***" in str(info.value) and "TOPSECRET" not in str(info.value)
    ours = [r.getMessage() for r in caplog.records if r.name == "core.sources.http"]
    assert len(ours) == 3 and not any("TOPSECRET" in m for m in ours)
    # a body echoing the key is scrubbed too
    with pytest.raises(FetchError, match="bad key \\*\\*\\*") as info:
        client.get(httpserver.url_for("/denied"), params=params)
    assert "TOPSECRET" not in str(info.value)


def test_connection_errors_are_retried_without_the_key_in_the_message():
    client = HttpClient(
        Politeness(requests_per_second=0, retries=1, backoff_s=0.01, timeout_s=1), sleep=Sleeps()
    )
    with pytest.raises(FetchError, match="ConnectionError after 2 attempts") as info:
        client.get("http://127.0.0.1:9/none", params={"key": "GOOGLEKEY"})
    assert "GOOGLEKEY" not in str(info.value)


def _check_jpeg(content: bytes) -> None:
    if not (content.startswith(b"\xff\xd8") and content.endswith(b"\xff\xd9")):
        raise ValueError("not a complete JPEG")


def test_corrupt_payload_is_refetched_and_never_written(httpserver, tmp_path):
    good = b"\xff\xd8jpegdata\xff\xd9"
    httpserver.expect_request("/t1").respond_with_handler(
        sequence(Response(good[:5]), Response(good))
    )
    httpserver.expect_request("/t2").respond_with_data(good[:5])
    client = HttpClient(FAST, sleep=Sleeps())
    assert client.download(
        httpserver.url_for("/t1"), tmp_path / "t1.jpg", validate=_check_jpeg
    ) == len(good)
    assert (tmp_path / "t1.jpg").read_bytes() == good
    with pytest.raises(FetchError, match="corrupt payload"):
        client.download(httpserver.url_for("/t2"), tmp_path / "t2.jpg", validate=_check_jpeg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1.jpg"]


def test_download_many_resumes_without_refetching(httpserver, tmp_path):
    for i in range(6):
        httpserver.expect_request(f"/tile/{i}").respond_with_data(f"tile{i}".encode())
    httpserver.expect_request("/tile/6").respond_with_data("gone", status=404)
    items = [(httpserver.url_for(f"/tile/{i}"), tmp_path / f"{i}.bin", None) for i in range(7)]
    client = HttpClient(FAST, sleep=Sleeps())
    # an interrupted first run left three tiles
    for url, dest, _ in items[:3]:
        client.download(url, dest)
    before = client.requests_made
    report = client.download_many(items, show_progress=False)
    assert (report.fetched, report.skipped, len(report.failed)) == (3, 3, 1)
    assert [(path.name, error.status) for path, error in report.failed] == [("6.bin", 404)]
    assert client.requests_made - before == 4  # three new tiles and the 404, nothing refetched
    assert (tmp_path / "5.bin").read_bytes() == b"tile5"
    with pytest.raises(FetchError, match="1 tiles failed .* 6 on disk are kept"):
        report.raise_for_failures("tiles")


def test_download_many_takes_items_in_bounded_batches(httpserver, tmp_path):
    drawn = []
    seen_at_request = []

    def handler(request):
        seen_at_request.append(len(drawn))
        return Response(b"tile")

    httpserver.expect_request("/t").respond_with_handler(handler)

    def items():
        for i in range(200):
            drawn.append(i)
            yield httpserver.url_for("/t"), tmp_path / f"{i}.bin", None

    politeness = Politeness(requests_per_second=0, concurrency=2, retries=0)
    report = HttpClient(politeness, sleep=Sleeps()).download_many(items(), show_progress=False)
    assert report.fetched == 200
    # the first request starts before more than one batch (8 items per thread) is drawn
    assert seen_at_request[0] <= 2 * 8
    assert max(seen_at_request) == 200


def test_a_refused_answer_keeps_its_body_without_the_key(httpserver):
    body = '{"error": {"message": "Invalid OAuth access token data.", "code": 190}}'
    httpserver.expect_request("/graph").respond_with_data(body, status=401)
    client = HttpClient(FAST, sleep=Sleeps())
    with pytest.raises(FetchError) as caught:
        client.get(httpserver.url_for("/graph"), {"access_token": "MLY|123|secret"})
    assert caught.value.status == 401 and caught.value.body == body
    assert "MLY|123|secret" not in str(caught.value) and "access_token=***" in str(caught.value)


def test_the_cache_keeps_answers_but_not_images(httpserver, tmp_path):
    httpserver.expect_request("/meta").respond_with_json({"status": "OK"})
    httpserver.expect_request("/img").respond_with_data(b"\xff\xd8\xff", content_type="image/jpeg")
    for _ in range(2):
        client = HttpClient(FAST, session=cached_session(tmp_path / "c.sqlite"), sleep=Sleeps())
        assert client.get_json(httpserver.url_for("/meta"), {"key": "k-123"}) == {"status": "OK"}
        assert client.get(httpserver.url_for("/img")).content == b"\xff\xd8\xff"
    paths = [request.path for request, _ in httpserver.log]
    assert paths.count("/meta") == 1 and paths.count("/img") == 2
    assert b"k-123" not in (tmp_path / "c.sqlite").read_bytes()
