"""Fusion benchmarks: feature extraction vs a bare forward, cached vs recomputed ground
features, the wall time of ``make demo``'s data + runs, and feature extraction and fusion
training on N gloo ranks against one process."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench.common import measure, register
from core.configs import FusionConfig
from core.dataroot import DataRoot
from core.datasets import aerial_patches, labelled_cells, street_images
from core.demo import DemoConfig, build_demo
from core.distributed import Ranks, join_local_group
from core.features import extract_features, load_pixels, pool_by_cell
from core.jobs import FINAL_STATES, JobStore
from core.models.backbones import create_backbone, normalise
from core.models.fusion import FusionRegressor
from core.runs import load_run
from train.common import batches, to_input
from train.demo_runs import ensure_default_runs, queue_embedding_runs
from train.fusion import train_fusion


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


@register("demo_pipeline", repeat=1, seed=7, queued_timeout_s=5400.0)
def bench_demo_pipeline(repeat: int, seed: int, queued_timeout_s: float) -> dict[str, Any]:
    """What ``make demo`` does, on a fresh data root: before the dashboard starts, the whole
    city, the scene filter, the perception encoder, features and the three default fusion runs
    (target 6 minutes); after it, the default contrastive and UGE runs the worker trains from
    the queue (timed from the dashboard's start to each run being listed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        start = time.perf_counter()
        build_demo(out, DemoConfig(seed=seed), show_progress=False)
        data_s = time.perf_counter() - start
        ensure_default_runs(DataRoot(out), log=lambda _: None)
        dashboard_s = time.perf_counter() - start
        queued = _queued_jobs(DataRoot(out), queued_timeout_s)
        shutil.rmtree(out, ignore_errors=True)
    return {
        "data_s": round(data_s, 1),
        "runs_s": round(dashboard_s - data_s, 1),
        "total_s": round(dashboard_s, 1),
        "target_s": 360,
        "queued": queued,
    }


def _queued_jobs(root: DataRoot, timeout_s: float) -> dict[str, dict[str, Any]]:
    """Queue the embedding runs as ``make demo`` does, wait for the worker to finish them, and
    say per kind when its run was listed (seconds after queueing) and how long it trained."""
    queued_at = time.time()
    job_ids = queue_embedding_runs(root, log=lambda _: None)
    store = JobStore.for_runs(root.runs)
    deadline = time.monotonic() + timeout_s
    jobs = [store.get(i) for i in job_ids]
    while time.monotonic() < deadline and not all(job.status in FINAL_STATES for job in jobs):
        time.sleep(5)
        jobs = [store.get(i) for i in job_ids]

    def seconds(stamp: str | None, since: float) -> float | None:
        return None if stamp is None else round(pd.Timestamp(stamp).timestamp() - since, 1)

    return {
        job.kind: {
            "status": job.status,
            "listed_after_s": seconds(job.finished, queued_at) if job.status == "done" else None,
            "training_s": (
                seconds(job.finished, pd.Timestamp(job.started).timestamp())
                if job.started
                else None
            ),
            "error": job.error,
        }
        for job in jobs
    }


# --- N ranks against one process -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(
    rank: int, world: int, threads: int, port: int, fn: Callable, args: tuple, out: str
) -> None:
    """One rank of :func:`_on_ranks`: joins the gloo group (as under torchrun) and runs ``fn``."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    # torchrun's ranks are plain processes whose DataLoader workers fork; a spawned process
    # would spawn them too, re-importing torch in every worker
    multiprocessing.set_start_method("fork", force=True)
    ranks = join_local_group(rank, world, port)
    result = fn(ranks, *args)
    if ranks.is_main:
        Path(out).write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _on_ranks(world: int, threads: int, fn: Callable, *args: Any) -> Any:
    """``fn(ranks, *args)`` on ``world`` fresh processes (gloo, CPU) of ``threads`` intra-op
    threads each; rank 0's result. One process is started the same way, so both sides pay the
    same start-up, which the callers leave out of what they time anyway."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        torch.multiprocessing.start_processes(
            _rank_main,
            args=(world, threads, _free_port(), fn, args, str(out)),
            nprocs=world,
            start_method="spawn",
        )
        return json.loads(out.read_text())


