"""Contrastive pretraining throughput: a full MoCo v3 step against its own ceiling
(``contrastive_throughput``), and the whole trainer on two gloo ranks vs one process
(``contrastive_ddp``).

A pretraining step augments two views of a batch, runs the momentum encoder on both (no grad),
the base encoder and predictor on both, the symmetric InfoNCE, backward and the optimiser. Its
ceiling is what the step cannot do without: the bare backbone's forward + backward + optimiser
step on the same number of images (2 x batch), already normalised, plus the momentum encoder's
forward on both views. All parts are timed in turns in the same run, so a shared machine's load
weighs on each alike.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import register
from core.dataroot import DataRoot
from core.demo import DemoConfig, build_demo
from core.models.backbones import create_backbone
from core.models.contrastive import MoCoV3
from core.models.device import resolve_device
from core.runs import load_run
from train.contrastive import augment

SETTINGS = {"convnet_small@32": ("convnet_small", 32, 256), "resnet18@64": ("resnet18", 64, 64)}
#: intra-op threads of the CPU measurement: the machine's two cores
THREADS = 2


def _best_times(
    steps: dict[str, Callable[[], None]], repeat: int, device: torch.device
) -> dict[str, float]:
    """Best wall time (s) of each step over ``repeat`` rounds, after two warm-up rounds.

    Each round runs every step once in turn, so a burst of load from other jobs slows all
    of them and best-of-N picks each one's quiet moment from the same stretch of time.
    """
    best = dict.fromkeys(steps, float("inf"))
    for round_ in range(2 + max(1, repeat)):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= 2:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def _one(name: str, px: int, batch: int, repeat: int, device: torch.device) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, 3, px, px), dtype=torch.uint8, generator=generator).to(
        device
    )
    model = (
        MoCoV3(create_backbone(name, seed=0), dim=128, mlp_dim=512)
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    views = [augment(pixels, generator, 0.35) for _ in range(2)]

    def train(first: torch.Tensor, second: torch.Tensor) -> None:
        with autocast:
            loss = model(first, second, 0.99)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    def pretraining_step() -> None:
        train(*(augment(pixels, generator, 0.35) for _ in range(2)))

    bare = create_backbone(name, seed=0).to(device).to(memory_format=torch.channels_last)
    bare_optimiser = torch.optim.AdamW(bare.parameters(), lr=1e-3)
    inputs = torch.cat(views)

    def bare_step() -> None:
        with autocast:
            loss = bare(inputs).float().square().mean()
        bare_optimiser.zero_grad(set_to_none=True)
        loss.backward()
        bare_optimiser.step()

    @torch.no_grad()
    def momentum_forward() -> None:
        with autocast:
            for view in views:
                model.momentum_encoder(view)

    def augment_only() -> None:
        for _ in range(2):
            augment(pixels, generator, 0.35)

    seconds = _best_times(
        {
            "pretraining": pretraining_step,
            "bare": bare_step,
            "momentum": momentum_forward,
            "model_step": lambda: train(*views),
            "augment": augment_only,
        },
        repeat,
        device,
    )
    images = 2 * batch
    ceiling = seconds["bare"] + seconds["momentum"]
    return {
        "batch": batch,
        "pretraining_images_per_s": images / seconds["pretraining"],
        "ceiling_images_per_s": images / ceiling,
        "ratio_to_ceiling": ceiling / seconds["pretraining"],
        # the same step on views augmented beforehand: what the augmentation costs of the ratio
        "ratio_to_ceiling_augmented_beforehand": ceiling / seconds["model_step"],
        "bare_fwd_bwd_images_per_s": images / seconds["bare"],
        "momentum_forward_images_per_s": images / seconds["momentum"],
        "ratio": seconds["bare"] / seconds["pretraining"],
        "augment_images_per_s": images / seconds["augment"],
    }


@register("contrastive_throughput", repeat=10, device="auto")
def bench_contrastive_throughput(repeat: int, device: str) -> dict[str, Any]:
    """Pretraining images/s vs its ceiling: the bare backbone's forward + backward + AdamW on
    the same images plus the momentum encoder's forward on both views (2 threads on CPU)."""
    resolved = resolve_device(device)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()[0]
    try:
        torch.manual_seed(0)
        results = {label: _one(*setting, repeat, resolved) for label, setting in SETTINGS.items()}
    finally:
        torch.set_num_threads(threads)
    return {
        "device": str(resolved),
        "threads": THREADS,
        **results,
        "target_ratio_to_ceiling_min": 0.9,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }


