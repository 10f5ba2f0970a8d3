"""The layout of a data root: where each real-format file, the caches and the runs live.

The demo city writes exactly this layout; a user pointing Stadsbeeld at real data lays out the
same files (or symlinks) under their own root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "STADSBEELD_DATA"
DEFAULT_DATA = "data/demo"


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

    @property
    def aerial(self) -> Path:
        """The aerial raster: ``aerial/aerial.tif``, else the only raster in ``aerial/``."""
        folder = self.root / "aerial"
        preferred = folder / "aerial.tif"
        if preferred.exists():
            return preferred
        rasters = sorted(
            p for p in folder.glob("*") if p.suffix.lower() in (".tif", ".tiff", ".vrt")
        )
        if len(rasters) != 1:
            raise FileNotFoundError(
                f"{folder}: expected aerial.tif or exactly one .tif/.vrt raster, "
                f"found {[p.name for p in rasters]}"
            )
        return rasters[0]
