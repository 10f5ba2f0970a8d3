"""Loading a data root for the dashboard: cached, torch-free, read through core's readers.

Every loader takes the data root (or a run folder) as a string so ``st.cache_data`` can key on
it; runs are listed with a short TTL so a run a worker finishes shows up without a restart.
"""

from __future__ import annotations

import base64
import io
import os
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import streamlit as st
import yaml
from PIL import Image

from core import basemaps
from core.dataroot import DataRoot
from core.grid import cell_center, cell_origin, read_grid
from core.runs import EMBEDDINGS_FILE, PREDICTIONS_FILE, list_runs, load_run
from core.scenes import scene_verdicts
from core.sources.aerial import AerialRaster
from core.sources.boundaries import (
    UNIT_LEVELS,
    cell_units,
    districts,
    municipality_outline,
    read_buurten,
    unit_polygons,
)
from core.sources.catalog import images_per_cell, read_catalog, source_names
from core.sources.lbm import read_lbm
from dashboard.maps import fit_view, lonlat_polygons, outline_strip, polygon_records, to_lon_lat

RETRAIN_ENV = "STADSBEELD_RETRAIN"
WORKER_ENV = "STADSBEELD_START_WORKER"
SETTINGS_FILE = "dashboard.yaml"
SECRET_ENV = "STADSBEELD_RETRAIN_SECRET"
BASEMAP_ENV = "STADSBEELD_BASEMAP"
BASEMAP_ATTRIBUTION_ENV = "STADSBEELD_BASEMAP_ATTRIBUTION"
#: How long the reachability probe of ``basemap: auto`` is trusted.
BASEMAP_PROBE_TTL_S = 600
#: Caps on active (queued or running) jobs and the training processes per job (above 1 the
#: worker runs each job under torchrun), overridable in ``dashboard.yaml``.
JOB_SETTINGS = {"max_jobs_per_session": 3, "max_jobs_queued": 10, "worker_processes": 1}
#: Street images larger than this many pixels are not decoded (image bombs).
MAX_IMAGE_PIXELS = 40_000_000
THUMBNAIL_PX = 640
#: The run files the pages read, and how each is read.
RUN_FILES = (PREDICTIONS_FILE, EMBEDDINGS_FILE)


def data_root() -> Path:
    """The data root: ``STADSBEELD_DATA`` or the demo city."""
    return DataRoot.from_env().root


def is_data_root(root: str | os.PathLike) -> bool:
    """Whether ``root`` looks like a data root (holds ``grid.parquet``); the dashboard writes
    nothing (no job store) into a folder that does not."""
    return (Path(root) / "grid.parquet").is_file()


def job_settings(root: str | os.PathLike) -> dict[str, int]:
    """The job settings: ``max_jobs_per_session``, ``max_jobs_queued`` and ``worker_processes``.

    Raises:
        ValueError: if ``dashboard.yaml`` is unreadable or a setting is not a positive integer.
    """
    configured = settings(root)
    caps = {}
    for key, default in JOB_SETTINGS.items():
        value = configured.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{Path(root) / SETTINGS_FILE}: {key} must be a positive whole number, "
                f"got {value!r}"
            )
        caps[key] = value
    return caps


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


def basemap(root: str | os.PathLike) -> basemaps.Basemap:
    """The maps' base map: ``STADSBEELD_BASEMAP``, else ``basemap`` in ``dashboard.yaml``, else
    ``auto`` (PDOK's grey map when this server reaches it, none otherwise); a URL template's
    attribution from ``STADSBEELD_BASEMAP_ATTRIBUTION`` or ``basemap_attribution``.

    Raises:
        ValueError: for a setting that names no base map (the message names where it is set).
    """
    configured = settings(root)
    where = f"{Path(root) / SETTINGS_FILE}: basemap"
    spec = configured.get("basemap", basemaps.AUTO)
    if os.environ.get(BASEMAP_ENV, "").strip():
        spec, where = os.environ[BASEMAP_ENV], f"${BASEMAP_ENV}"
    if spec is None or spec is False:  # YAML reads a bare `~`/`null` as null, `no`/`off` as false
        spec = basemaps.NONE
    if not isinstance(spec, str):
        raise ValueError(f"{where}: expected a name or an XYZ URL template, got {spec!r}")
    attribution = os.environ.get(BASEMAP_ATTRIBUTION_ENV) or configured.get("basemap_attribution")
    return _resolved_basemap(spec, None if attribution is None else str(attribution), where)


