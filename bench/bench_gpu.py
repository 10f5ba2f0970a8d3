"""``python -m bench gpu``: every CUDA path of the project in one run of at most 8 minutes.

Parts, each through the project's own code and each timed next to the bare forward (+backward)
of the same backbone in the same run:

- ``trainers``: the fusion, scene-filter, perception and contrastive trainers, end to end on a
  tiny demo city, with a probe on every backbone forward recording whether it ran under bf16
  autocast on channels-last inputs and weights;
- ``fusion_paper``: the paper schedule (``assets/configs/fusion-paper.yaml``: ResNet-50 at
  224 px, batch 32) through ``train.fusion.train_step``, aerial backbone frozen, then trained;
- ``moco_vit_b16``: MoCo v3 on ViT-B/16 (``contrastive-paper.yaml``; random weights, nothing is
  downloaded), the contrastive trainer's step on a per-GPU batch;
- ``feature_extraction``: ``core.features.extract_features`` on ResNet-50 at 224 px, JPEGs
  decoded on the GPU (nvjpeg) and, for comparison, with PIL in DataLoader workers;
- ``ddp``: one process per visible GPU (NCCL) running the paper fusion step through
  ``core.distributed.Ranks``;
- ``uge_tiny_bf16``: the tiny Qwen2-VL UGE embedder in bf16: image and text embeddings and a
  stage-1 (LoRA) training step.

Each part reports ``rates`` (images/s of the path, of the bare backbone, and their ratio),
``checks`` (bf16 autocast, channels-last, dtype, ...), its peak GPU memory and its seconds. A
wall-time guard skips (and records) the parts that would no longer fit in ``budget_s``.

Without a CUDA device the result file says ``no CUDA device``. ``cpu_smoke=True`` (``python -m
bench.bench_gpu --cpu-smoke``) runs every part at tiny sizes on the CPU instead, so that the
script's code paths are tested here (tests/test_bench_gpu.py); bf16 is not required there.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from bench.common import register
from core.configs import (
    ContrastiveConfig,
    FusionConfig,
    PerceptionConfig,
    SceneTrainConfig,
    schedule_file,
)
from core.distributed import Ranks, join_local_group
from core.models.backbones import create_backbone, normalise
from core.models.contrastive import MoCoV3
from core.models.device import bf16_autocast
from core.models.fusion import FusionRegressor
from train.common import OneCycle, seed_everything
from train.fusion import CellInputs, train_step

PARTS = ("trainers", "fusion_paper", "moco_vit_b16", "feature_extraction", "ddp", "uge_tiny_bf16")
NO_CUDA = "no CUDA device"
#: The tests' tiny demo city: about 150 cells around De Pijp and the Amstel.
TINY_EXTENT = "bbox:121000,485000,122500,486000"


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the GPU sizes, or tiny ones for the CPU smoke run."""

    reserve_s: dict[str, float]  # the most seconds each part may take
    steps: int  # timed steps per rate (after `warmup` untimed ones)
    warmup: int
    demo_workers: int
    trainer_epochs: int
    votes: int | None  # perception votes kept (None: all)
    contrastive: dict[str, Any]  # ContrastiveConfig fields of the contrastive trainer
    paper: dict[str, Any]  # FusionConfig fields over fusion-paper.yaml (none on a GPU)
    moco: dict[str, Any]  # ContrastiveConfig fields over contrastive-paper.yaml
    jpegs: int
    jpeg_size: tuple[int, int]  # (width, height)
    extraction: dict[str, Any]  # extract_features arguments
    ddp_world: int | None  # None: one rank per visible GPU
    uge_batch: int
    uge_px: int


GPU = Sizes(
    reserve_s={
        "trainers": 100,
        "fusion_paper": 45,
        "moco_vit_b16": 60,
        "feature_extraction": 75,
        "ddp": 100,
        "uge_tiny_bf16": 40,
    },
    steps=10,
    warmup=3,
    demo_workers=min(8, os.cpu_count() or 1),
    trainer_epochs=2,
    votes=None,
    contrastive={"epochs": 1, "steps_per_epoch": 10},
    paper={},
    moco={"batch_size": 128},  # the paper's global 1,024 is 128 on each of 8 GPUs
    jpegs=8192,
    jpeg_size=(480, 360),
    extraction={
        "backbone": "resnet50",
        "px": 224,
        "batch_size": 256,
        "workers": min(8, os.cpu_count() or 1),
    },
    ddp_world=None,
    uge_batch=64,
    uge_px=112,
)

