"""The interface of every download source of a fetch: :class:`Source`.

A source is one class: its name, licence, service (endpoint and the politeness of its HTTP
clients) and key as class attributes, and three methods: what makes its step the same on a rerun
(:meth:`Source.params`), what it will download (:meth:`Source.estimate`, for the plan) and the
download itself (:meth:`Source.fetch`). The clients in :mod:`core.sources` do the work; a source
adapts one of them to a :class:`~core.ingest.config.FetchConfig` and a
:class:`~core.ingest.area.FetchArea`. :data:`core.ingest.steps.SOURCES` registers them.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from core.dataroot import DataRoot
from core.sources.http import CACHE_EXPIRY, Estimate, HttpClient, Politeness, cached_session

if TYPE_CHECKING:
    from core.ingest.area import FetchArea
    from core.ingest.config import FetchConfig

#: Where a fetch reports progress, one line at a time (``print``, or a test's list.append).
Say = Callable[[str], None]


class Service:
    """A web service a fetch talks to, configured by a :class:`FetchConfig`.

    The class attributes are the defaults; an instance has ``endpoint`` and ``politeness`` with
    the config's ``--endpoint`` and ``--rate`` applied.
    """

    name: ClassVar[str]
    """Its name in the plan and in ``fetch.json``."""
    licence: ClassVar[str]
    """Licence and attribution of what it serves, recorded in ``fetch.json``."""
    service: ClassVar[str]
    """The service's name for ``--endpoint NAME=URL``."""
    endpoint: str
    """The service's base URL."""
    politeness: dict[str, Politeness]
    """The politeness of each of its HTTP clients, by client name (``--rate NAME=RPS``)."""
    key_env: ClassVar[str | None] = None
    """The environment variable holding its API key; None when it needs none."""
    key_help: ClassVar[str] = ""
    """Where to get a key."""
    cache_expiry: ClassVar[timedelta] = CACHE_EXPIRY
    """How long its cached answers are reused (see :meth:`client`)."""

    def __init__(self, config: FetchConfig) -> None:
        self.config = config
        self.endpoint = config.endpoint.get(self.service, type(self).endpoint)
        self.politeness = {
            name: _with_rate(default, config.rate_for(name))
            for name, default in type(self).politeness.items()
        }

    @classmethod
    def key(cls) -> str | None:
        """Its API key from :attr:`key_env`; None when it needs none or the variable is unset."""
        if cls.key_env is None:
            return None
        return os.environ.get(cls.key_env, "").strip() or None

    @classmethod
    def secrets(cls) -> list[str]:
        """The secret values set for it (its key), scrubbed from every message."""
        return [s for s in (cls.key(),) if s]

    def client(self, name: str | None = None, cache: DataRoot | None = None) -> HttpClient:
        """A new HTTP client ``name`` (default: the first of :attr:`politeness`) that scrubs
        :meth:`secrets`; with ``cache``, its answers are kept in
        ``cache/http/<name>.sqlite`` of that data root (metadata and search clients)."""
        name = name or next(iter(self.politeness))
        session = (
            cached_session(cache.cache / "http" / f"{name}.sqlite", self.cache_expiry)
            if cache
            else None
        )
        return HttpClient(self.politeness[name], secrets=self.secrets(), session=session)


class Source(Service, ABC):
    """One download source of a fetch; subclass it and add it to
    :data:`core.ingest.steps.SOURCES`.

    A source runs as the step :attr:`name` of ``fetch.json``. Class attributes: those of
    :class:`Service`, and :attr:`feeds_grid`.
    """

    feeds_grid: ClassVar[bool] = False
    """True for sources of labels: they run before the grid is built, which then holds and
    flags the cells they label."""
    opt_in: ClassVar[bool] = False
    """True for sources a fetch runs only when ``--sources`` names them."""

    @abstractmethod
    def params(self, area: FetchArea) -> dict[str, Any]:
        """What makes the step the same step on a rerun (JSON values), recorded in
        ``fetch.json``: a step done before with equal params is not run again."""

    @abstractmethod
    def estimate(self, root: DataRoot, area: FetchArea) -> Estimate:
        """What :meth:`fetch` will download, for the plan printed before a fetch.

        Raises:
            FetchError, ValueError: when it cannot tell (the plan says so and goes on).
        """

    @abstractmethod
    def fetch(self, root: DataRoot, area: FetchArea, say: Say = print) -> dict[str, Any]:
        """Download into ``root``; resumable (what is on disk is not fetched again).

        Returns:
            What ``fetch.json`` records: ``outputs`` (paths relative to the root, which must
            exist for the step to count as done) and counts.

        Raises:
            FetchError, ValueError, OSError: when it fails; the fetch stops there.
        """


def outputs(root: DataRoot, *paths: Path) -> list[str]:
    """``paths`` relative to the data root, as :meth:`Source.fetch` returns them."""
    return [os.path.relpath(p, root.root) for p in paths]


def _with_rate(politeness: Politeness, rate: float | None) -> Politeness:
    return politeness if rate is None else replace(politeness, requests_per_second=rate)
