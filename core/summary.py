"""A plain-text summary of a data root (demo or real): cells, images, coverage, score range."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import pandas as pd

from core.dataroot import DataRoot
from core.demo.street import BUILDING_SCENES
from core.grid import read_grid
from core.sources.catalog import images_per_cell, read_catalog
from core.sources.lbm import read_lbm


def coverage_table(root: DataRoot, labels: pd.DataFrame, catalog: pd.DataFrame) -> pd.DataFrame:
    """Per district: cells, labelled cells, and the share of labelled cells with GSV / Flickr
    images (all, and building scenes where scene labels exist).

    Args:
        root: the data root (its grid and scene labels are read).
        labels: its Leefbaarometer labels (``read_lbm``).
        catalog: its valid images.
    """
    grid = read_grid(root.grid)
    counts = images_per_cell(catalog, grid["cell_id"].to_numpy())
    frame = grid[["cell_id", "district"]].set_index("cell_id").join(counts)
    frame["labelled"] = frame.index.isin(labels["cell_id"])
    if root.scene_labels.exists():
        scenes = pd.read_csv(root.scene_labels)
        building_ids = scenes.loc[scenes["scene"].isin(BUILDING_SCENES), "id"]
        building = catalog[catalog["id"].isin(building_ids)]
        frame["flickr_building"] = images_per_cell(building, grid["cell_id"].to_numpy())["flickr"]
    lab = frame[frame["labelled"]]
    table = pd.DataFrame(
        {
            "cells": frame.groupby("district").size(),
            "labelled": lab.groupby("district").size(),
            "gsv_covered": (lab["gsv"] > 0).groupby(lab["district"]).mean().round(3),
            "flickr_covered": (lab["flickr"] > 0).groupby(lab["district"]).mean().round(3),
        }
    )
    if "flickr_building" in lab:
        table["flickr_building_covered"] = (
            (lab["flickr_building"] > 0).groupby(lab["district"]).mean().round(3)
        )
    return table.fillna(0).astype({"cells": int, "labelled": int})


def summarize(data: str | PathLike) -> str:
    """Human-readable summary of a data root."""
    root = DataRoot(Path(data))
    labels = read_lbm(root.scores, root.lbm_grid)
    catalog = read_catalog(root.catalog, check_files=False).images
    coverage = coverage_table(root, labels, catalog)
    lines = [
        f"data root: {root.root}",
        f"cells: {int(coverage['cells'].sum())}, labelled: {int(coverage['labelled'].sum())}, "
        f"years: {sorted(labels['jaar'].unique().tolist())}",
        "images: " + ", ".join(f"{s} {n}" for s, n in catalog["source"].value_counts().items()),
    ]
    latest = labels[labels["jaar"] == labels["jaar"].max()]
    for column in ("lbm", "won"):
        values = latest[column]
        lines.append(
            f"{column} ({latest['jaar'].iloc[0]}): min {values.min():.3f}, "
            f"mean {values.mean():.3f}, max {values.max():.3f}"
        )
    lines += [
        "coverage per district (share of labelled cells with at least one image):",
        coverage.to_string(),
    ]
    return "\n".join(lines)