SMOKE = Sizes(
    reserve_s=dict.fromkeys(PARTS, 120.0),
    steps=2,
    warmup=1,
    demo_workers=1,
    trainer_epochs=1,
    votes=600,
    contrastive={"epochs": 1, "steps_per_epoch": 2, "batch_size": 16, "dim": 16, "mlp_dim": 32},
    paper={
        "aerial_backbone": "convnet_small",
        "ground_backbone": "convnet_small",
        "aerial_px": 32,
        "batch_size": 8,
    },
    moco={"backbone": "vit_tiny", "px": 32, "batch_size": 8, "dim": 16, "mlp_dim": 32},
    jpegs=48,
    jpeg_size=(64, 48),
    extraction={"backbone": "convnet_small", "px": 32, "batch_size": 16, "workers": 1},
    ddp_world=2,
    uge_batch=4,
    uge_px=56,
)


@register("gpu", cpu_smoke=False, budget_s=450.0, data=None, parts=PARTS)
def bench_gpu(
    cpu_smoke: bool, budget_s: float, data: str | None, parts: tuple[str, ...]
) -> dict[str, Any]:
    """Every CUDA path, each next to its bare backbone; ``no CUDA device`` without a GPU.

    Args:
        cpu_smoke: run every part at tiny sizes on the CPU (tests the script itself).
        budget_s: wall-time budget; a part that would not fit in what is left is skipped.
        data: a demo data root to copy for the trainers (default: build the tiny city).
        parts: the parts to run, of :data:`PARTS`.
    """
    started = time.perf_counter()
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; the parts are {PARTS}")
    cuda = torch.cuda.is_available()
    header = {
        "mode": "cpu-smoke" if cpu_smoke else "gpu",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,  # what torch was built for, GPU or not
    }
    if not cuda and not cpu_smoke:
        return {
            "status": NO_CUDA,
            **header,
            "note": "run `python -m bench gpu` on a machine with a CUDA GPU; "
            "`python -m bench.bench_gpu --cpu-smoke` runs the parts at tiny sizes on the CPU",
            "parts": {},
        }
    device = torch.device("cpu" if cpu_smoke else "cuda")
    sizes = SMOKE if cpu_smoke else GPU
    header |= {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "bf16_required": device.type == "cuda",
    }
    runners: dict[str, Callable[[Context], dict[str, Any]]] = {
        "trainers": part_trainers,
        "fusion_paper": part_fusion_paper,
        "moco_vit_b16": part_moco,
        "feature_extraction": part_feature_extraction,
        "ddp": part_ddp,
        "uge_tiny_bf16": part_uge,
    }
    results: dict[str, Any] = {}
    threads = torch.get_num_threads()
    if cpu_smoke:  # tiny steps: threads would only wait on each other (10x slower when busy)
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        for name in parts:
            left = max(0.0, budget_s - (time.perf_counter() - started))
            reserve = sizes.reserve_s[name]
            if left < reserve:
                results[name] = {
                    "skipped": f"wall-time guard: {left:.0f} s left of the {budget_s:.0f} s "
                    f"budget, the part may take {reserve:.0f} s"
                }
                print(f"gpu: {name} skipped ({results[name]['skipped']})", flush=True)
                continue
            context = Context(device, sizes, Path(scratch), time.perf_counter() + reserve, data)
            part_started = time.perf_counter()
            _reset_peak(device)
            try:
                result = runners[name](context)
            except Exception:  # one broken path must not hide the others' numbers
                result = {"error": traceback.format_exc(limit=6)[-3000:]}
            result["seconds"] = round(time.perf_counter() - part_started, 2)
            if "peak_memory_mib" not in result:
                result["peak_memory_mib"] = _peak_mib(device)
            results[name] = result
            print(f"gpu: {name}: {_one_line(result)}", flush=True)
    torch.set_num_threads(threads)
    failed = [
        f"{name}.{label}.{check}"
        for name, result in results.items()
        for label, checks in result.get("checks", {}).items()
        for check, value in checks.items()
        if value is False and (check != "bf16_autocast" or header["bf16_required"])
    ]
    errors, skipped = _with(results, "error"), _with(results, "skipped")
    return {
        "status": "problems" if failed or errors else "incomplete" if skipped else "ok",
        **header,
        "budget_s": budget_s,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "errors": errors,
        "skipped": skipped,
        "failed_checks": failed,
        "parts": results,
    }


