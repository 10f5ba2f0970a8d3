"""Loopback fakes of the real services (each ``install_*`` registers handlers on a
pytest-httpserver and serves a demo data root), and what the client tests share."""

from __future__ import annotations

from core.sources.http import Politeness

#: No rate limit and millisecond backoffs: waits go to :class:`Sleeps`, never to the clock.
FAST = Politeness(requests_per_second=0, concurrency=3, retries=3, backoff_s=0.01)


class Sleeps(list):
    """Records the waits the client asks for instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)
