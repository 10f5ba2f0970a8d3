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

from bench.common import measure, register
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
        build_demo(root.root, DemoConfig(), show_progress=False)
    return root


@register(
    "feature_extraction",
    repeat=2,
    data="data/demo",
    backbones=(("convnet_small", 32, 6000), ("resnet18", 64, 3000), ("resnet50", 224, 256)),
    batch_size=64,
    workers=2,
)
def bench_feature_extraction(
    repeat: int, data: str, backbones: tuple, batch_size: int, workers: int
) -> dict[str, Any]:
    """``extract_features`` (model build + decode in DataLoader workers + forward + cache write)
    vs building the same model and running a bare forward on the same images already decoded
    in memory; same batch size, same process, best of ``repeat`` alternating runs each.

    On this 2-core CPU the workers decode on the cores the forward uses: the ratio is near 1
    when the forward dominates (ResNet-18/50) and low for a tiny CNN whose forward is cheaper
    than decoding a JPEG."""
    root = _demo_root(data)
    results = {}
    for name, px, images in backbones:
        subset = street_images(root, "gsv").iloc[:images]
        with torch.inference_mode():  # warm the kernels once, so neither timing pays for it
            create_backbone(name).eval()(torch.zeros(2, 3, px, px))
        with tempfile.TemporaryDirectory() as tmp:
            pixels = torch.from_numpy(np.array(load_pixels(subset, px, tmp)))

        def extract(subset=subset, name=name, px=px) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                extract_features(
                    subset,
                    name,
                    None,
                    tmp,
                    px=px,
                    batch_size=batch_size,
                    workers=workers,
                    device="cpu",
                )

        def bare(name=name, pixels=pixels) -> None:
            model = create_backbone(name).eval().to(memory_format=torch.channels_last)
            with torch.inference_mode():
                for rows in batches(len(pixels), batch_size):
                    model(normalise(pixels[rows]).contiguous(memory_format=torch.channels_last))

        extraction, forward = [], []
        for _ in range(repeat):
            extraction.append(measure(extract, 1)[0]["min_s"])
            forward.append(measure(bare, 1)[0]["min_s"])
        results[f"{name}@{px}px"] = {
            "images": len(subset),
            "extraction_img_s": round(len(subset) / min(extraction), 1),
            "bare_forward_img_s": round(len(subset) / min(forward), 1),
            "extraction_vs_bare": round(min(forward) / min(extraction), 3),
        }
    return results


@register(
    "cached_epoch",
    repeat=1,
    data="data/demo",
    cells=1000,
    ground_backbone="resnet18",
    ground_px=64,
    batch_size=64,
)
def bench_cached_epoch(
    repeat: int, data: str, cells: int, ground_backbone: str, ground_px: int, batch_size: int
) -> dict[str, Any]:
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
                            x = normalise(pixels[mine]).contiguous(
                                memory_format=torch.channels_last
                            )
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
    return {
        "cells": len(ids),
        "images": len(images),
        "ground_backbone": f"{ground_backbone}@{ground_px}px",
        "cached_epoch_s": round(cached, 3),
        "recomputed_epoch_s": round(recomputed, 3),
        "speedup": round(recomputed / cached, 1),
    }


@register("demo_pipeline", repeat=1, seed=7)
def bench_demo_pipeline(repeat: int, seed: int) -> dict[str, Any]:
    """What ``make demo`` does before the dashboard starts, on a fresh data root: the whole city,
    the scene filter, the perception encoder, features, and the three default fusion runs."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        start = time.perf_counter()
        build_demo(out, DemoConfig(seed=seed), show_progress=False)
        data_s = time.perf_counter() - start
        ensure_default_runs(DataRoot(out), log=lambda _: None)
        total = time.perf_counter() - start
        shutil.rmtree(out, ignore_errors=True)
    return {
        "data_s": round(data_s, 1),
        "runs_s": round(total - data_s, 1),
        "total_s": round(total, 1),
        "target_s": 360,
    }