@dataclass
class Context:
    """What a part gets: where it runs, how big, scratch space and its deadline."""

    device: torch.device
    sizes: Sizes
    scratch: Path
    deadline: float  # time.perf_counter() by which the part must be done
    data: str | None = None

    def left(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.perf_counter()


# -- measuring -----------------------------------------------------------------------------------


@dataclass
class Forward:
    """One backbone forward seen by the :class:`Probe`."""

    backbone: str
    training: bool
    images: int
    shape: tuple[int, ...]
    bf16_autocast: bool
    channels_last: bool
    at: float


@dataclass
class Probe:
    """Every forward of a backbone made by ``create_backbone`` while active (a global forward
    pre-hook): its batch, and whether it ran under bf16 autocast on channels-last input and
    weights. It watches real runs; it changes nothing."""

    forwards: list[Forward] = field(default_factory=list)

    @contextmanager
    def active(self) -> Iterator[Probe]:
        """Record while in the block."""
        handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()

    def _hook(self, module: torch.nn.Module, args: tuple) -> None:
        name = module.__dict__.get("backbone_name")
        if name is None or not args or not isinstance(args[0], torch.Tensor) or args[0].ndim != 4:
            return
        x, kind = args[0], args[0].device.type
        autocast = (
            torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16
        )
        self.forwards.append(
            Forward(
                backbone=name,
                training=module.training,
                images=int(x.shape[0]),
                shape=tuple(x.shape[1:]),
                bf16_autocast=autocast,
                channels_last=x.is_contiguous(memory_format=torch.channels_last)
                and _conv_weights_channels_last(module),
                at=time.perf_counter(),
            )
        )

    def checks(self, training: bool | None = None) -> dict[str, Any]:
        """Whether every recorded forward (of one mode, if given) had bf16 autocast and
        channels-last, and how many there were."""
        seen = [f for f in self.forwards if training is None or f.training == training]
        return {
            "forwards": len(seen),
            "bf16_autocast": bool(seen) and all(f.bf16_autocast for f in seen),
            "channels_last": bool(seen) and all(f.channels_last for f in seen),
        }


def _conv_weights_channels_last(module: torch.nn.Module) -> bool:
    """Whether the first 2-D convolution's weight is channels-last (True without one)."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            return layer.weight.is_contiguous(memory_format=torch.channels_last)
    return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(
    step: Callable[[], Any], images: int, context: Context, share: float | None = 1.0
) -> tuple[float, int]:
    """Images per second of ``step`` (``images`` each) and the timed steps it took.

    ``warmup`` untimed steps, then up to ``steps`` timed ones, fewer when ``share`` of the
    part's time left has gone (at least one; ``None``: always all, as DDP ranks must step
    together); the device is synchronised after every step.
    """
    for _ in range(context.sizes.warmup):
        step()
    _sync(context.device)
    until = time.perf_counter() + share * context.left() if share is not None else np.inf
    started, done = time.perf_counter(), 0
    while done < context.sizes.steps and (done == 0 or time.perf_counter() < until):
        step()
        _sync(context.device)
        done += 1
    return images * done / (time.perf_counter() - started), done


def pair(path: float, bare: float, what: str, steps: int) -> dict[str, Any]:
    """A path's images/s next to the bare backbone's."""
    return {
        "images_per_s": path,
        "bare_images_per_s": bare,
        "ratio": path / bare,
        "bare": what,
        "timed_steps": steps,
    }


def bare_step(
    backbone: torch.nn.Module, x: torch.Tensor, backward: bool, device: torch.device
) -> Callable[[], None]:
    """The bare backbone on a ready batch: forward, or forward + backward + AdamW, in bf16
    autocast on a GPU (channels-last, as the trainers run it)."""
    backbone = backbone.to(device).to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    if not backward:
        backbone.eval()

        def forward() -> None:
            with torch.inference_mode(), bf16_autocast(device):
                backbone(x)

        return forward
    backbone.train()
    optimiser = torch.optim.AdamW(backbone.parameters(), lr=1e-4)

    def train() -> None:
        with bf16_autocast(device):
            loss = backbone(x).float().square().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    return train


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _with(results: dict[str, Any], key: str) -> list[str]:
    return [name for name, result in results.items() if key in result]


def _one_line(result: dict[str, Any]) -> str:
    if "skipped" in result or "error" in result:
        return str(result.get("skipped") or result["error"].strip().splitlines()[-1])
    rates = ", ".join(
        f"{label} {r['images_per_s']:.0f} img/s ({r['ratio']:.0%} of bare)"
        for label, r in result.get("rates", {}).items()
    )
    return f"{rates}; {result['seconds']:.0f} s"


def _yaml(command: str, schedule: str) -> dict[str, Any]:
    return yaml.safe_load(schedule_file(command, schedule).read_text(encoding="utf-8"))


# -- trainers ------------------------------------------------------------------------------------


def part_trainers(context: Context) -> dict[str, Any]:
    """The four image trainers end to end on a tiny demo city, probed."""
    from core.dataroot import DataRoot
    from core.demo import DemoConfig, build_demo
    from train.contrastive import train_contrastive
    from train.fusion import train_fusion
    from train.perception import train_perception
    from train.scene import train_scene_filter

    sizes, device = context.sizes, str(context.device)
    root = context.scratch / "city"
    if context.data:
        shutil.copytree(context.data, root, ignore=shutil.ignore_patterns("runs", "cache"))
    else:
        config = DemoConfig(extent=TINY_EXTENT, flickr_photos=6000, workers=sizes.demo_workers)
        build_demo(root, config, show_progress=False)
    if sizes.votes is not None:  # fewer votes: the perception trainer's cost on a CPU
        votes = DataRoot(root).votes
        pd.read_csv(votes).iloc[: sizes.votes].to_csv(votes, index=False)
    epochs = sizes.trainer_epochs
    trainers = {
        "fusion": (
            train_fusion,
            FusionConfig(data=str(root), epochs=epochs, block_size=300.0, device=device),
        ),
        "scene_filter": (
            train_scene_filter,
            SceneTrainConfig(data=str(root), epochs=epochs, device=device),
        ),
        "perception": (
            train_perception,
            PerceptionConfig(data=str(root), epochs=epochs, device=device),
        ),
        "contrastive": (
            train_contrastive,
            ContrastiveConfig(data=str(root), device=device, **sizes.contrastive),
        ),
    }
    rates, checks, runs, skipped = {}, {}, {}, {}
    for name, (train, config) in trainers.items():
        if context.left() <= 0:
            skipped[name] = "the part's time was spent"
            continue
        probe = Probe()
        _reset_peak(context.device)
        started = time.perf_counter()
        with probe.active():
            train(config, log=lambda _: None)
        seconds = time.perf_counter() - started
        peak = _peak_mib(context.device)
        steps = [f for f in probe.forwards if f.training]
        first, last = steps[0], steps[-1]
        images = sum(f.images for f in steps[1:])
        loop = images / (last.at - first.at) if len(steps) > 1 else first.images / seconds
        biggest = max(steps, key=lambda f: f.images)
        x = torch.randn(biggest.images, *biggest.shape, device=context.device)
        bare, _ = rate(
            bare_step(create_backbone(first.backbone), x, True, context.device),
            len(x),
            context,
            share=0.1,
        )
        rates[name] = pair(loop, bare, "forward+backward+AdamW", max(1, len(steps) - 1))
        checks[name] = probe.checks(training=True)
        runs[name] = {
            "backbone": first.backbone,
            "input": list(biggest.shape),
            "batch": biggest.images,
            "seconds": round(seconds, 2),
            "peak_memory_mib": peak,
            "inference_forwards": probe.checks(training=False),
        }
    return {
        "what": "each trainer end to end on a tiny demo city; images/s between its first and "
        "last training forward, next to the bare backbone at its largest training batch",
        "rates": rates,
        "checks": checks,
        "runs": runs,
        "peak_memory_mib": max((r["peak_memory_mib"] or 0 for r in runs.values()), default=0)
        if context.device.type == "cuda"
        else None,
        **({"skipped_trainers": skipped} if skipped else {}),
    }


# -- the paper fusion step (also each DDP rank) --------------------------------------------------


def paper_config(sizes: Sizes, device: torch.device) -> FusionConfig:
    """fusion-paper.yaml, with the smoke run's tiny backbones and sizes where set."""
    config = FusionConfig.from_dict(_yaml("fusion", "paper"))
    return replace(config, device=str(device), **sizes.paper)


