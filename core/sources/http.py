"""A polite HTTP client shared by the download clients (LBM WFS, PDOK WMTS, Flickr, GSV, OSM).

Polite means: one rate limit shared by all threads, a bounded number of concurrent requests,
retries with exponential backoff on 429 / 5xx / connection errors, and ``Retry-After`` obeyed.
Downloads are resumable (a file already on disk is skipped) and atomic (temp file + rename),
and an optional validator rejects corrupt payloads (a truncated JPEG tile) before they land.

API keys travel as query parameters (Flickr ``api_key``, Google ``key``/``signature``, Mapillary
``access_token``); every message, log line and exception this module produces has their values
replaced by ``***``.

Metadata and search answers can be cached on disk (:func:`cached_session`, requests-cache with a
SQLite file): a rerun after a failure answers the requests it made before from the cache, without
waiting for the rate limit; secrets are left out of the cache keys and the stored requests.
"""

from __future__ import annotations

import email.utils
import functools
import itertools
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from os import PathLike
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

#: Query parameters whose values are secrets and never appear in logs, errors or files.
SECRET_PARAMS = frozenset(
    {"key", "api_key", "apikey", "signature", "client_secret", "token", "access_token"}
)
_SECRET_IN_URL = re.compile(r"(?i)([?&](?:" + "|".join(sorted(SECRET_PARAMS)) + r")=)[^&#\s'\"]*")
# Secret values in URLs inside an answer (a Graph API ``paging.next`` repeats the token).
_SECRET_IN_BODY = re.compile(
    rb"(?i)([?&](?:" + "|".join(sorted(SECRET_PARAMS)).encode() + rb")=)[^&#\s'\"\\]*"
)
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
#: Characters of a refused answer kept in :attr:`FetchError.body`.
_ERROR_BODY_CHARS = 2000
USER_AGENT = "stadsbeeld/0.1 (+https://github.com/stadsbeeld; urban imagery research)"
#: How long a cached metadata answer is reused by default.
CACHE_EXPIRY = timedelta(days=7)


