"""The plan printed before a fetch: which sources run (and why others do not), and per source
its requests, size, time at the rate limit, and key, cost and licence."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from core.dataroot import DataRoot
from core.ingest.area import FetchArea, Outline
from core.ingest.config import FetchConfig
from core.ingest.source import Source
from core.ingest.steps import SOURCES, redact_secrets
from core.sources.http import Estimate, FetchError


def choose_sources(config: FetchConfig) -> tuple[dict[str, Source], dict[str, str]]:
    """The sources to fetch, by name in registry order, and for each source left out, why.

    Raises:
        ValueError: naming the environment variable, when a source asked for with ``sources``
            has no key.
        FileNotFoundError: for a local file to import that does not exist.
    """
    asked = config.sources or [name for name, s in SOURCES.items() if not s.opt_in]
    chosen, skipped = {}, {}
    for name, source in SOURCES.items():
        if name not in asked:
            skipped[name] = "not in --sources" + (
                " (runs only when named)" if source.opt_in and config.sources is None else ""
            )
            continue
        if source.key_env is not None and source.key() is None:
            if config.sources is not None:
                raise ValueError(
                    f"{name} needs an API key: set the environment variable {source.key_env} "
                    f"({source.key_help})"
                )
            skipped[name] = f"no key: set {source.key_env} ({source.key_help})"
            continue
        chosen[name] = source(config)
    for path in config.input_files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found")
    return chosen, skipped


@dataclass(frozen=True)
class PlanLine:
    """One line of the plan: a source's (or the outline's) estimate, or why it is skipped."""

    source: str
    estimate: Estimate | None = None
    skipped: str = ""


def make_plan(
    config: FetchConfig, area: FetchArea, chosen: dict[str, Source], skipped: dict[str, str]
) -> list[PlanLine]:
    """One :class:`PlanLine` for the outline, then one per registered source (asks the LBM WFS
    and Flickr for counts)."""
    root = DataRoot(config.out_path)
    lines = [PlanLine(Outline.name, Outline(config).estimate(area))]
    for name in SOURCES:
        if name not in chosen:
            lines.append(PlanLine(name, skipped=skipped[name]))
            continue
        try:
            lines.append(PlanLine(name, chosen[name].estimate(root, area)))
        except (FetchError, ValueError) as exc:  # the plan still shows the other sources
            lines.append(PlanLine(name, skipped=f"could not estimate: {redact_secrets(str(exc))}"))
    return lines


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def format_plan(area: FetchArea, root: Path, lines: list[PlanLine]) -> str:
    """The plan as text: the municipality (or the municipalities of the area), one line per
    source and the totals."""
    bounds = ", ".join(f"{v:.0f}" for v in area.bbox_rd)
    size = f"{area.area_km2:.1f} km2, RD bbox {bounds} -> {root}"
    parts = area.municipalities
    if len(parts) == 1:
        text = [f"fetch plan for {area.name} ({area.code}, {area.province}), {size}"]
    else:
        listed = ", ".join(f"{m.name} ({m.code})" for m in parts)
        text = [
            f"fetch plan for {area.name}: {len(parts)} municipalities ({area.province}), {size}",
            *textwrap.wrap(
                f"municipalities: {listed}", 100, initial_indent="  ", subsequent_indent="    "
            ),
        ]
    for line in lines:
        e = line.estimate
        if e is None:
            text.append(f"  {line.source:<8} skipped: {line.skipped}")
        else:
            text.append(
                f"  {line.source:<8} {e.source}: {e.requests:,} requests, {_size(e.bytes)}, "
                f"{_duration(e.seconds)} at the rate limit; {e.note}"
            )
    estimates = [line.estimate for line in lines if line.estimate is not None]
    text.append(
        f"  total: {sum(e.requests for e in estimates):,} requests, "
        f"{_size(sum(e.bytes for e in estimates))}, {_duration(sum(e.seconds for e in estimates))} "
        "at the rate limits (transfer time not included)"
    )
    return "\n".join(text)
