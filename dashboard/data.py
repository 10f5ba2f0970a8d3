"""Loading a data root for the dashboard: cached, torch-free, read through core's readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyproj
import streamlit as st

from core.dataroot import DataRoot
from core.grid import cell_origin, read_grid
from core.runs import list_runs, load_run
from core.sources.lbm import read_lbm


def data_root() -> Path:
    """The data root: ``STADSBEELD_DATA`` or the demo city."""
    return DataRoot.from_env().root


@st.cache_data(show_spinner="Loading the grid ...")
def load_cells(root: str) -> pd.DataFrame:
    """Cells with buurt/district and the lon/lat corners of their squares (for the map)."""
    grid = read_grid(DataRoot(Path(root)).grid)
    ids = grid["cell_id"].to_numpy()
    x0, y0 = cell_origin(ids)
    to_wgs84 = pyproj.Transformer.from_crs("EPSG:28992", "EPSG:4326", always_xy=True)
    corners_x = np.stack([x0, x0 + 100, x0 + 100, x0], 1)
    corners_y = np.stack([y0, y0, y0 + 100, y0 + 100], 1)
    lon, lat = to_wgs84.transform(corners_x, corners_y)
    table = pd.DataFrame(grid.drop(columns="geometry"))
    table["polygon"] = np.stack([lon, lat], -1).round(6).tolist()
    return table


@st.cache_data(show_spinner="Loading the labels ...")
def load_labels(root: str) -> pd.DataFrame:
    """Leefbaarometer scores of all years, without geometry."""
    paths = DataRoot(Path(root))
    labels = read_lbm(paths.scores, paths.lbm_grid)
    return pd.DataFrame(labels.drop(columns="geometry"))


@st.cache_data(show_spinner=False, ttl=10)
def load_fusion_runs(root: str) -> pd.DataFrame:
    """Complete fusion runs of the data root, newest first (re-listed every 10 s)."""
    return list_runs(DataRoot(Path(root)).runs, kind="fusion")


@st.cache_data(show_spinner="Loading predictions ...")
def load_predictions(run_path: str) -> pd.DataFrame:
    """A run's per-cell predictions (cell_id, split, true, predicted, residual, ...)."""
    return load_run(run_path).predictions()