def _setups(processes: int) -> dict[str, tuple[int, int]]:
    """What is compared: ``name -> (processes, threads per process)``.

    One process uses every core for its intra-op threads (torch's default); ``processes``
    ranks share the cores out, as torchrun does (``OMP_NUM_THREADS``). One process with that
    same thread count per process separates the effect of the ranks from the effect of fewer
    threads, which on a loaded 2-core machine is large (OpenMP threads spin-wait for cores the
    DataLoader workers hold).
    """
    cores = os.cpu_count() or 1
    per_rank = max(1, cores // processes)
    return {
        "one_process": (1, cores),
        f"one_process_{per_rank}_thread": (1, per_rank),
        f"{processes}_processes": (processes, per_rank),
    }


def _compared(rates: dict[str, float], processes: int) -> dict[str, float]:
    """The speed-ups of ``processes`` ranks over one process (default threads, same threads)."""
    one, same, many = rates.values()
    return {
        "speedup": round(many / one, 3),
        "speedup_same_threads": round(many / same, 3),
        "per_process_efficiency_same_threads": round(many / same / processes, 3),
    }


def _timed_extraction(
    ranks: Ranks, table: str, name: str, px: int, batch_size: int, workers: int, cache: str
) -> float:
    """Seconds for ``extract_features`` of the images in ``table`` into a new cache, all ranks."""
    with torch.inference_mode():  # warm the kernels, as the one-process benchmark does
        create_backbone(name).eval()(torch.zeros(2, 3, px, px))
    images = pd.read_parquet(table)
    ranks.barrier()
    start = time.perf_counter()
    extract_features(
        images, name, None, cache, px=px, batch_size=batch_size, workers=workers, ranks=ranks
    )
    ranks.barrier()
    return time.perf_counter() - start


@register(
    "feature_extraction_ddp",
    repeat=2,
    data="data/demo",
    backbones=(("convnet_small", 32, 6000), ("resnet18", 64, 3000)),
    batch_size=64,
    workers=2,
    processes=2,
)
def bench_feature_extraction_ddp(
    repeat: int, data: str, backbones: tuple, batch_size: int, workers: int, processes: int
) -> dict[str, Any]:
    """``extract_features`` filling a new cache on ``processes`` gloo ranks vs one process (see
    :func:`_setups`): the same images, batch size and DataLoader workers per process; best of
    ``repeat`` alternating runs each, timed between barriers (process start-up left out)."""
    root = _demo_root(data)
    results: dict[str, Any] = {"load_average_1min": os.getloadavg()[0]}
    setups = _setups(processes)
    with tempfile.TemporaryDirectory() as tmp:
        for name, px, count in backbones:
            table = Path(tmp) / f"{name}.parquet"
            street_images(root, "gsv").iloc[:count][["id", "path"]].to_parquet(table)
            times: dict[str, list[float]] = {setup: [] for setup in setups}
            for attempt in range(repeat):
                for setup, (world, threads) in setups.items():
                    cache = Path(tmp) / f"{name}-{setup}-{attempt}"
                    args = (str(table), name, px, batch_size, workers, str(cache))
                    times[setup].append(_on_ranks(world, threads, _timed_extraction, *args))
                    shutil.rmtree(cache)
            rates = {setup: count / min(seconds) for setup, seconds in times.items()}
            results[f"{name}@{px}px"] = (
                {"images": count}
                | {f"{setup}_img_s": round(rate, 1) for setup, rate in rates.items()}
                | _compared(rates, processes)
            )
    return results


def _timed_fusion(ranks: Ranks, config: dict) -> dict[str, Any]:
    """Per-epoch seconds and training cells of one fusion run (rank 0's run folder)."""
    run_id = train_fusion(FusionConfig.from_dict(config), log=lambda _: None)
    if not ranks.is_main:
        return {}
    run = load_run(DataRoot(Path(config["data"])).runs / run_id)
    return {
        "epoch_s": [float(s) for s in run.epochs["seconds"]],
        "train_cells": int((run.predictions()["split"] == "train").sum()),
        "run_id": run_id,
    }


@register("fusion_ddp", repeat=1, data="data/demo", epochs=4, batch_size=128, processes=2)
def bench_fusion_ddp(
    repeat: int, data: str, epochs: int, batch_size: int, processes: int
) -> dict[str, Any]:
    """The default aerial+GSV fusion run (``convnet_small`` aerial @ 64 px, cached
    ``convnet_small`` ground features @ 32 px, the whole demo city) on ``processes`` gloo ranks
    vs one process (see :func:`_setups`), the same global batch; an epoch (training steps +
    validation prediction over all cells) as the trainer times it, median of the epochs after
    the first. A first one-epoch run fills the aerial and feature caches, so no timed run pays
    for them; the runs' folders are removed afterwards."""
    root = _demo_root(data)
    config = {"data": str(root.root), "ground": "gsv", "device": "cpu", "batch_size": batch_size}
    made = [_on_ranks(1, 1, _timed_fusion, config | {"epochs": 1})["run_id"]]
    results: dict[str, Any] = {"load_average_1min": os.getloadavg()[0]}
    setups = _setups(processes)
    epoch_s: dict[str, list[float]] = {setup: [] for setup in setups}
    for _ in range(repeat):
        for setup, (world, threads) in setups.items():
            timed = _on_ranks(world, threads, _timed_fusion, config | {"epochs": epochs})
            epoch_s[setup] += timed["epoch_s"][1:]
            results["train_cells"] = timed["train_cells"]
            made.append(timed["run_id"])
    for run_id in made:
        shutil.rmtree(root.runs / run_id, ignore_errors=True)
    rates = {
        setup: results["train_cells"] / statistics.median(seconds)
        for setup, seconds in epoch_s.items()
    }
    return (
        results
        | {f"{setup}_epoch_s": round(statistics.median(s), 3) for setup, s in epoch_s.items()}
        | {f"{setup}_cells_s": round(rate, 1) for setup, rate in rates.items()}
        | _compared(rates, processes)
    )
