"""Ingestion: a real data root for a Dutch municipality, several, or a whole province, fetched
from public services.

``run_fetch(FetchConfig(municipality="amsterdam"))`` prints a plan, then fetches the
Leefbaarometer labels, the grid, the PDOK aerial mosaic, OpenStreetMap streets, water and parks,
Flickr photos and Street View views, recording every step in ``fetch.json``.
``FetchConfig("amsterdam,amstelveen,diemen")`` and ``FetchConfig("all",
province="Noord-Holland")`` fetch the union of several municipalities into one root.

- :mod:`core.ingest.config`: :class:`FetchConfig`, what a fetch is asked to do (cheap to
  import: the command line is built from it);
- :mod:`core.ingest.area`: :class:`FetchArea`, the municipalities and their PDOK outlines;
- :mod:`core.ingest.source`: :class:`Source`, the interface of every download source;
- :mod:`core.ingest.steps`: the sources and their registry :data:`SOURCES`;
- :mod:`core.ingest.grid`: :func:`build_grid`, the grid step;
- :mod:`core.ingest.plan`: :func:`make_plan` and :func:`format_plan`;
- :mod:`core.ingest.manifest`: :class:`Manifest`, ``fetch.json``;
- :mod:`core.ingest.fetch`: :func:`run_fetch`.

Everything but :class:`FetchConfig` is imported on first use, so that importing this package
(for the command line's ``--help``) loads neither the geo stack nor ``requests``.
"""

from __future__ import annotations

import importlib
from typing import Any

from core.ingest.config import FetchConfig

#: Where each name of the public API is defined.
_HOMES = {
    "FetchArea": "area",
    "Outline": "area",
    "Source": "source",
    "Service": "source",
    "SOURCES": "steps",
    "build_grid": "grid",
    "choose_sources": "plan",
    "make_plan": "plan",
    "format_plan": "plan",
    "PlanLine": "plan",
    "MANIFEST": "manifest",
    "Manifest": "manifest",
    "run_fetch": "fetch",
}
__all__ = ["FetchConfig", *_HOMES]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