class FetchError(RuntimeError):
    """A request failed for good (after retries), or its payload was rejected.

    Attributes:
        status: the HTTP status when the failure was one (404, or 503 after the last
            retry); None for connection errors, corrupt payloads and other failures.
        body: the start of the refused answer (secrets redacted), for clients that read an
            API's error JSON; empty when there was none.
    """

    def __init__(self, message: str, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Politeness:
    """How hard a client may press a service.

    Attributes:
        requests_per_second: upper bound on request starts per second, over all threads.
        concurrency: number of simultaneous requests in :meth:`HttpClient.download_many`.
        retries: attempts after the first one for a retryable failure.
        backoff_s: first backoff; doubles each attempt, with jitter, up to ``max_backoff_s``.
        max_backoff_s: the longest single wait, also for ``Retry-After``; a server asking for
            longer (a daily quota) makes the request fail with that wait in the message.
        timeout_s: connect and read timeout per request.
    """

    requests_per_second: float = 4.0
    concurrency: int = 4
    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 120.0
    timeout_s: float = 60.0


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace secret query-parameter values in URLs, and any of ``secrets``, by ``***``."""
    text = _SECRET_IN_URL.sub(r"\1***", text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def with_params(url: str, params: Mapping[str, Any] | None) -> str:
    """``url`` with ``params`` merged into its query string (later values win)."""
    if not params:
        return url
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update({k: str(v) for k, v in params.items() if v is not None})
    return urlunsplit(parts._replace(query=urlencode(query)))


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RateLimiter:
    """Spaces request starts at least ``1 / rate`` seconds apart, across threads."""

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Block until the next request may start, and claim its slot."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


@dataclass
class DownloadReport:
    """What :meth:`HttpClient.download_many` did; ``failed`` pairs a file with its error."""

    fetched: int = 0
    skipped: int = 0
    failed: list[tuple[Path, FetchError]] = field(default_factory=list)
    bytes: int = 0

    def raise_for_failures(self, what: str) -> None:
        """Raise a FetchError listing up to five failures, if there were any."""
        if self.failed:
            shown = "; ".join(f"{path.name}: {error}" for path, error in self.failed[:5])
            raise FetchError(
                f"{len(self.failed)} {what} failed (rerun to retry only those; the "
                f"{self.fetched + self.skipped} on disk are kept): {shown}"
            )


#: Download items submitted per thread at a time by :meth:`HttpClient.download_many`.
_ITEMS_PER_THREAD = 8

#: Checks a downloaded payload; raises ValueError when it is corrupt.
Validator = Callable[[bytes], None]


class HttpClient:
    """GET with rate limit, retries and secret redaction; resumable atomic downloads.

    Args:
        politeness: rate, concurrency, retries and timeouts.
        secrets: extra strings to scrub from every message (API keys set in headers).
        session: a ``requests.Session`` to reuse (tests pass none).
        sleep: the wait function, injectable so tests do not sleep for real.
    """

    def __init__(
        self,
        politeness: Politeness | None = None,
        secrets: Iterable[str] = (),
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.politeness = politeness or Politeness()
        self.secrets = tuple(s for s in secrets if s)
        self.session = session or requests.Session()
        self.session.headers.setdefault("User-Agent", USER_AGENT)
        self._sleep = sleep
        self._limiter = RateLimiter(self.politeness.requests_per_second, sleep=sleep)
        self.requests_made = 0
        self._count_lock = threading.Lock()

    def redact(self, text: str, params: Mapping[str, Any] | None = None) -> str:
        """``text`` without this client's secrets, nor secret values among ``params``."""
        extra = [str(v) for k, v in (params or {}).items() if k.lower() in SECRET_PARAMS]
        return redact(text, (*self.secrets, *extra))

    def get(
        self, url: str, params: Mapping[str, Any] | None = None, validate: Validator | None = None
    ) -> requests.Response:
        """GET ``url`` with retries; return the response of the first good attempt.

        Raises:
            FetchError: on a non-retryable status (404, 403, ...), on a retryable one after
                ``retries`` attempts, when the server asks to wait longer than
                ``max_backoff_s``, or when ``validate`` keeps rejecting the payload.
        """
        full = with_params(url, params)
        scrub = functools.partial(self.redact, params=params)
        shown = scrub(full)
        p = self.politeness
        problem = ""
        for attempt in range(p.retries + 1):
            if not self._cached(full):  # a cached answer costs the service nothing
                self._limiter.wait()
                with self._count_lock:
                    self.requests_made += 1
            wait: float | None = None
            status: int | None = None
            try:
                response = self.session.get(full, timeout=p.timeout_s)
            except requests.RequestException as exc:
                # the exception text repeats the URL with its key; keep only the kind
                problem = f"{type(exc).__name__}"
            else:
                if response.status_code == 200:
                    if validate is None:
                        return response
                    try:
                        validate(response.content)
                        return response
                    except ValueError as exc:
                        problem = f"corrupt payload ({scrub(str(exc))})"
                elif response.status_code in RETRY_STATUS:
                    status = response.status_code
                    problem = f"HTTP {status}"
                    wait = retry_after_s(response.headers.get("Retry-After"))
                    if wait is not None and wait > p.max_backoff_s:
                        raise FetchError(
                            f"{shown}: HTTP {status}, the server asks to wait "
                            f"{wait:.0f} s (quota exhausted?); try again later",
                            status,
                        )
                else:
                    body = scrub(response.text[:_ERROR_BODY_CHARS])
                    raise FetchError(
                        f"{shown}: HTTP {response.status_code} {body[:200]!r}",
                        response.status_code,
                        body,
                    )
            if attempt == p.retries:
                break
            self.backoff(attempt, f"{shown}: {problem}", wait)
        raise FetchError(f"{shown}: {problem} after {p.retries + 1} attempts", status)

    def _cached(self, url: str) -> bool:
        """Whether a cached session holds a fresh answer to GET ``url``."""
        cache = getattr(self.session, "cache", None)
        if cache is None:
            return False
        cached = cache.get_response(cache.create_key(requests.Request("GET", url)))
        return cached is not None and not cached.is_expired

    def backoff(self, attempt: int, reason: str, wait: float | None = None) -> None:
        """Wait before retry ``attempt + 1`` of a failed request, and log why.

        For retries this client does not see itself (an API answering HTTP 200 with a
        temporary-error status); :meth:`get` uses it for its own.

        Args:
            attempt: the 0-based attempt that failed.
            reason: what failed, for the log line (no secrets).
            wait: seconds to wait (a ``Retry-After``); default: ``backoff_s`` doubled per
                attempt, with jitter, at most ``max_backoff_s``.
        """
        p = self.politeness
        if wait is None:
            wait = min(p.max_backoff_s, p.backoff_s * 2**attempt) * (0.5 + random.random())
        log.info("%s, retry %d/%d in %.1f s", reason, attempt + 1, p.retries, wait)
        self._sleep(wait)

    def get_json(self, url: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET and decode JSON; a body that is not JSON is a FetchError naming the URL."""
        response = self.get(url, params)
        try:
            return response.json()
        except ValueError:
            raise FetchError(
                f"{self.redact(response.url or url)}: not JSON: "
                f"{self.redact(response.text[:200])!r}"
            ) from None

    def download(
        self,
        url: str,
        dest: str | PathLike,
        params: Mapping[str, Any] | None = None,
        validate: Validator | None = None,
    ) -> int:
        """Fetch ``url`` into ``dest`` unless it exists; return the bytes written (0 if skipped).

        The payload is validated first, then written to a temporary file and renamed, so an
        interrupted run never leaves a partial file that a resumed run would skip.
        """
        dest = Path(dest)
        if dest.is_file():
            return 0
        content = self.get(url, params, validate=validate).content
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            tmp.write_bytes(content)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return len(content)

    def download_many(
        self,
        items: Iterable[tuple[str, Path, Mapping[str, Any] | None]],
        validate: Validator | None = None,
        desc: str = "download",
        total: int | None = None,
        show_progress: bool = True,
    ) -> DownloadReport:
        """Download ``(url, dest, params)`` items with ``concurrency`` threads.

        Items are taken from ``items`` in bounded batches (a few per thread), never all at
        once, so a generator over a million images is not turned into a million pending tasks.
        Files already on disk are skipped without a request. A failing item is recorded in the
        report and the others go on; call :meth:`DownloadReport.raise_for_failures` after.
        """
        report = DownloadReport()
        lock = threading.Lock()

        def one(item: tuple[str, Path, Mapping[str, Any] | None]) -> None:
            url, dest, params = item
            try:
                written = self.download(url, dest, params, validate)
            except FetchError as exc:
                with lock:
                    report.failed.append((Path(dest), exc))
                return
            with lock:
                if written:
                    report.fetched += 1
                    report.bytes += written
                else:
                    report.skipped += 1

        with (
            tqdm(total=total, desc=desc, unit="file", disable=not show_progress) as bar,
            ThreadPoolExecutor(self.politeness.concurrency) as pool,
        ):
            batch = max(1, self.politeness.concurrency) * _ITEMS_PER_THREAD
            iterator = iter(items)
            while chunk := list(itertools.islice(iterator, batch)):
                for _ in pool.map(one, chunk):
                    bar.update(1)
        return report


def cached_session(
    path: str | PathLike, expire_after: timedelta = CACHE_EXPIRY
) -> requests.Session:
    """A ``requests`` session that keeps good (HTTP 200) GET answers in a SQLite file.

    For metadata and search requests, so that a rerun after a failure does not ask again:
    requests-cache answers them from ``path`` until they are ``expire_after`` old. The values
    of :data:`SECRET_PARAMS` are not part of the cache keys, and are replaced by ``***`` in
    URLs inside the answers before they are stored (and read). Images (``image/*``) are not
    stored: they are files on disk already, so one client may fetch both.

    Args:
        path: the SQLite file (created with its folder).
        expire_after: how long an answer is reused.
    """
    import requests_cache  # only fetches that cache need it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    session = requests_cache.CachedSession(
        backend=requests_cache.SQLiteCache(path),
        expire_after=expire_after,
        allowable_codes=(200,),
        allowable_methods=("GET",),
        ignored_parameters=sorted(SECRET_PARAMS),
        stale_if_error=False,
        filter_fn=_not_an_image,
    )
    session.hooks["response"].append(_redact_secrets_in_body)
    return session


def _not_an_image(response: requests.Response) -> bool:
    """Whether an answer may be cached: images are files on disk, never cache entries."""
    return not response.headers.get("Content-Type", "").startswith("image/")


def _redact_secrets_in_body(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    """Replace secret values in URLs of an answer by ``***`` before it is cached or read.

    Clients that follow such a URL (a next page) put their own key back.
    """
    if _SECRET_IN_BODY.search(response.content):
        response._content = _SECRET_IN_BODY.sub(rb"\1***", response.content)


@dataclass(frozen=True)
class Estimate:
    """What one source of a fetch will download, for the plan printed before it starts.

    Attributes:
        source: a short name ("Leefbaarometer WFS", "PDOK aerial 2020", ...).
        requests: HTTP requests it will make (upper bound where paging is unknown).
        bytes: bytes it will write, estimated.
        requests_per_second: the rate limit it runs under, for the time estimate.
        note: anything the user must know (key needed, quota, cost, licence).
    """

    source: str
    requests: int
    bytes: int
    requests_per_second: float
    note: str = ""

    @property
    def seconds(self) -> float:
        """Time at the rate limit, ignoring transfer time."""
        return self.requests / self.requests_per_second if self.requests_per_second > 0 else 0.0
