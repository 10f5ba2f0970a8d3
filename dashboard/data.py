"""Loading a data root for the dashboard: cached, torch-free, read through core's readers.

Every loader takes the data root (or a run folder) as a string so ``st.cache_data`` can key on
it; runs are listed with a short TTL so a run a worker finishes shows up without a restart.
"""

from __future__ import annotations

import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import streamlit as st
import yaml

from core.dataroot import DataRoot
from core.grid import cell_center, cell_origin, read_grid
from core.runs import list_runs, load_run
from core.scenes import scene_verdicts
from core.sources.aerial import AerialRaster
from core.sources.boundaries import districts, municipality_outline, read_buurten
from core.sources.catalog import images_per_cell, read_catalog
from core.sources.lbm import read_lbm
from dashboard.maps import fit_view, lonlat_polygons, outline_strip, to_lon_lat

RETRAIN_ENV = "STADSBEELD_RETRAIN"
WORKER_ENV = "STADSBEELD_START_WORKER"
SETTINGS_FILE = "dashboard.yaml"


def data_root() -> Path:
    """The data root: ``STADSBEELD_DATA`` or the demo city."""
    return DataRoot.from_env().root


def settings(root: str | os.PathLike) -> dict:
    """The data root's ``dashboard.yaml`` (empty when absent).

    Raises:
        ValueError: if the file is not a YAML mapping.
    """
    path = Path(root) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a YAML mapping such as 'retraining: true'")
    return loaded


def _switch(env: str, key: str, root: str | os.PathLike, default: bool) -> tuple[bool, str]:
    value = os.environ.get(env)
    if value is not None:
        return value.strip().lower() in ("1", "true", "yes", "on"), f"${env}={value}"
    configured = settings(root)
    if key in configured:
        return bool(configured[key]), f"{key}: {configured[key]} in {Path(root) / SETTINGS_FILE}"
    return default, "the default"


def retraining_enabled(root: str | os.PathLike) -> tuple[bool, str]:
    """Whether the sidebar may start training jobs, and what decided it.

    ``STADSBEELD_RETRAIN=1`` (or ``0``) wins; otherwise ``retraining: true`` in the data root's
    ``dashboard.yaml``; otherwise off, so planners browsing cannot start jobs by accident.
    """
    return _switch(RETRAIN_ENV, "retraining", root, default=False)


def start_worker_enabled(root: str | os.PathLike) -> bool:
    """Whether the dashboard starts a worker for queued jobs (off where workers run elsewhere,
    e.g. as a service on a GPU machine): ``STADSBEELD_START_WORKER`` or ``start_worker``."""
    return _switch(WORKER_ENV, "start_worker", root, default=True)[0]


@st.cache_data(show_spinner="Loading the grid ...")
def load_cells(root: str) -> pd.DataFrame:
    """Cells with buurt/district, the lon/lat of their lower-left corner and of their centre."""
    grid = read_grid(DataRoot(root).grid)
    ids = grid["cell_id"].to_numpy()
    table = pd.DataFrame(grid.drop(columns="geometry"))
    table["lon"], table["lat"] = to_lon_lat(*cell_origin(ids))
    table["center_lon"], table["center_lat"] = to_lon_lat(*cell_center(ids))
    return table


