"""A fetch: a plan, then every chosen source's step into a data root, recorded in ``fetch.json``.

The municipalities' outlines (PDOK) fix the box of everything else: one municipality's, or the
union of several (a list, or every municipality of a province) in one root. A plan is printed
first, one line per source; then the steps run in data-flow order: the label sources
(:attr:`~core.ingest.source.Source.feeds_grid`), the grid (:func:`~core.ingest.grid.build_grid`),
then the other sources of :data:`~core.ingest.steps.SOURCES`. A root holds one area: a fetch of
other municipalities into it is refused.

Every step is resumable: the clients skip what is on disk, and a step recorded as done in
``fetch.json`` with the same parameters is not run again (``redo`` runs it anyway). A failing
step stops the fetch with a clear message; the steps before it stay done.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pandas as pd

from core.dataroot import DataRoot
from core.ingest.area import FetchArea, Outline
from core.ingest.config import FetchConfig
from core.ingest.grid import GRID_STEP, build_grid
from core.ingest.manifest import MANIFEST, Manifest
from core.ingest.plan import choose_sources, format_plan, make_plan
from core.ingest.source import Say, Source, outputs
from core.ingest.steps import redact_secrets, services
from core.sources.catalog import REQUIRED_COLUMNS, write_catalog
from core.sources.http import FetchError, redact

#: What the demo city has and a fetch cannot produce (the trainers that need them say so).
NOT_FETCHED = {
    "street/flickr_scene_labels.csv": "scene labels: train scene-filter with --checkpoint "
    "(e.g. Places365) instead",
    "perception/votes.csv": "Place Pulse 2 votes: needed by perception and contrastive-eval",
    "socioeconomic/buurt_targets.csv": "CBS buurt targets: needed by contrastive-eval",
}

#: A step of a fetch: its name, its parameters, the function running it (returning what
#: ``fetch.json`` records) and the licence of what it fetches.
Step = tuple[str, dict[str, Any], Callable[[], dict[str, Any]], str]


def run_fetch(config: FetchConfig, say: Say = print) -> int:
    """Print the plan, then (unless ``dry_run``) fetch every chosen source into the data root.

    Args:
        config: what to fetch.
        say: where the plan and the progress lines go, one line (or block) at a time.

    Returns:
        0 when done, 1 when a step failed (the steps before it are kept and recorded).

    Raises:
        ValueError, FileNotFoundError: for a keyed source asked for without its key, a missing
            import file, an unknown or ambiguous municipality, a province without any, or a
            root that holds a fetch of other municipalities.
        FetchError: when a municipality's outline cannot be fetched.
    """
    chosen, skipped = choose_sources(config)
    area = Outline(config).find()
    root = DataRoot(config.out_path)
    manifest = Manifest(root, _header(config, area, chosen, skipped))
    check_same_municipalities(manifest, area)
    say(format_plan(area, root.root, make_plan(config, area, chosen, skipped)))
    if config.dry_run:
        say("dry run: nothing fetched")
        return 0

    root.root.mkdir(parents=True, exist_ok=True)
    for name, params, run, licence in fetch_steps(config, root, area, chosen, say):
        if name not in config.redo and manifest.done(name, params):
            say(f"{name}: done before, skipped (--redo {name} runs it again)")
            continue
        say(f"{name}: fetching ...")
        try:
            info = run()
        except (FetchError, ValueError, OSError) as exc:
            message = redact_secrets(str(exc))
            manifest.record(name, params, "failed", error=message, licence=licence)
            say(
                f"error: {name} failed: {message}\nthe steps before it are kept in {root.root} "
                f"(see {MANIFEST}); rerun the same command to resume"
            )
            return 1
        manifest.record(name, params, "done", licence=licence, **info)
        say(f"{name}: done " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "outputs"))
    if ensure_catalog(root):
        say(f"no street-level images fetched: wrote an empty {root.catalog}")
    say(f"fetched into {root.root}; see {root.root / MANIFEST}")
    return 0


def fetch_steps(
    config: FetchConfig,
    root: DataRoot,
    area: FetchArea,
    chosen: dict[str, Source],
    say: Say = print,
) -> list[Step]:
    """The steps of a fetch in order: the label sources, the grid, the other sources."""
    labels = [s for s in chosen.values() if s.feeds_grid]
    grid_params = {
        "municipality": area.code,
        "label_years": config.years if labels else [],
    }

    def grid() -> dict[str, Any]:
        return {"outputs": outputs(root, root.grid), "cells": build_grid(root, area)}

    def source_step(source: Source) -> Step:
        run = partial(source.fetch, root, area, say)
        return source.name, source.params(area), run, source.licence

    return [
        *(source_step(s) for s in labels),
        (GRID_STEP, grid_params, grid, ""),
        *(source_step(s) for s in chosen.values() if not s.feeds_grid),
    ]


def check_same_municipalities(manifest: Manifest, area: FetchArea) -> None:
    """Refuse a fetch into a root whose ``fetch.json`` records other municipalities: a root
    holds one area, and mixing two would mix their grids, labels and catalogs.

    Raises:
        ValueError: naming the root, the municipalities it holds and those asked for.
    """
    held = manifest.municipalities()
    asked = area.municipalities
    if not held or {str(m.get("code")) for m in held} == {m.code for m in asked}:
        return
    listed = ", ".join(f"{m.get('name')} ({m.get('code')})" for m in held)
    wanted = ", ".join(f"{m.name} ({m.code})" for m in asked)
    raise ValueError(
        f"{manifest.root.root}: holds a fetch of [{listed}], not of the municipalities asked "
        f"for [{wanted}]; rerun with the same municipalities to continue it, or fetch into "
        "another --out"
    )


def _header(
    config: FetchConfig, area: FetchArea, chosen: dict[str, Source], skipped: dict[str, str]
) -> dict[str, Any]:
    """What ``fetch.json`` records of the fetch as a whole."""
    return {
        "asked": {"municipality": config.names, "province": config.province},
        "municipality": {
            "name": area.name,
            "code": area.code,
            "province": area.province,
            "area_km2": round(area.area_km2, 3),
            "bbox_rd": area.bbox_rd,
        },
        "municipalities": [
            {
                "name": m.name,
                "code": m.code,
                "province": m.province,
                "area_km2": round(m.geometry.area / 1e6, 3),
            }
            for m in area.municipalities
        ],
        "year": config.year,
        "label_years": config.years,
        "sources": list(chosen),
        "skipped": skipped,
        "endpoints": {s.service: redact(s(config).endpoint) for s in services()},
        "licences": {s.name: s.licence for s in services()},
        "not_fetched": NOT_FETCHED,
    }


def ensure_catalog(root: DataRoot) -> bool:
    """Write an empty catalog when no street-level source wrote one, so that readers and
    ``summary`` work on an aerial-only root; True if written."""
    if root.catalog.exists():
        return False
    write_catalog(pd.DataFrame({c: [] for c in (*REQUIRED_COLUMNS, "x", "y")}), root.catalog)
    return True
