"""Demo city benchmarks: build time, and whether its generative story shows in the images.

``demo_signal`` is a model-free check of the demo's design (DESIGN.md "What makes the demo
informative"): ridge regression on crude colour-layout features of the aerial patch and of the
cell's street-level images, evaluated with Kendall's tau on spatial-block test splits. The
learned models of the fusion issue should beat these numbers; the *ordering* is what the demo
promises: aerial < aerial+Flickr < aerial+building-Flickr < aerial+GSV.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy.stats import kendalltau

from bench.common import measure, register
from core.dataroot import DataRoot
from core.demo import DemoConfig, build_demo
from core.grid import cell_center, spatial_split
from core.sources.aerial import AerialRaster
from core.sources.catalog import read_catalog
from core.sources.lbm import read_lbm


@register(
    "demo_build", repeat=1, seed=7, extents=("city", "centrum", "bbox:121000,485000,122500,486000")
)
def bench_demo_build(repeat: int, seed: int, extents: tuple[str, ...]) -> dict[str, Any]:
    """Wall time of ``python -m train demo`` per extent, with the per-stage split."""
    results: dict[str, Any] = {}
    for extent in extents:
        with tempfile.TemporaryDirectory() as tmp:

            def build(extent: str = extent, tmp: str = tmp) -> dict:
                out = Path(tmp) / "demo"
                shutil.rmtree(out, ignore_errors=True)
                return build_demo(out, DemoConfig(seed=seed, extent=extent), show_progress=False)

            timing, manifest = measure(build, repeat)
        results[extent] = {
            **timing,
            "cells": manifest["cells"],
            "images": manifest["images"],
            "stages_s": manifest["timings_s"],
        }
    return results


def _layout_features(images: np.ndarray) -> np.ndarray:
    """Mean colour on a 4x4 layout, colour std and mean: (n, h, w, 3) uint8 -> (n, 54)."""
    x = images.astype(np.float32) / 255
    n, h, w, _ = x.shape
    layout = x.reshape(n, 4, h // 4, 4, w // 4, 3).mean((2, 4)).reshape(n, -1)
    return np.concatenate([layout, x.std((1, 2)), x.mean((1, 2))], 1)


def _cell_features(catalog: pd.DataFrame, ids: np.ndarray, px: int = 32) -> np.ndarray:
    """Per-cell mean of image features, plus a has-images flag (zeros where none)."""
    pixels = np.stack(
        [np.asarray(Image.open(p).convert("RGB").resize((px, px))) for p in catalog["path"]]
    )
    per_image = pd.DataFrame(_layout_features(pixels)).assign(cell_id=catalog["cell_id"].to_numpy())
    per_cell = per_image.groupby("cell_id").mean()
    out = np.zeros((len(ids), per_cell.shape[1] + 1), np.float32)
    rows = pd.Series(np.arange(len(ids)), index=ids)[per_cell.index].to_numpy()
    out[rows, :-1], out[rows, -1] = per_cell.to_numpy(), 1
    return out


def _ridge_tau(
    features: np.ndarray, target: np.ndarray, split: np.ndarray, alpha: float = 0.01
) -> float:
    train, test = split == "train", split == "test"
    mean, std = features[train].mean(0), features[train].std(0) + 1e-6
    x = np.c_[(features - mean) / std, np.ones(len(features))]
    gram = x[train].T @ x[train] + alpha * train.sum() * np.eye(x.shape[1])
    weights = np.linalg.solve(gram, x[train].T @ target[train])
    return float(kendalltau(x[test] @ weights, target[test]).statistic)


@register("demo_signal", repeat=1, data="data/demo", year=2020, target="won", seeds=5)
def bench_demo_signal(repeat: int, data: str, year: int, target: str, seeds: int) -> dict[str, Any]:
    """Kendall's tau of ridge on colour-layout features, per modality, over split seeds."""
    root = Path(data)
    if not root.exists():
        build_demo(root, DemoConfig(), show_progress=False)
    paths = DataRoot(root)
    labels = read_lbm(paths.scores, paths.lbm_grid, year=year)
    ids, y = labels["cell_id"].to_numpy(), labels[target].to_numpy()
    cx, cy = cell_center(ids)
    with AerialRaster(paths.aerial) as raster:
        aerial = np.stack(
            [raster.patch(float(a), float(b), 256, 32).image for a, b in zip(cx, cy, strict=True)]
        )
    catalog = read_catalog(paths.catalog, check_files=False).images
    catalog = catalog[catalog["cell_id"].isin(ids)]
    scenes = pd.read_csv(paths.scene_labels).set_index("id")["scene"]
    gsv = catalog[(catalog["source"] == "gsv") & (catalog["captured_at"].dt.year == year)]
    flickr = catalog[catalog["source"] == "flickr"]
    building = flickr[flickr["id"].map(scenes).isin(["building", "street"])]
    fa = _layout_features(aerial.transpose(0, 2, 3, 1))
    configurations = {
        "aerial": fa,
        "gsv": _cell_features(gsv, ids),
        "flickr_all": _cell_features(flickr, ids),
        "flickr_building": _cell_features(building, ids),
    }
    configurations["aerial+gsv"] = np.c_[fa, configurations["gsv"]]
    configurations["aerial+flickr_all"] = np.c_[fa, configurations["flickr_all"]]
    configurations["aerial+flickr_building"] = np.c_[fa, configurations["flickr_building"]]
    taus = pd.DataFrame(
        [
            {
                name: _ridge_tau(x, y, spatial_split(ids, seed=s))
                for name, x in configurations.items()
            }
            for s in range(seeds)
        ]
    )
    return {
        "cells": len(ids),
        "images": {"gsv": len(gsv), "flickr": len(flickr), "flickr_building": len(building)},
        "kendall_tau_mean": taus.mean().round(3).to_dict(),
        "kendall_tau_std": taus.std().round(3).to_dict(),
    }