def on_grid(root: str, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (one row per ``cell_id``) joined to the grid's cells: location, buurt, district.

    The grid's columns win over same-named ones in ``frame`` (runs copy buurt and district).
    """
    cells = load_cells(root)
    overlap = [c for c in frame.columns if c in cells.columns and c != "cell_id"]
    return cells.merge(frame.drop(columns=overlap), on="cell_id")


@st.cache_data(show_spinner="Loading the labels ...")
def load_labels(root: str) -> pd.DataFrame:
    """Leefbaarometer scores of all years, without geometry."""
    paths = DataRoot(root)
    labels = read_lbm(paths.scores, paths.lbm_grid)
    return pd.DataFrame(labels.drop(columns="geometry"))


@st.cache_resource(show_spinner="Loading the context layers ...")
def load_context(root: str) -> dict:
    """Map context as lon/lat polygons: the municipal outline and district boundaries (as
    strips), water (if present), and the ``view`` that fits the data root's grid.

    Simplified to about 10 m so the whole municipality costs a few kilobytes. Shared, not
    copied, between reruns and sessions: callers must not modify it.
    """
    buurten = read_buurten()
    outline = lonlat_polygons(outline_strip(municipality_outline(buurten).simplify(10), 70))
    district_lines = lonlat_polygons(
        shapely.union_all(
            [outline_strip(district, 40) for district in districts(buurten).geometry.simplify(10)]
        )
    )
    water = []
    if DataRoot(root).water.is_file():
        shapes = gpd.read_file(DataRoot(root).water).to_crs("EPSG:28992").geometry.simplify(10)
        water = lonlat_polygons(shapely.union_all(shapes.values))
    cells = load_cells(root)
    view = fit_view(
        (
            cells["lon"].min(),
            cells["lat"].min(),
            cells["lon"].max() + 0.0015,
            cells["lat"].max() + 0.0009,
        )
    )  # the far corners of the last cells
    return {"outline": outline, "districts": district_lines, "water": water, "view": view}


@st.cache_data(show_spinner=False, ttl=10)
def load_runs(root: str, kind: str | None = None) -> pd.DataFrame:
    """Complete runs of the data root (optionally of one kind), newest first; re-listed every 10 s."""
    return list_runs(DataRoot(root).runs, kind=kind)


@st.cache_data(show_spinner="Loading predictions ...", max_entries=16)
def load_predictions(run_path: str) -> pd.DataFrame:
    """A run's per-cell predictions (cell_id, split, true, predicted, residual, ...)."""
    predictions = load_run(run_path).predictions()
    if "residual" not in predictions:
        predictions["residual"] = predictions["predicted"] - predictions["true"]
    return predictions


@st.cache_data(show_spinner="Loading embeddings ...", max_entries=8)
def load_embeddings(run_path: str) -> tuple[np.ndarray, np.ndarray]:
    """A run's per-cell embeddings as (cell ids, float32 matrix)."""
    return load_run(run_path).embeddings()


@st.cache_data(show_spinner="Loading the street-level catalog ...")
def load_images(root: str) -> pd.DataFrame:
    """Catalog images inside the grid, with the latest scene run's verdict on Flickr photos.

    Columns: ``id, source, path, cell_id, captured_at, heading``, and for Flickr photos ``scene``,
    ``scene_p`` and the subset flags ``all, outdoor, building`` (missing without a scene run).
    """
    paths = DataRoot(root)
    images = pd.DataFrame(read_catalog(paths.catalog, check_files=False).images)
    images = images[images["cell_id"].isin(load_cells(root)["cell_id"])]
    columns = [
        c for c in ("id", "source", "path", "cell_id", "captured_at", "heading") if c in images
    ]
    images = images[columns].reset_index(drop=True)
    scene_runs = list_runs(paths.runs, kind="scene")
    if len(scene_runs):
        images = images.merge(
            scene_verdicts(paths, scene_runs["run_id"].iloc[0]), on="id", how="left"
        )
        images.attrs["scene_run"] = scene_runs["run_id"].iloc[0]
    return images


@st.cache_data(show_spinner="Counting images per cell ...")
def load_coverage(root: str) -> pd.DataFrame:
    """Images per cell: ``gsv``, ``flickr`` and, with a scene run, ``flickr_outdoor`` and
    ``flickr_building`` (the filtered subsets), indexed like the grid."""
    images, cells = load_images(root), load_cells(root)
    ids = cells["cell_id"].to_numpy()
    counts = images_per_cell(images, ids)[["gsv", "flickr"]]
    for subset in ("outdoor", "building"):
        if subset in images:
            kept = images[(images["source"] == "flickr") & (images[subset] == True)]  # noqa: E712 (NaN rows)
            counts[f"flickr_{subset}"] = images_per_cell(kept, ids)["flickr"]
    return counts.reset_index()


@st.cache_data(show_spinner=False, max_entries=64)
def aerial_patch(
    root: str, cell_id: int, size_m: float = 300.0, px: int = 240
) -> np.ndarray | None:
    """An RGB aerial patch around a cell's centre (None when the data root has no raster)."""
    try:
        raster_path = DataRoot(root).aerial
    except FileNotFoundError:
        return None
    x, y = cell_center(np.array([cell_id]))
    with AerialRaster(raster_path) as raster:
        patch = raster.patch(float(x[0]), float(y[0]), size_m, px)
    return None if patch.outside else np.moveaxis(patch.image, 0, -1)


@st.cache_data(show_spinner=False)
def load_matrix_report(root: str) -> pd.DataFrame | None:
    """The fusion experiment matrix (``reports/fusion_matrix.csv``, one row per run), if made."""
    path = DataRoot(root).reports / "fusion_matrix.csv"
    return pd.read_csv(path) if path.is_file() else None
