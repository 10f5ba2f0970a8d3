"""The layout of a data root: where each real-format file, the caches and the runs live.

The demo city writes exactly this layout; a user pointing Stadsbeeld at real data lays out the
same files (or symlinks) under their own root.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_ENV = "STADSBEELD_DATA"
DEFAULT_DATA = "data/demo"
#: Raster files an ``aerial/`` folder may hold.
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt")
#: The stem of a raster named for its year (``aerial/2022.tif``).
_YEAR_STEM = re.compile(r"\d{4}")


@dataclass(frozen=True)
class DataRoot:
    """Paths of one data root (the files need not exist yet)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # accept str as well

    @classmethod
    def from_env(cls, path: str | os.PathLike | None = None) -> DataRoot:
        """``path``, else ``$STADSBEELD_DATA``, else the demo city."""
        return cls(Path(path or os.environ.get(DATA_ENV, DEFAULT_DATA)))

    grid = property(lambda self: self.root / "grid.parquet")
    scores = property(lambda self: self.root / "labels" / "lbm_scores.csv")
    lbm_grid = property(lambda self: self.root / "labels" / "lbm_grid.gpkg")
    catalog = property(lambda self: self.root / "street" / "catalog.parquet")
    scene_labels = property(lambda self: self.root / "street" / "flickr_scene_labels.csv")
    streets = property(lambda self: self.root / "graph" / "streets.gpkg")
    votes = property(lambda self: self.root / "perception" / "votes.csv")
    socioeconomic = property(lambda self: self.root / "socioeconomic" / "buurt_targets.csv")
    water = property(lambda self: self.root / "context" / "water.gpkg")
    parks = property(lambda self: self.root / "context" / "parks.gpkg")
    reports = property(lambda self: self.root / "reports")
    cache = property(lambda self: self.root / "cache")
    runs = property(lambda self: self.root / "runs")
    # the manifests core.ingest.manifest.MANIFEST and core.demo.MANIFEST name (a test checks)
    fetch_manifest = property(lambda self: self.root / "fetch.json")
    demo_manifest = property(lambda self: self.root / "demo.json")

    @property
    def aerial(self) -> Path:
        """The aerial raster: ``aerial/aerial.tif``, else the only raster in ``aerial/``."""
        folder = self.root / "aerial"
        preferred = folder / "aerial.tif"
        if preferred.exists():
            return preferred
        rasters = self._rasters()
        if len(rasters) != 1:
            raise FileNotFoundError(
                f"{folder}: expected aerial.tif or exactly one .tif/.vrt raster, "
                f"found {[p.name for p in rasters]}"
            )
        return rasters[0]

    def _rasters(self) -> list[Path]:
        folder = self.root / "aerial"
        return sorted(p for p in folder.glob("*") if p.suffix.lower() in RASTER_SUFFIXES)

    def aerial_years(self) -> dict[int, Path]:
        """The aerial mosaics by year, oldest first.

        A raster named for its year (``aerial/2022.tif``) is that year's mosaic. The root's one
        other mosaic (``aerial.tif``, else the only other raster) is of the year a manifest
        records: ``fetch.json``'s aerial
        step (the PDOK layer it fetched), else ``demo.json``'s ``aerial_year``, else, for demo
        builds from before that key, the latest of its ``label_years`` (the generator renders
        the aerial of the latest label year). A mosaic whose year nothing records is left out;
        naming it ``aerial/<year>.tif`` records its year.

        Raises:
            ValueError: if a manifest is not readable JSON.
        """
        rasters = self._rasters()
        years = {int(p.stem): p for p in rasters if _YEAR_STEM.fullmatch(p.stem)}
        others = [p for p in rasters if not _YEAR_STEM.fullmatch(p.stem)]
        preferred = [p for p in others if p.name == "aerial.tif"]
        mosaic = (preferred or others)[0] if len(preferred or others) == 1 else None
        recorded = self._recorded_aerial_year() if mosaic is not None else None
        if recorded is not None and recorded not in years:
            years[recorded] = mosaic
        return dict(sorted(years.items()))

    def aerial_for(self, year: int) -> Path:
        """The aerial mosaic of ``year`` (see :meth:`aerial_years`).

        Raises:
            FileNotFoundError: naming the year and the years that have a mosaic, if ``year``
                has none.
        """
        years = self.aerial_years()
        if year in years:
            return years[year]
        have = (
            f"the years with a mosaic are {list(years)}"
            if years
            else "no mosaic has a known year (name one aerial/<year>.tif to record its year)"
        )
        raise FileNotFoundError(f"{self.root / 'aerial'}: no aerial imagery of {year}; {have}")

    def _recorded_aerial_year(self) -> int | None:
        step = _read_manifest(self.fetch_manifest).get("steps", {}).get("aerial", {})
        if step.get("status") == "done" and "year" in step.get("params", {}):
            return int(step["params"]["year"])
        demo = _read_manifest(self.demo_manifest)
        if "aerial_year" in demo:
            return int(demo["aerial_year"])
        if demo.get("label_years"):
            return int(max(demo["label_years"]))
        return None


def _read_manifest(path: Path) -> dict[str, Any]:
    """A manifest's JSON object; empty when the file is absent."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