@dataclass
class FusionSetup:
    """The paper schedule's model, optimiser and in-memory cells, as ``train_fusion`` builds
    them (random pixels and ground features stand in for the data)."""

    config: FusionConfig
    ranks: Ranks
    model: FusionRegressor
    trainer: OneCycle
    inputs: CellInputs
    y: torch.Tensor
    generator: torch.Generator
    batch: int  # the global batch
    net: torch.nn.Module | None = None  # what steps: the model, or DDP around it

    @classmethod
    def build(cls, config: FusionConfig, ranks: Ranks, batch: int, steps: int) -> FusionSetup:
        """The setup for a global ``batch`` and at most ``steps`` optimisation steps."""
        cells, batches_per_epoch = 4 * batch, 4
        rng = np.random.default_rng(0)
        px = config.aerial_px
        aerial = rng.integers(0, 256, (cells, 3, px, px), dtype=np.uint8)
        ground_dim = create_backbone(config.ground_backbone).num_features
        inputs = CellInputs(
            aerial,
            torch.from_numpy(rng.standard_normal((cells, ground_dim), dtype=np.float32)),
            torch.from_numpy(rng.random(cells) < 0.9),
        )
        generator = seed_everything(config.seed)
        backbone = create_backbone(config.aerial_backbone, seed=config.seed)
        model = ranks.prepare(FusionRegressor(backbone, ground_dim))
        model.aerial.to(memory_format=torch.channels_last)
        # enough one-cycle steps for the run (stepping past the end is an error)
        epochs = max(config.epochs, -(-steps // batches_per_epoch))
        trainer = OneCycle(model.parameters(), config.lr, config.weight_decay, epochs, cells, batch)
        y = torch.from_numpy(rng.standard_normal(cells, dtype=np.float32))
        return cls(config, ranks, model, trainer, inputs, y, generator, batch)

    def stepper(self, frozen: bool) -> Callable[[], None]:
        """``train_fusion``'s step over the cells, the aerial backbone frozen or trained."""
        self.model.aerial.requires_grad_(not frozen)
        net = self.net = self.ranks.ddp(self.model)
        self.model.train()
        order = torch.arange(len(self.y)).split(self.batch)
        position = iter(range(1 << 62))

        def step() -> None:
            rows = order[next(position) % len(order)]
            train_step(net, self.trainer, self.inputs, self.y, rows, self.ranks, self.generator)

        return step

    def bare_input(self, rows: int) -> torch.Tensor:
        """Normalised aerial pixels (rows, 3, px, px) on the device, channels-last."""
        pixels = torch.from_numpy(self.inputs.aerial[:rows]).to(self.ranks.device)
        return normalise(pixels).contiguous(memory_format=torch.channels_last)


def part_fusion_paper(context: Context) -> dict[str, Any]:
    """The paper schedule's steps: aerial frozen (warm-up epochs), then fine-tuned."""
    config = paper_config(context.sizes, context.device)
    ranks = Ranks(context.device)
    sizes = context.sizes
    setup = FusionSetup.build(
        config, ranks, config.batch_size, 2 * (1 + sizes.warmup + sizes.steps)
    )
    rates, checks = {}, {}
    for phase, frozen in (("aerial_frozen", True), ("aerial_trained", False)):
        step = setup.stepper(frozen)
        probe = Probe()
        with probe.active():
            step()
        checks[phase] = probe.checks(training=True)
        path, steps = rate(step, config.batch_size, context, share=0.3)
        bare = bare_step(
            create_backbone(config.aerial_backbone),
            setup.bare_input(config.batch_size),
            not frozen,
            context.device,
        )
        reference, _ = rate(bare, config.batch_size, context, share=0.3)
        what = "forward" if frozen else "forward+backward+AdamW"
        rates[phase] = pair(path, reference, what, steps)
    return {
        "what": "train_fusion's step (train.fusion.train_step) on the paper schedule, pixels "
        "and pooled ground features in memory",
        "config": {
            k: getattr(config, k)
            for k in ("aerial_backbone", "ground_backbone", "aerial_px", "batch_size", "lr")
        },
        "rates": rates,
        "checks": checks,
    }


# -- MoCo v3 on ViT-B/16 -------------------------------------------------------------------------


def part_moco(context: Context) -> dict[str, Any]:
    """The contrastive trainer's step (train_contrastive's loop body) on the paper's ViT-B/16."""
    from core.models.contrastive import cosine_momentum
    from train.contrastive import augment

    device = context.device
    values = _yaml("contrastive", "paper") | {"device": str(device)} | context.sizes.moco
    config = ContrastiveConfig.from_dict(values)
    batch = config.batch_size
    model = (
        MoCoV3(
            create_backbone(config.backbone, seed=config.seed),
            config.dim,
            config.mlp_dim,
            config.temperature,
        )
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    trainer = OneCycle(
        [p for p in model.parameters() if p.requires_grad],
        config.lr,
        config.weight_decay,
        1,
        1000 * batch,
        batch,
    )
    generator = seed_everything(config.seed)
    pixels = torch.randint(0, 256, (2 * batch, 3, config.px, config.px), dtype=torch.uint8)
    model.train()
    counter = iter(range(1 << 62))

    def step() -> None:
        # as train_contrastive: uint8 pixels to the device, two MoCo v3 views, autocast
        first, second = pixels[:batch], pixels[batch:]
        views = [augment(p.to(device), generator, config.crop_min_scale) for p in (first, second)]
        with bf16_autocast(device):
            loss = model(*views, cosine_momentum(next(counter) % 1000, 1000, 0.99))
        trainer.step(loss)

    probe = Probe()
    with probe.active():
        step()
    path, steps = rate(step, 2 * batch, context, share=0.45)
    x = torch.cat([augment(pixels[i::2].to(device), generator, 0.35) for i in range(2)])
    reference, _ = rate(
        bare_step(create_backbone(config.backbone, seed=0), x, True, device),
        2 * batch,
        context,
        share=0.8,
    )
    return {
        "what": "MoCo v3 step (two views, momentum encoder on both, base encoder + predictor, "
        "InfoNCE, backward, AdamW) vs the bare backbone's forward+backward+AdamW on the same "
        "2 x batch images; 75% is the ceiling (four forward-equivalents where the bare step "
        "has three)",
        "config": {
            k: getattr(config, k) for k in ("backbone", "px", "batch_size", "dim", "mlp_dim")
        },
        "rates": {"pretraining": pair(path, reference, "forward+backward+AdamW", steps)},
        "checks": {"pretraining": probe.checks(training=True)},
    }


# -- feature extraction with JPEG decoding on the GPU --------------------------------------------


def write_jpegs(folder: Path, n: int, size: tuple[int, int]) -> pd.DataFrame:
    """``n`` street-sized JPEGs (smooth gradients with noise), as an image table."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(0)
    bank = []  # a few distinct pictures, shifted per file (encoding releases the GIL; numpy not)
    for phase in rng.integers(0, 256, (16, 3)):
        base = np.stack([xx + phase[0], yy + phase[1], xx + yy + phase[2]], -1) % 256
        bank.append(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))

    def one(i: int) -> str:
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(np.roll(bank[i % len(bank)], i % 97, axis=1)).save(path, quality=85)
        return str(path)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        paths = list(pool.map(one, range(n)))
    return pd.DataFrame({"id": [f"img{i:06d}" for i in range(n)], "path": paths})


def part_feature_extraction(context: Context) -> dict[str, Any]:
    """extract_features with JPEGs decoded on the device, and with PIL in workers, next to a
    bare forward on pixels already decoded on the device."""
    from core.features import ImageBytes, decode_images, extract_features, load_pixels

    sizes, device = context.sizes, context.device
    settings = dict(sizes.extraction)
    backbone, px, batch = settings.pop("backbone"), settings["px"], settings["batch_size"]
    images = write_jpegs(context.scratch / "jpegs", sizes.jpegs, sizes.jpeg_size)
    create_backbone(backbone)  # timm's first build (imports, registries) out of the timing

    def extract(decode_on: str, probe: Probe | None = None) -> dict[str, Any]:
        marks: list[tuple[float, int]] = []
        folder = Path(tempfile.mkdtemp(dir=context.scratch))
        started = time.perf_counter()
        with probe.active() if probe else nullcontext():
            features = extract_features(
                images,
                backbone,
                None,
                folder,
                device=str(device),
                chunk_batches=2,
                progress=lambda p: marks.append((time.perf_counter(), p["done"])),
                decode_on=decode_on,
                **settings,
            )
        seconds = time.perf_counter() - started
        (t0, n0), (t1, n1) = marks[0], marks[-1]
        matrix = np.array(features.matrix)
        shutil.rmtree(folder)
        return {
            "call": len(images) / seconds,  # model build, worker start, cache writes included
            "steady": (n1 - n0) / (t1 - t0) if n1 > n0 else len(images) / seconds,
            "matrix": matrix,
        }

    probe = Probe()
    on_device = extract("device", probe)
    on_cpu = extract("cpu")
    pixels = torch.from_numpy(np.array(load_pixels(images.iloc[:batch], px, context.scratch)))
    reference, steps = rate(
        bare_step(create_backbone(backbone), normalise(pixels.to(device)), False, device),
        len(pixels),
        context,
        share=0.5,
    )
    dataset = ImageBytes(list(images["path"][:batch]), px)
    raw = ImageBytes.collate([dataset[i] for i in range(len(dataset))])
    decode, _ = rate(lambda: decode_images(*raw, px, device), len(dataset), context, share=0.5)
    a, b = on_device["matrix"], on_cpu["matrix"]
    cosine = (a * b).sum(1) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12
    )
    what = "forward on decoded pixels already on the device"
    return {
        "what": "extract_features (ResNet-50 at 224 px on the GPU): steady images/s between "
        "the first and last chunk, and of the whole call; decode_on=device reads bytes in the "
        "workers and decodes batches with nvjpeg",
        "images": len(images),
        "jpeg_size": list(sizes.jpeg_size),
        "config": {"backbone": backbone, **settings},
        "rates": {
            "decode_on_device": pair(on_device["steady"], reference, what, steps),
            "decode_on_cpu_workers": pair(on_cpu["steady"], reference, what, steps),
        },
        "whole_call_images_per_s": {"device": on_device["call"], "cpu": on_cpu["call"]},
        "device_decode_only_images_per_s": decode,
        "features_cosine_min_device_vs_cpu_decoding": float(cosine.min()),
        "checks": {"extraction": probe.checks(training=False)},
    }


# -- DDP over the visible GPUs -------------------------------------------------------------------


def part_ddp(context: Context) -> dict[str, Any]:
    """One process per GPU (NCCL; two gloo processes in the smoke run) through ``Ranks``."""
    world = context.sizes.ddp_world or torch.cuda.device_count()
    out = context.scratch / "ddp"
    out.mkdir()
    spec = {"device": context.device.type, "smoke": context.sizes is SMOKE}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = torch.multiprocessing.start_processes(
        ddp_rank,
        args=(world, port, spec, str(out)),
        nprocs=world,
        # CUDA cannot be forked; on the CPU a fork saves each rank the imports (seconds)
        start_method="spawn" if context.device.type == "cuda" else "fork",
        join=False,
    )
    try:
        while not processes.join(timeout=1.0):
            if context.left() <= 0:
                raise TimeoutError(f"the {world} ranks did not finish in the part's time")
    finally:
        for process in processes.processes:
            if process.is_alive():
                process.kill()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    result = ranks[0]
    result["peak_memory_mib"] = (
        max(r["peak_memory_mib"] for r in ranks) if context.device.type == "cuda" else None
    )
    if world == 1:
        result["note"] = (
            "one GPU visible: world 1, so Ranks.ddp does not wrap the model and BatchNorm is "
            "not synchronised; the NCCL process group was joined and one all_reduce checked"
        )
    return result


def ddp_rank(rank: int, world: int, port: int, spec: dict[str, Any], out: str) -> None:
    """One rank of :func:`part_ddp`: torchrun's environment, ``Ranks``, the paper step."""
    wanted = torch.device(spec["device"])
    if wanted.type == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # the ranks share the cores
        torch.set_num_threads(1)
    sizes = SMOKE if spec["smoke"] else GPU
    ranks = join_local_group(rank, world, port, wanted)
    device = ranks.device
    joined = torch.distributed.is_initialized()
    if joined:
        ones = torch.ones(1, device=device)
        torch.distributed.all_reduce(ones)
        all_reduce_ok = int(ones.item()) == world
    # no deadline: every rank must take the same steps (the parent stops them if late)
    context = Context(device, sizes, Path(out), np.inf)
    config = paper_config(sizes, device)
    per_rank = config.batch_size
    setup = FusionSetup.build(config, ranks, per_rank * world, 1 + sizes.warmup + sizes.steps)
    step = setup.stepper(frozen=False)
    probe = Probe()
    with probe.active():
        step()
    # the ranks step in lock step; rank 0's clock speaks for the run
    path, steps = rate(step, per_rank * world, context, share=None)
    ranks.barrier()
    bare = bare_step(
        create_backbone(config.aerial_backbone), setup.bare_input(per_rank), True, device
    )
    reference, _ = rate(bare, per_rank, context, share=None)  # all ranks at once, no traffic
    result = {
        "what": "train_fusion's step on the paper schedule, one process per GPU through "
        "core.distributed.Ranks (DDP, SyncBatchNorm on GPUs), a global batch of "
        "per-rank batch x world; bare: every rank's own forward+backward+AdamW at the "
        "per-rank batch, at the same time, times the world",
        "world": world,
        "backend": torch.distributed.get_backend() if joined else None,
        "per_rank_batch": per_rank,
        "rates": {
            "fusion_step": pair(path, reference * world, "forward+backward+AdamW x world", steps)
        },
        "checks": {
            "fusion_step": probe.checks(training=True)
            | {
                "ddp_wrapped": world == 1
                or isinstance(setup.net, torch.nn.parallel.DistributedDataParallel),
                "all_reduce": all_reduce_ok if joined else world == 1,
                "sync_batchnorm": wanted.type != "cuda"
                or world == 1
                or any(isinstance(m, torch.nn.SyncBatchNorm) for m in setup.model.modules()),
            }
        },
        "peak_memory_mib": _peak_mib(device),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    ranks.barrier()
    if joined:
        torch.distributed.destroy_process_group()


# -- the tiny UGE model in bf16 ------------------------------------------------------------------


def part_uge(context: Context) -> dict[str, Any]:
    """The UGE embedder on the tiny Qwen2-VL in bf16: embeddings and a LoRA training step."""
    from core.models.uge import (
        IMAGE_TASK,
        TEXT_TASK,
        LoraSettings,
        UGEEmbedder,
        UGESettings,
        make_tiny_qwen2vl,
        stage1_loss,
    )

    device, sizes = context.device, context.sizes
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    px, n = sizes.uge_px, sizes.uge_batch
    folder = make_tiny_qwen2vl(context.scratch / "tiny-qwen2vl")
    embedder = UGEEmbedder.from_folder(
        folder,
        UGESettings(image_min_pixels=px * px, image_max_pixels=px * px, lora=LoraSettings()),
        dtype=dtype,
        device=device,
    )
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)) for _ in range(n)
    ]
    texts = [f"A street in buurt {i} of Amsterdam, {i % 7 * 100} m from the Dam." for i in range(n)]
    prepared_images = embedder.prepare_images(pictures, IMAGE_TASK)
    prepared_texts = embedder.prepare_texts(texts, TEXT_TASK)
    model = embedder.base_model.model

    def bare_forward(batch: dict[str, torch.Tensor]) -> Callable[[], None]:
        def forward() -> None:
            with torch.no_grad():
                model(**batch, use_cache=False)

        return forward

    with torch.no_grad():
        images_rate, steps = rate(
            lambda: embedder.embed_images(pictures, IMAGE_TASK), n, context, 0.15
        )
        texts_rate, _ = rate(lambda: embedder.embed_texts(texts, TEXT_TASK), n, context, 0.15)
    bare_images, _ = rate(bare_forward(prepared_images), n, context, 0.15)
    bare_texts, _ = rate(bare_forward(prepared_texts), n, context, 0.15)

    optimiser = torch.optim.AdamW(embedder.adapter_parameters().values(), lr=1e-3)
    embedder.train()

    def train() -> None:
        loss = stage1_loss(embedder, pictures, texts, IMAGE_TASK, TEXT_TASK, 0.05)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    def bare_train() -> None:
        loss = sum(
            embedder.hidden_states(b).float().mean() for b in (prepared_images, prepared_texts)
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    train_rate, train_steps = rate(train, n, context, 0.3)
    bare_train_rate, _ = rate(bare_train, n, context, 0.3)
    embedder.eval()
    backbone_dtype = next(embedder.base_model.parameters()).dtype
    return {
        "what": "UGEEmbedder on the tiny Qwen2-VL (LoRA): embeddings (processor included) and "
        "a stage-1 step (image and text embeddings, InfoNCE, backward, AdamW) per image-text "
        "pair, vs the VLM's bare forward (+backward) on the same prepared batches",
        "batch": n,
        "image_px": px,
        "rates": {
            "image_embeddings": pair(images_rate, bare_images, "VLM forward", steps),
            "text_embeddings": pair(texts_rate, bare_texts, "VLM forward", steps),
            "stage1_pairs": pair(
                train_rate, bare_train_rate, "VLM forward+backward+AdamW", train_steps
            ),
        },
        "checks": {
            "embedder": {
                "dtype": str(backbone_dtype),
                "bf16_weights": backbone_dtype == torch.bfloat16 or device.type != "cuda",
            }
        },
    }


# -- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.bench_gpu --cpu-smoke [--out DIR]``: the smoke run from the shell."""
    import argparse

    from bench.common import run_one, summary

    parser = argparse.ArgumentParser(prog="python -m bench.bench_gpu", description=__doc__)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result folder (default: a temporary one for "
        "--cpu-smoke, so a GPU result in bench/results is never replaced by a smoke run)",
    )
    args = parser.parse_args(argv)
    out = args.out
    if out is None:
        from bench.common import RESULTS_DIR

        out = Path(tempfile.mkdtemp(prefix="bench-gpu-smoke-")) if args.cpu_smoke else RESULTS_DIR
    payload = run_one("gpu", out, {"cpu_smoke": args.cpu_smoke})
    print(summary(payload))
    print(f"written: {out / 'gpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