@st.cache_resource(show_spinner=False, ttl=BASEMAP_PROBE_TTL_S)
def _resolved_basemap(spec: str, attribution: str | None, where: str) -> basemaps.Basemap:
    """:func:`core.basemaps.resolve`, cached so ``auto`` probes the tile service once per
    :data:`BASEMAP_PROBE_TTL_S` for all sessions, not on every rerun."""
    return basemaps.resolve(spec, attribution, where=where)


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


@st.cache_data(show_spinner=False)
def label_years(root: str) -> list[int]:
    """The years the labels hold, oldest first (without copying the labels on every rerun)."""
    return sorted(int(year) for year in load_labels(root)["jaar"].unique())


def load_context(root: str) -> dict:
    """:func:`context_layers` with the :func:`basemap` the maps draw under them (``basemap``);
    a new dict each call, sharing the cached layers."""
    return {**context_layers(root), "basemap": basemap(root)}


@st.cache_resource(show_spinner="Loading the context layers ...")
def context_layers(root: str) -> dict:
    """Map context as serialised lon/lat polygons (``maps.polygon_records``): the municipal
    outline and district boundaries (as strips), water (if present), and the ``view`` that
    fits the data root's grid.

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
    return {
        "outline": polygon_records(outline),
        "districts": polygon_records(district_lines),
        "water": polygon_records(water),
        "view": view,
    }


@st.cache_resource(show_spinner="Loading the boundaries ...", max_entries=8)
def load_units(level: str) -> pd.DataFrame:
    """Planners' units of one level (``core.sources.boundaries.UNIT_LEVELS``) as map polygons:
    one row per polygon part with ``unit``, ``name`` and ``polygon`` (lon/lat rings,
    simplified to about 5 m). Shared between reruns and sessions: do not modify."""
    units = unit_polygons(level)
    parts = [lonlat_polygons(shape.simplify(5)) for shape in units.geometry]
    return (
        pd.DataFrame({"unit": units["unit"], "name": units["name"], "polygon": parts})
        .explode("polygon")
        .dropna(subset=["polygon"])
        .reset_index(drop=True)
    )


@st.cache_data(show_spinner=False)
def unit_levels(root: str) -> list[str]:
    """The planners' units the root's grid names its cells by (finest first)."""
    cells = load_cells(root)
    return [level for level in UNIT_LEVELS if _names_units(cells, level)]


def _names_units(cells: pd.DataFrame, level: str) -> bool:
    try:
        return bool((cell_units(cells, level) != "").any())
    except ValueError:  # the grid has no buurt codes (not Amsterdam)
        return False


def read_run_file(run_path: str | os.PathLike, name: str):
    """The one way the dashboard reads a run's data files.

    ``predictions.parquet`` comes back as a frame (with ``residual``), ``embeddings.parquet``
    as (cell ids, float32 matrix).

    Raises:
        FileNotFoundError, ValueError: for a missing or unreadable file (the message names it).
    """
    run = load_run(run_path)
    if name == PREDICTIONS_FILE:
        predictions = run.predictions()
        if "residual" not in predictions:
            predictions["residual"] = predictions["predicted"] - predictions["true"]
        return predictions
    if name == EMBEDDINGS_FILE:
        return run.embeddings()
    raise ValueError(f"{name}: not a run file the dashboard reads (expected one of {RUN_FILES})")


def _signature(path: Path) -> tuple:
    stat = path.stat()
    return (stat.st_size, stat.st_mtime_ns)


@st.cache_data(show_spinner=False, max_entries=512)
def _run_problem(run_path: str, signatures: tuple) -> str | None:
    """Why a run cannot be shown (its first unreadable file), or None; cached per file version."""
    for name in RUN_FILES:
        if (Path(run_path) / name).exists():
            try:
                read_run_file(run_path, name)
            except (OSError, ValueError, KeyError) as exc:
                named = str(Path(run_path) / name) in str(exc)
                return str(exc) if named else f"{Path(run_path) / name}: {exc}"
    return None


@st.cache_data(show_spinner=False, ttl=10)
def list_readable_runs(root: str) -> tuple[pd.DataFrame, list[str]]:
    """All complete runs whose files can be read, newest first, and a note for each skipped run
    (naming the file and the problem). Re-listed every 10 s."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = list_runs(DataRoot(root).runs)
    notes = [str(w.message) for w in caught if str(w.message).startswith("skipping run")]
    keep = []
    for path in runs["path"] if len(runs) else []:
        files = [Path(path) / name for name in RUN_FILES]
        try:
            signatures = tuple(_signature(f) if f.exists() else None for f in files)
            problem = _run_problem(str(path), signatures)
        except OSError as exc:
            problem = str(exc)
        keep.append(problem is None)
        if problem is not None:
            notes.append(f"skipping run {Path(path).name}: {problem}")
    runs = runs[keep] if len(runs) else runs
    for column in ("kind", "config.label", "config.target"):
        if column not in runs:
            runs[column] = pd.Series(dtype=object)
    return runs.reset_index(drop=True), notes


