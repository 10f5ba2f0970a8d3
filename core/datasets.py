"""Cell-level datasets: labelled cells with spatial splits, aerial patches, ground image sets."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.dataroot import DataRoot
from core.grid import block_id, read_grid, spatial_split
from core.io import write_atomic
from core.sources.aerial import AerialRaster
from core.sources.catalog import problem_examples, read_catalog
from core.sources.lbm import read_lbm, target


def label_year(root: DataRoot, year: int | None) -> int:
    """The label year a run learns: ``year``, else the latest in the root's labels."""
    if year is not None:
        return int(year)
    return int(read_lbm(root.scores, root.lbm_grid)["jaar"].max())


def labelled_cells(
    root: DataRoot,
    year: int | None,
    column: str,
    block_size: float = 1000.0,
    split_seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> pd.DataFrame:
    """Cells with a target value, their spatial-block split, buurt and district.

    Args:
        root: the data root.
        year: label year (``None`` = the latest year in the file).
        column: target column (``won``, ``lbm``, any LBM score, or ``lbm_class``).
        block_size: side of the spatial split's blocks, in metres.
        split_seed: seed of the block split (see ``core.grid.spatial_split``).
        fractions: train, validation and test shares of the blocks.

    Returns:
        DataFrame with ``cell_id, true, split, district, buurt_naam``, sorted by cell id.

    Raises:
        ValueError: before any training, when a split with a share above 0 gets no cells
            (too few blocks of ``block_size`` for three splits), saying how many cells and
            blocks there are and suggesting a smaller block size.
    """
    labels = read_lbm(root.scores, root.lbm_grid)
    year = int(labels["jaar"].max()) if year is None else year
    if year not in set(labels["jaar"]):
        raise ValueError(
            f"{root.scores}: no labels for {year}; years present: {sorted(set(labels['jaar']))}"
        )
    values = target(labels[labels["jaar"] == year], column)
    cells = pd.DataFrame(
        {"cell_id": values.index.to_numpy(np.int64), "true": values.to_numpy(np.float32)}
    )
    cells = cells.sort_values("cell_id", ignore_index=True)
    cells["split"] = spatial_split(cells["cell_id"].to_numpy(), fractions, block_size, split_seed)
    _check_split(cells, fractions, block_size, f"{root.scores} ({column}, {year})")
    grid = read_grid(root.grid).set_index("cell_id")
    places = grid.reindex(cells["cell_id"])
    cells["district"] = places["district"].fillna("").to_numpy() if "district" in places else ""
    cells["buurt_naam"] = (
        places["buurt_naam"].fillna("").to_numpy() if "buurt_naam" in places else ""
    )
    return cells


def _check_split(
    cells: pd.DataFrame, fractions: tuple[float, float, float], block_size: float, what: str
) -> None:
    """ValueError when a split that should have cells has none (its metrics would be NaN)."""
    counts = cells["split"].value_counts()
    empty = [
        name
        for name, share in zip(("train", "val", "test"), fractions, strict=True)
        if share > 0 and counts.get(name, 0) == 0
    ]
    if empty:
        blocks = len(np.unique(block_id(cells["cell_id"].to_numpy(), block_size)))
        smaller = max(100, int(block_size // 400) * 100)
        found = ", ".join(f"{name} {int(counts.get(name, 0))}" for name in ("train", "val", "test"))
        raise ValueError(
            f"{what}: the spatial split of {len(cells)} labelled cells into {blocks} blocks of "
            f"{block_size:g} m leaves no {' and no '.join(empty)} cells ({found}); use a "
            f"smaller --block-size (e.g. {smaller}) or a larger extent"
        )


@dataclass(frozen=True)
class Imagery:
    """The imagery of one year: its aerial mosaic and the street images captured around it.

    ``predict`` reads the year it predicts; a fusion run reads its label year's
    (:meth:`for_training`).
    """

    year: int
    """The year predicted or learnt."""
    aerial: Path
    """That year's aerial mosaic (:meth:`core.dataroot.DataRoot.aerial_for`)."""
    window_years: int | None
    """Street images captured within this many years of ``year`` count (None: all)."""

    @classmethod
    def of(cls, root: DataRoot, year: int, window_years: int | None) -> Imagery:
        """The imagery of ``year`` in ``root``.

        Raises:
            FileNotFoundError: if ``root`` has no aerial mosaic of ``year``.
        """
        return cls(year, root.aerial_for(year), window_years)

    @classmethod
    def for_training(cls, root: DataRoot, year: int, window_years: int | None) -> Imagery:
        """What a run learning the labels of ``year`` sees: that year's mosaic where the root
        has one (else its only mosaic, whatever its year) and the street images of the window.
        """
        years = root.aerial_years()
        if year in years:
            return cls(year, years[year], window_years)
        return cls(year, root.aerial, window_years)  # read only when the year has none

    @property
    def captured_years(self) -> tuple[int, int] | None:
        """The first and last capture year of the street images used (None: all)."""
        if self.window_years is None:
            return None
        return self.year - self.window_years, self.year + self.window_years

    def captured(self, times: pd.Series) -> np.ndarray:
        """Whether each capture time lies in the window; an unknown time does not, unless
        every image counts."""
        if self.captured_years is None:
            return np.ones(len(times), bool)
        first, last = self.captured_years
        years = pd.to_datetime(times).dt.year
        return years.between(first, last).fillna(False).to_numpy(bool)


def aerial_patches(
    root: DataRoot,
    cell_ids: np.ndarray,
    size_m: float = 256.0,
    px: int = 64,
    raster: Path | None = None,
) -> np.ndarray:
    """uint8 patches (n, 3, px, px) of ``size_m`` metres around each cell centre, cached.

    The cache key is the raster file (path, size, mtime), the patch geometry and the cell set, so
    a changed raster or another extent never reuses stale patches. ``raster`` is the mosaic to
    cut (default: the root's, :attr:`core.dataroot.DataRoot.aerial`).
    """
    raster = root.aerial if raster is None else Path(raster)
    stat = raster.stat()
    key_text = json.dumps(
        [
            str(raster.resolve()),
            stat.st_size,
            stat.st_mtime_ns,
            size_m,
            px,
            hashlib.sha256(np.asarray(cell_ids, np.int64).tobytes()).hexdigest(),
        ]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    path = root.cache / "aerial" / f"patches-{int(size_m)}m-{px}px-{key}.npy"
    if path.exists():
        return np.load(path, mmap_mode="r")
    with AerialRaster(raster) as source:
        images, status = source.patches(np.asarray(cell_ids, np.int64), size_m, px)
    write_atomic(path, lambda tmp: np.save(tmp, images))
    write_atomic(
        path.with_suffix(".status.parquet"), lambda tmp: status.to_parquet(tmp, index=False)
    )
    return np.load(path, mmap_mode="r")


#: The columns :func:`street_images` returns unless asked for others.
STREET_COLUMNS = ("id", "path", "cell_id", "captured_at")


def street_images(
    root: DataRoot,
    source: str,
    cell_ids: np.ndarray | None = None,
    columns: Sequence[str] = STREET_COLUMNS,
) -> pd.DataFrame:
    """Valid catalog images of one source (``gsv``, ``flickr``, ``other``), optionally in some cells.

    The image set of every trainer and feature extraction that reads pixels (fusion,
    perception, scene, contrastive pretraining and its evaluation). Every image file is
    checked first (``read_catalog(check_images=True)``): a missing, empty, corrupt or truncated
    image, or a path outside the catalog's folder, is left out with one warning naming the
    catalog and the first bad file of each kind (all rows are in its ``problems``), rather
    than aborting a training run halfway with a DataLoader traceback.

    Args:
        root: the data root.
        source: the catalog source to keep.
        cell_ids: keep only images in these cells.
        columns: the columns to return, any of :data:`core.sources.catalog.IMAGE_COLUMNS`.

    Returns:
        DataFrame with ``columns`` sorted by id (a stable image set).

    Raises:
        ValueError: naming the catalog when no usable image of the source is left; the
            message counts the rejected rows and names the first of each kind.
    """
    catalog = read_catalog(root.catalog, check_images=True, sources=[source])
    images = catalog.images[catalog.images["source"] == source]
    if cell_ids is not None:
        images = images[images["cell_id"].isin(cell_ids)]
    if images.empty:
        rejected = catalog.problems
        raise ValueError(
            f"{root.catalog}: no usable {source!r} images"
            + (" in these cells" if cell_ids is not None else "")
            + (
                f"; {rejected['row'].nunique()} rows were rejected ({problem_examples(rejected)})"
                if len(rejected)
                else ""
            )
        )
    images = pd.DataFrame(images).sort_values("id", ignore_index=True)
    return images[list(columns)]
