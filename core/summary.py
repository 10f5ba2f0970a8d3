"""A plain-text summary of a data root (demo or real): cells, images, coverage, score range."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import pandas as pd

from core.grid import read_grid
from core.sources.catalog import images_per_cell, read_catalog
from core.sources.lbm import read_lbm

#: Files of a data root, relative to it (the demo city writes exactly these).
GRID_FILE = "grid.parquet"
SCORES_FILE = "labels/lbm_scores.csv"
LBM_GRID_FILE = "labels/lbm_grid.gpkg"
CATALOG_FILE = "street/catalog.parquet"
SCENE_LABELS_FILE = "street/flickr_scene_labels.csv"


def coverage_table(data: str | PathLike) -> pd.DataFrame:
    """Per district: cells, labelled cells, and the share of labelled cells with GSV / Flickr
    images (all, and building scenes where scene labels exist)."""
    data = Path(data)
    grid = read_grid(data / GRID_FILE)
    labels = read_lbm(data / SCORES_FILE, data / LBM_GRID_FILE)
    catalog = read_catalog(data / CATALOG_FILE, check_files=False).images
    counts = images_per_cell(catalog, grid["cell_id"].to_numpy())
    frame = grid[["cell_id", "district"]].set_index("cell_id").join(counts)
    frame["labelled"] = frame.index.isin(labels["cell_id"])
    scenes_path = data / SCENE_LABELS_FILE
    if scenes_path.exists():
        scenes = pd.read_csv(scenes_path)
        building_ids = scenes.loc[scenes["scene"].isin(["building", "street"]), "id"]
        building = catalog[catalog["id"].isin(building_ids)]
        frame["flickr_building"] = images_per_cell(building, grid["cell_id"].to_numpy())["flickr"]
    lab = frame[frame["labelled"]]
    table = pd.DataFrame({
        "cells": frame.groupby("district").size(),
        "labelled": lab.groupby("district").size(),
        "gsv_covered": (lab["gsv"] > 0).groupby(lab["district"]).mean().round(3),
        "flickr_covered": (lab["flickr"] > 0).groupby(lab["district"]).mean().round(3),
    })
    if "flickr_building" in lab:
        table["flickr_building_covered"] = (lab["flickr_building"] > 0).groupby(lab["district"]).mean().round(3)
    return table.fillna(0).astype({"cells": int, "labelled": int})


def summarize(data: str | PathLike) -> str:
    """Human-readable summary of a data root."""
    data = Path(data)
    labels = read_lbm(data / SCORES_FILE, data / LBM_GRID_FILE)
    catalog = read_catalog(data / CATALOG_FILE, check_files=False).images
    coverage = coverage_table(data)
    lines = [
        f"data root: {data}",
        f"cells: {int(coverage['cells'].sum())}, labelled: {int(coverage['labelled'].sum())}, "
        f"years: {sorted(labels['jaar'].unique().tolist())}",
        "images: " + ", ".join(f"{s} {n}" for s, n in catalog["source"].value_counts().items()),
    ]
    latest = labels[labels["jaar"] == labels["jaar"].max()]
    for column in ("lbm", "won"):
        values = latest[column]
        lines.append(f"{column} ({latest['jaar'].iloc[0]}): min {values.min():.3f}, "
                     f"mean {values.mean():.3f}, max {values.max():.3f}")
    lines += ["coverage per district (share of labelled cells with at least one image):",
              coverage.to_string()]
    return "\n".join(lines)