def load_runs(root: str, kind: str | None = None) -> pd.DataFrame:
    """Complete, readable runs of the data root (optionally of one kind), newest first.

    Always has the columns ``run_id, kind, path, config.label, config.target``; see
    :func:`skipped_runs` for the runs left out.
    """
    runs = list_readable_runs(root)[0]
    if kind is not None:
        runs = runs[runs["kind"] == kind].reset_index(drop=True)
    return runs


def skipped_runs(root: str) -> list[str]:
    """One note per run left out because a file of it cannot be read."""
    return list_readable_runs(root)[1]


@st.cache_data(show_spinner="Loading predictions ...", max_entries=16)
def load_predictions(run_path: str) -> pd.DataFrame:
    """A run's per-cell predictions (cell_id, split, true, predicted, residual, ...)."""
    return read_run_file(run_path, PREDICTIONS_FILE)


@st.cache_data(show_spinner="Loading embeddings ...", max_entries=8)
def load_embeddings(run_path: str) -> tuple[np.ndarray, np.ndarray]:
    """A run's per-cell embeddings as (cell ids, float32 matrix)."""
    return read_run_file(run_path, EMBEDDINGS_FILE)


@st.cache_data(show_spinner=False, max_entries=256)
def street_thumbnail(path: str) -> np.ndarray | str:
    """A street image decoded for display (at most :data:`THUMBNAIL_PX` on a side), or a note
    saying why it cannot be shown (missing, not an image, too many pixels)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                return f"too large to show ({width}x{height} pixels)"
            image.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        return "missing file"
    except Image.DecompressionBombError as exc:
        return f"too large to show ({exc})"
    except (OSError, ValueError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        return f"not a readable image ({type(exc).__name__})"


@st.cache_data(show_spinner=False, max_entries=512)
def thumbnail_uri(path: str, px: int = 200) -> str:
    """A street image as a small JPEG data URI (at most ``px`` on a side) for a map popup, or
    the note :func:`street_thumbnail` gives why it cannot be shown."""
    image = street_thumbnail(path)
    if isinstance(image, str):
        return image
    small = Image.fromarray(image)
    small.thumbnail((px, px))
    out = io.BytesIO()
    small.save(out, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


@st.cache_data(show_spinner="Loading the street-level catalog ...")
def load_images(root: str) -> pd.DataFrame:
    """Catalog images inside the grid, with the latest scene run's verdict on Flickr photos.

    Columns: ``id, source, path, cell_id, captured_at, heading, x, y`` (RD New), ``license``
    where the catalog has it, and for Flickr photos ``scene``,
    ``scene_p`` and the subset flags ``all, outdoor, building`` (missing without a scene run).
    """
    paths = DataRoot(root)
    images = pd.DataFrame(read_catalog(paths.catalog, check_files=False).images)
    images = images[images["cell_id"].isin(load_cells(root)["cell_id"])]
    wanted = ("id", "source", "path", "cell_id", "captured_at", "heading", "x", "y", "license")
    columns = [c for c in wanted if c in images]
    images = images[columns].reset_index(drop=True)
    scene_runs = load_runs(root, "scene")
    if len(scene_runs):
        images = images.merge(
            scene_verdicts(paths, scene_runs["run_id"].iloc[0]), on="id", how="left"
        )
        images.attrs["scene_run"] = scene_runs["run_id"].iloc[0]
    return images


def catalog_sources(root: str, always: tuple[str, ...] = ()) -> list[str]:
    """The sources with images in the grid, in :func:`core.sources.catalog.source_names`
    order, plus ``always`` (shown even without images)."""
    present = set(load_images(root)["source"])
    return [s for s in source_names(load_images(root)["source"]) if s in present or s in always]


@st.cache_data(show_spinner="Counting images per cell ...")
def load_coverage(root: str) -> pd.DataFrame:
    """Images per cell: one column per source of the catalog (:func:`catalog_sources`; ``gsv``
    and ``flickr`` always) and, with a scene run, ``flickr_outdoor`` and ``flickr_building``
    (the filtered subsets), indexed like the grid."""
    images, cells = load_images(root), load_cells(root)
    ids = cells["cell_id"].to_numpy()
    counts = images_per_cell(images, ids)[catalog_sources(root, always=("gsv", "flickr"))]
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