#: (processes, threads per process) of each setting; one process with both cores is the
#: baseline, one thread alone shows what a rank gets out of its single core.
DDP_SETTINGS = {
    "one_process_2_threads": (1, 2),
    "two_ranks_1_thread": (2, 1),
    "one_process_1_thread": (1, 1),
}


def _pretrain(root: Path, processes: int, threads: int, options: list[str]) -> dict[str, float]:
    """One ``stadsbeeld contrastive`` run on ``processes`` ranks of ``threads`` threads each."""
    command = [sys.executable, "-m", "train", "contrastive", "--data", str(root), *options]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command = [*launcher, f"--nproc-per-node={processes}", *command[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    run_id = re.search(r"contrastive run (contrastive-\S+):", done.stdout).group(1)
    run = load_run(DataRoot(root).runs / run_id)
    # the training loop's own rate (pixels cached, model built), after the first epoch
    rate = float(run.epochs["images_per_s"].iloc[1:].median())
    return {"images_per_s": rate, "wall_s": wall}


@register(
    "contrastive_ddp",
    repeat=3,
    extent="bbox:121000,485000,122500,486000",
    objective="temporal",
    epochs=3,
    steps_per_epoch=20,
    batch_size=256,
)
def bench_contrastive_ddp(
    repeat: int, extent: str, objective: str, epochs: int, steps_per_epoch: int, batch_size: int
) -> dict[str, Any]:
    """The contrastive trainer on 2 gloo ranks of 1 thread vs 1 process of 2 threads (CPU).

    Each setting is a whole ``stadsbeeld contrastive`` run (``convnet_small`` at 32 px, the
    default heads) on the tests' 150-cell demo city with the same global batch; the settings
    take turns ``repeat`` times, and each reports the median of its runs' training rates
    (pair images per second over all ranks, epochs after the first).
    """
    options = ["--objective", objective, "--epochs", str(epochs), "--batch_size", str(batch_size)]
    options += ["--steps_per_epoch", str(steps_per_epoch), "--device", "cpu"]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "city"
        build_demo(root, DemoConfig(seed=7, extent=extent), show_progress=False)
        warm = ["--objective", objective, "--epochs", "1", "--steps_per_epoch", "1"]
        _pretrain(root, 1, 2, [*warm, "--device", "cpu"])  # fills the pixel cache
        measured: dict[str, list[dict[str, float]]] = {name: [] for name in DDP_SETTINGS}
        for _ in range(max(1, repeat)):
            for name, (processes, threads) in DDP_SETTINGS.items():
                measured[name].append(_pretrain(root, processes, threads, options))
    results: dict[str, Any] = {}
    for name, runs in measured.items():
        processes, threads = DDP_SETTINGS[name]
        rates = [r["images_per_s"] for r in runs]
        results[name] = {
            "processes": processes,
            "threads_per_process": threads,
            "images_per_s": statistics.median(rates),
            "images_per_s_per_process": statistics.median(rates) / processes,
            "images_per_s_runs": rates,
            "wall_s": statistics.median(r["wall_s"] for r in runs),
        }
    base = results["one_process_2_threads"]["images_per_s"]
    return {
        **results,
        "speedup_two_ranks_vs_one_process": results["two_ranks_1_thread"]["images_per_s"] / base,
        "cores": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }
