"""Fusion benchmarks: feature extraction vs a bare forward, cached vs recomputed ground
features, and the wall time of ``make demo``'s data + runs."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import register
from core.dataroot import DataRoot
from core.datasets import aerial_patches, labelled_cells, street_images
from core.demo import DemoConfig, build_demo
from core.features import extract_features, load_pixels, pool_by_cell
from core.models.backbones import create_backbone, normalise
from core.models.fusion import FusionRegressor
from train.common import batches, to_input
from train.demo_runs import ensure_default_runs


def _demo_root(data: str) -> DataRoot:
    root = DataRoot(Path(data))
    if not root.root.exists():
        build_demo(root.root, DemoConfig(), progress=False)
    return root


@register("feature_extraction", repeat=1, data="data/demo", images=6000,
          backbones=(("convnet_small", 32), ("resnet18", 64)), batch_size=256, workers=2)
def bench_feature_extraction(repeat: int, data: str, images: int, backbones: tuple, batch_size: int,
                             workers: int) -> dict[str, Any]:
    """``extract_features`` (decode + DataLoader + forward + cache write) vs a bare forward of the
    same images already decoded in memory, same batch size, same process."""
    root = _demo_root(data)
    subset = street_images(root, "gsv").iloc[:images]
    results = {}
    for name, px in backbones:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            extract_features(subset, name, None, tmp, px=px, batch_size=batch_size, workers=workers, device="cpu")
            extraction = time.perf_counter() - start
            pixels = torch.from_numpy(np.array(load_pixels(subset, px, tmp)))
        model = create_backbone(name).eval().to(memory_format=torch.channels_last)
        start = time.perf_counter()
        with torch.inference_mode():
            for rows in batches(len(pixels), batch_size):
                model(normalise(pixels[rows]).contiguous(memory_format=torch.channels_last))
        bare = time.perf_counter() - start
        results[f"{name}@{px}px"] = {"images": len(subset), "extraction_img_s": round(len(subset) / extraction, 1),
                                     "bare_forward_img_s": round(len(subset) / bare, 1),
                                     "extraction_vs_bare": round(bare / extraction, 3)}
    return results


@register("cached_epoch", repeat=1, data="data/demo", cells=1000, ground_backbone="resnet18", ground_px=64,
          batch_size=64)
def bench_cached_epoch(repeat: int, data: str, cells: int, ground_backbone: str, ground_px: int,
                       batch_size: int) -> dict[str, Any]:
    """One aerial+GSV training epoch over ``cells`` training cells: pooled ground features from
    the cache vs running the frozen ground backbone on every image of the batch (pixels already
    in memory, so only the forward is saved by the cache)."""
    root = _demo_root(data)
    table = labelled_cells(root, None, "won")
    table = table[table["split"] == "train"].iloc[:cells].reset_index(drop=True)
    ids = table["cell_id"].to_numpy()
    images = street_images(root, "gsv", ids)
    with tempfile.TemporaryDirectory() as tmp:
        features = extract_features(images, ground_backbone, None, tmp, px=ground_px, device="cpu")
        pooled, counts = pool_by_cell(features, images.set_index("id")["cell_id"], ids)
        pixels = torch.from_numpy(np.array(load_pixels(images, ground_px, tmp)))
    aerial = aerial_patches(root, ids, 256.0, 64)
    ground_model = create_backbone(ground_backbone).eval().to(memory_format=torch.channels_last)
    model = FusionRegressor(create_backbone("convnet_small"), features.dim)
    optimiser = torch.optim.AdamW(model.parameters(), 1e-3)
    y = torch.randn(len(ids))
    image_rows = images.groupby("cell_id").indices
    device = torch.device("cpu")

    def epoch(recompute: bool) -> float:
        start = time.perf_counter()
        for rows in batches(len(ids), batch_size, torch.Generator().manual_seed(0)):
            if recompute:
                ground = torch.zeros(len(rows), features.dim)
                with torch.inference_mode():
                    for k, cell in enumerate(ids[rows.numpy()]):
                        mine = image_rows.get(cell)
                        if mine is not None:
                            x = normalise(pixels[mine]).contiguous(memory_format=torch.channels_last)
                            ground[k] = ground_model(x).mean(0)
                ground = ground.clone()
            else:
                ground = torch.from_numpy(pooled[rows.numpy()])
            has = torch.from_numpy(counts[rows.numpy()] > 0)
            loss = ((model(to_input(aerial, rows, device), ground, has) - y[rows]) ** 2).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        return time.perf_counter() - start

    cached, recomputed = epoch(False), epoch(True)
    return {"cells": len(ids), "images": len(images), "ground_backbone": f"{ground_backbone}@{ground_px}px",
            "cached_epoch_s": round(cached, 3), "recomputed_epoch_s": round(recomputed, 3),
            "speedup": round(recomputed / cached, 1)}


@register("demo_pipeline", repeat=1, seed=7)
def bench_demo_pipeline(repeat: int, seed: int) -> dict[str, Any]:
    """What ``make demo`` does before the dashboard starts, on a fresh data root: the whole city,
    the scene filter, the perception encoder, features, and the three default fusion runs."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        start = time.perf_counter()
        build_demo(out, DemoConfig(seed=seed), progress=False)
        data_s = time.perf_counter() - start
        ensure_default_runs(DataRoot(out), log=lambda _: None)
        total = time.perf_counter() - start
        shutil.rmtree(out, ignore_errors=True)
    return {"data_s": round(data_s, 1), "runs_s": round(total - data_s, 1), "total_s": round(total, 1),
            "target_s": 360}
