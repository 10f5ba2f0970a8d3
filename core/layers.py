"""Map layers of a data root as tables: a label score of one year, a run's predictions, image
coverage, per 100 m cell or aggregated to planners' units, each coloured as the dashboard
colours it (:mod:`core.styles`).

:func:`map_layer` is what ``stadsbeeld export`` and the Runs page's downloads write
(:mod:`core.exports`); :func:`aggregate_by` is shared with the dashboard's blocks and units.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd

from core.dataroot import DataRoot
from core.grid import RD_NEW, cell_polygons, read_grid
from core.runs import PREDICTIONS_FILE, list_runs, load_run
from core.sources.boundaries import UNIT_LEVELS, cell_units, unit_polygons
from core.sources.catalog import images_per_cell, read_catalog
from core.sources.lbm import CLASS_NAMES, read_lbm
from core.styles import (
    CLASS_PALETTE,
    SIMILARITY_PALETTE,
    SPLIT_PALETTE,
    Legend,
    StyleClass,
    categorical,
    diverging,
    sequential,
    style_classes,
)

#: The Leefbaarometer scores of the label files (``dashboard.common.LAYER_NAMES``).
SCORE_LAYERS = {
    "lbm": "overall score (lbm)",
    "afw": "deviation from national mean (afw)",
    "fys": "physical environment (fys)",
    "onv": "nuisance and safety (onv)",
    "soc": "social cohesion (soc)",
    "vrz": "amenities (vrz)",
    "won": "housing stock (won)",
}
LABEL_LAYERS = {
    **SCORE_LAYERS,
    "lbm_class": "Leefbaarometer class 1..9",
    "change": "change in lbm between two years",
}
RUN_LAYERS = {
    "predicted": "predicted score",
    "true": "true score",
    "residual": "residual (predicted - true)",
    "split": "split (train / val / test)",
}
COVERAGE_LAYERS = {"gsv": "GSV images per cell", "flickr": "Flickr photos per cell"}
LAYERS = {**LABEL_LAYERS, **RUN_LAYERS, **COVERAGE_LAYERS}
#: Layers of classes: units show their most common value, not a mean.
CATEGORICAL = ("split", "lbm_class")
#: The finest level: the 100 m cells themselves; then the planners' units.
CELLS = "cells"
LEVELS = (CELLS, *UNIT_LEVELS)
SPLITS = ("all", "train", "val", "test")
#: A unit with fewer scored cells than this is marked ``few`` (the dashboard draws it faint).
MIN_UNIT_CELLS = 10
#: Columns of a run's predictions a run layer carries.
RUN_COLUMNS = ("split", "true", "predicted", "residual")


@dataclass(frozen=True)
class MapLayer:
    """One map layer as a table, with the dashboard's colours and legend.

    Attributes:
        name: the layer (a key of :data:`LAYERS`); the table's column of the shown value.
        title: what the layer shows, as the dashboard's legend titles it.
        table: one row per cell (``cell_id``, 100 m squares) or unit (``unit``, ``name``,
            ``cells``, ``few``, its polygon), EPSG:28992.
        colours: ``(n, 3)`` RGB of each row, as the dashboard colours it.
        legend: the colours' legend.
        sources: the files the numbers come from.
        level: :data:`CELLS` or a unit level.
        slug: a short file and table name, e.g. ``lbm_2020_buurt``.
    """

    name: str
    title: str
    table: gpd.GeoDataFrame
    colours: np.ndarray
    legend: Legend
    sources: tuple[str, ...]
    level: str
    slug: str

    def classes(self) -> list[StyleClass]:
        """The legend's classes, ranges bounded by the layer's values (:func:`style_classes`)."""
        values = None if self.legend.categories else self.table[self.name].to_numpy(float)
        return style_classes(self.legend, values)


def aggregate_by(shown: pd.DataFrame, keys: np.ndarray, categorical: bool = False) -> pd.DataFrame:
    """Cells grouped by ``keys`` (a block or a planner's unit per cell): the mean of the
    numbers (sum of image counts), the most common value of a categorical ``value``, the cell
    count and the most common district; indexed by key (sorted).

    Args:
        shown: one row per cell: ``value`` and optionally ``true``, ``predicted``,
            ``residual``, ``gsv``, ``flickr``, ``district``.
        keys: the group of each cell, aligned with ``shown``.
        categorical: ``value`` holds classes (most common per group), not numbers (mean).
    """
    groups = shown.assign(block=np.asarray(keys))
    grouped = groups.groupby("block", sort=True)
    means = [c for c in ("true", "predicted", "residual") if c in groups]
    sums = [c for c in ("gsv", "flickr") if c in groups]
    out = grouped[means].mean() if means else pd.DataFrame(index=grouped.size().index)
    out[sums] = grouped[sums].sum()
    out["cells"] = grouped.size()
    out["value"] = _most_common(groups, "value") if categorical else grouped["value"].mean()
    if "district" in groups:
        out["district"] = _most_common(groups, "district")
    return out


def _most_common(frame: pd.DataFrame, column: str) -> pd.Series:
    """The most common ``column`` value per ``block`` (ties: the first in sort order)."""
    counts = frame.groupby(["block", column], sort=True).size()
    return (
        counts.sort_values(ascending=False, kind="stable")
        .groupby(level=0)
        .head(1)
        .reset_index(level=1)[column]
    )


def find_run(root: DataRoot, run: str | PathLike) -> Path:
    """A run folder: ``run`` itself when it is one, else the run of that id under the root.

    Raises:
        ValueError: for an unknown run (the message lists the root's runs).
    """
    given = Path(run)
    if given.is_dir():
        return given
    folder = root.runs / str(run)
    if folder.is_dir() and not folder.name.startswith("."):
        return folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreadable run is not the one asked for
        known = list_runs(root.runs)["run_id"].tolist()
    listed = ", ".join(known) if known else "none"
    raise ValueError(f"{root.runs}: no run {str(run)!r}; the runs there: {listed}")


def label_values(
    labels: pd.DataFrame,
    name: str,
    year: int | None,
    year_from: int | None,
    source: str | PathLike,
) -> tuple[pd.DataFrame, str, str]:
    """The cells' values of a label layer (``cell_id``, ``value``, ``jaar``, ...), its title
    and its slug.

    Args:
        labels: the labels as :func:`core.sources.lbm.read_lbm` returns them.
        name: a label layer (:data:`LABEL_LAYERS`).
        year: the year (default: the latest).
        year_from: for ``change``, the earlier year (default: the one before ``year``).
        source: the labels' file, for the messages.

    Raises:
        ValueError: naming ``source``, for a year the labels lack.
    """
    years = sorted(int(y) for y in labels["jaar"].unique())
    year = years[-1] if year is None else year
    if name == "change" and year_from is None:
        earlier = [y for y in years if y < year]
        if not earlier:
            raise ValueError(f"{source}: no year before {year} to compare with")
        year_from = earlier[-1]
    for wanted in (year, year_from) if name == "change" else (year,):
        if wanted not in years:
            raise ValueError(f"{source}: no labels of year {wanted}; the years are {years}")
    this_year = labels[labels["jaar"] == year].set_index("cell_id")
    if name == "change":
        before = labels[labels["jaar"] == year_from].set_index("cell_id")["lbm"]
        values = (this_year["lbm"] - before).dropna().rename("value").to_frame()
        values = values.assign(jaar_from=year_from, jaar=year)
        title, slug = f"change in lbm from {year_from} to {year}", f"change_{year_from}_{year}"
    else:
        values = this_year[[name]].rename(columns={name: "value"}).dropna().assign(jaar=year)
        title, slug = f"{LABEL_LAYERS[name]}, {year}", f"{name}_{year}"
        if name == "lbm_class":
            published = this_year["lbm_class_published"].astype(bool)
            values["lbm_class_published"] = published
            values["value"] = values["value"].astype(int)
            if not published.all():
                title += ", approximate (bands of lbm) where no class is published"
    return values.reset_index(), title, slug


def _label_values(
    root: DataRoot, name: str, year: int | None, year_from: int | None
) -> tuple[pd.DataFrame, str, str, list[str]]:
    """:func:`label_values` of the root's label files, and those files."""
    labels = read_lbm(root.scores, root.lbm_grid if root.lbm_grid.is_file() else None)
    values, title, slug = label_values(labels, name, year, year_from, root.scores)
    sources = [str(root.scores)] + ([str(root.lbm_grid)] if root.lbm_grid.is_file() else [])
    return values, title, slug, sources


def run_values(
    predictions: pd.DataFrame, name: str, split: str, run_name: str
) -> tuple[pd.DataFrame, str, str]:
    """The cells' values of a run layer (``cell_id``, ``value`` and the other
    :data:`RUN_COLUMNS`), its title and its slug.

    Args:
        predictions: the run's ``predictions.parquet``.
        name: a run layer (:data:`RUN_LAYERS`).
        split: the cells of one split, or ``all``.
        run_name: the run's id, for the title.
    """
    if "residual" not in predictions:
        predictions = predictions.assign(residual=predictions["predicted"] - predictions["true"])
    if split != "all":
        predictions = predictions[predictions["split"] == split]
    values = predictions[["cell_id", *RUN_COLUMNS]].assign(value=predictions[name])
    values = values.dropna(subset=["value"]).drop(columns=name)
    title = f"{RUN_LAYERS[name]} of run {run_name}" + ("" if split == "all" else f", {split}")
    slug = name if split == "all" else f"{name}_{split}"
    return values, title, slug


def _run_values(
    root: DataRoot, name: str, run: str | PathLike, split: str
) -> tuple[pd.DataFrame, str, str, list[str]]:
    """:func:`run_values` of a run of the root, and its predictions file."""
    folder = find_run(root, run)
    values, title, slug = run_values(load_run(folder).predictions(), name, split, folder.name)
    return values, title, slug, [str(folder / PREDICTIONS_FILE)]


def _image_counts(root: DataRoot, ids: np.ndarray) -> pd.DataFrame | None:
    """GSV and Flickr images per cell (``cell_id``, ``gsv``, ``flickr``); None without a
    catalog."""
    if not root.catalog.is_file():
        return None
    images = pd.DataFrame(read_catalog(root.catalog, check_files=False).images)
    return images_per_cell(images, ids)[["gsv", "flickr"]].reset_index()


def layer_colours(name: str, values: pd.Series, title: str) -> tuple[np.ndarray, Legend]:
    """The dashboard's colours and legend of a layer's values (per cell, block or unit)."""
    if name == "split":
        return categorical(values, SPLIT_PALETTE, title)
    if name == "lbm_class":
        colours, legend = categorical(values.astype(int), CLASS_PALETTE, title)
        labels = [(c, f"{k} {CLASS_NAMES[int(k) - 1]}") for c, k in legend.stops]
        return colours, Legend(title, labels, categories=legend.categories)
    if name in ("residual", "change"):
        return diverging(values.to_numpy(float), title)
    if name in COVERAGE_LAYERS:
        return sequential(values.to_numpy(float), title, SIMILARITY_PALETTE, log=True)
    return sequential(values.to_numpy(float), title)


def _check_options(
    name: str, year: int | None, year_from: int | None, run: object, split: str, level: str
) -> None:
    if name not in LAYERS:
        raise ValueError(f"unknown layer {name!r}; the layers are {', '.join(LAYERS)}")
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {', '.join(LEVELS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if name in RUN_LAYERS and run is None:
        raise ValueError(f"layer {name!r} is a run's: name the run (its id or folder)")
    if name not in RUN_LAYERS and (run is not None or split != "all"):
        raise ValueError(
            f"layer {name!r} is not a run's: a run and split apply to {', '.join(RUN_LAYERS)}"
        )
    if name not in LABEL_LAYERS and year is not None:
        raise ValueError(
            f"layer {name!r} has no years: a year applies to {', '.join(LABEL_LAYERS)}"
        )
    if name != "change" and year_from is not None:
        raise ValueError("a year to compare from applies to the 'change' layer only")


def map_layer(
    data: str | PathLike | DataRoot,
    name: str,
    year: int | None = None,
    year_from: int | None = None,
    run: str | PathLike | None = None,
    split: str = "all",
    level: str = CELLS,
    image_counts: pd.DataFrame | None = None,
) -> MapLayer:
    """One layer of a data root, per cell or per planner's unit, coloured as the dashboard.

    Args:
        data: the data root.
        name: a label score (:data:`LABEL_LAYERS`; ``change`` compares two years), a run's
            column (:data:`RUN_LAYERS`) or an image count (:data:`COVERAGE_LAYERS`).
        year: the labels' year (default: the latest).
        year_from: for ``change``, the earlier year (default: the one before ``year``).
        run: for a run layer, the run's id under the root's ``runs/`` or its folder.
        split: for a run layer, the cells of one split or ``all``.
        level: :data:`CELLS`, or ``buurt``, ``wijk`` or ``stadsdeel``: the mean over each
            unit's scored cells (the most common value for classes), its count of cells, and
            ``few`` under :data:`MIN_UNIT_CELLS` cells; units without scored cells are left out.
        image_counts: ``cell_id``, ``gsv``, ``flickr`` per cell when the caller has them
            (reading the catalog takes seconds); default: counted from the root's catalog.

    Raises:
        ValueError: for an unknown layer, level, split or run, a year the labels lack, or
            options that do not apply to the layer.
        FileNotFoundError: for a missing input file (the message names it).
    """
    _check_options(name, year, year_from, run, split, level)
    root = data if isinstance(data, DataRoot) else DataRoot(Path(data))
    grid = read_grid(root.grid)
    cells = pd.DataFrame(grid[["cell_id", "buurt_code", "buurt_naam", "district"]])
    if name in LABEL_LAYERS:
        values, title, slug, sources = _label_values(root, name, year, year_from)
    elif name in RUN_LAYERS:
        values, title, slug, sources = _run_values(root, name, run, split)
    else:
        values, title, slug = None, COVERAGE_LAYERS[name], name
        sources = [str(root.catalog)]
    counts = image_counts
    if counts is None:
        counts = _image_counts(root, cells["cell_id"].to_numpy())
    if values is None:
        if counts is None:
            raise FileNotFoundError(f"{root.catalog}: image catalog not found")
        values = counts[["cell_id", name]].rename(columns={name: "value"})
    shown = cells.merge(values, on="cell_id")
    if shown.empty:
        raise ValueError(f"{', '.join(sources)}: no cell of {root.grid} has a {title}")
    if counts is not None:
        shown = shown.merge(counts.drop(columns=name, errors="ignore"), on="cell_id", how="left")
    if level == CELLS:
        table = shown.rename(columns={"value": name})
        geometry = cell_polygons(table["cell_id"].to_numpy())
    else:
        years = {c: shown[c].iloc[0] for c in ("jaar_from", "jaar") if c in shown and len(shown)}
        table = _per_unit(shown, level, name in CATEGORICAL).assign(**years)
        table = table.rename(columns={"gsv": "gsv_total", "flickr": "flickr_total", "value": name})
        geometry = table.pop("geometry").to_numpy()
        title += f", {'most common' if name in CATEGORICAL else 'mean'} per {level}"
        slug += f"_{level}"
    table = gpd.GeoDataFrame(table.reset_index(drop=True), geometry=geometry, crs=RD_NEW)
    colours, legend = layer_colours(name, table[name], title)
    return MapLayer(name, title, table, colours, legend, tuple(sources), level, slug)


def unit_means(shown: pd.DataFrame, level: str, categorical: bool = False) -> pd.DataFrame:
    """Cells aggregated per planner's unit of ``level`` (:func:`aggregate_by`, indexed by the
    unit's code), with ``few`` where a unit has fewer than :data:`MIN_UNIT_CELLS` cells; cells
    outside every unit are left out.

    Args:
        shown: one row per cell with ``value``, the grid's ``buurt_code`` and ``district``.
        level: buurt, wijk or stadsdeel.
        categorical: ``value`` holds classes (the most common per unit), not numbers.
    """
    units = cell_units(shown, level).to_numpy()
    inside = units != ""
    per_unit = aggregate_by(shown[inside], units[inside], categorical)
    per_unit["few"] = per_unit["cells"] < MIN_UNIT_CELLS
    return per_unit


def _per_unit(shown: pd.DataFrame, level: str, categorical: bool) -> pd.DataFrame:
    """:func:`unit_means` with each unit's polygon (EPSG:28992)."""
    polygons = pd.DataFrame(unit_polygons(level))
    table = polygons.merge(unit_means(shown, level, categorical), left_on="unit", right_index=True)
    if categorical and pd.api.types.is_numeric_dtype(shown["value"]):
        table["value"] = table["value"].astype(shown["value"].dtype)
    return table
