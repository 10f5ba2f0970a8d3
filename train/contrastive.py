"""``python -m train contrastive``: spatiotemporal contrastive pretraining (UrbanSTCL).

MoCo v3 on street-level images with the paper's three positive-pair rules, one run each:
``temporal`` (the same place and heading years apart), ``spatial`` (other places within the
buffer) and ``global`` (two augmentations of one image); ``unified`` trains on a weighted sum of
the three losses (the paper's open question 2).

Every pair gets two MoCo v3 views (random resized crop, flip, colour jitter, grayscale, blur,
solarize), so a temporal pair teaches invariance to the years between captures on top of the
augmentations. Cells in held-out spatial blocks never reach training: the place-recognition
evaluation runs on them. Each epoch ends with a checkpoint; ``--resume RUN`` continues an
interrupted run from it. The run saves ``backbone.safetensors`` (ground weights for the fusion
model: ``--ground-weights RUN``) and per-cell mean image embeddings for the dashboard.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from core.configs import ContrastiveConfig
from core.dataroot import DataRoot
from core.datasets import street_images
from core.features import load_pixels
from core.grid import read_grid, spatial_split
from core.models.backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone, save_backbone
from core.models.contrastive import MoCoV3, cosine_momentum
from core.models.device import resolve_device
from core.pairs import PairConfig, pair_statistics, require_temporal, spatial_pairs, temporal_pairs
from core.progress import Progress
from core.runs import BACKBONE_FILE, CHECKPOINT_FILE, EPOCHS_FILE, RunWriter
from train.checkpoint import load_checkpoint, save_checkpoint
from train.common import OneCycle, predict, seed_everything, to_input

HOLDOUT_SPLIT = "holdout"


def source_images(root: DataRoot, source: str) -> pd.DataFrame:
    """The catalog's images of one source with position, heading and capture time, sorted by id.

    The trainers' image set (:func:`core.datasets.street_images`): a missing, corrupt or
    truncated image is left out with a warning naming it before any pixels are decoded.
    """
    return street_images(
        root, source, columns=("id", "path", "cell_id", "x", "y", "heading", "captured_at")
    )


def holdout_cells(root: DataRoot, share: float, block_size: float, seed: int) -> set[int]:
    """Cells of the held-out spatial blocks (never trained on; place recognition runs there)."""
    ids = read_grid(root.grid)["cell_id"].to_numpy()
    split = spatial_split(ids, (1 - share, 0.0, share), block_size, seed)
    return set(ids[split == "test"].tolist())


def augment(batch: torch.Tensor, generator: torch.Generator, crop_min_scale: float) -> torch.Tensor:
    """MoCo v3 views of uint8 images (B, 3, H, W): normalised float, channels-last.

    Random resized crop (area ``crop_min_scale``..1, aspect 3/4..4/3) with a random horizontal
    flip in one affine resampling; colour jitter (p 0.8: brightness, contrast, saturation 0.4,
    0.4, 0.2; hue is left out at these sizes); grayscale (p 0.2); blur (p 0.5); solarize (p 0.1).
    Parameters are drawn on the CPU from ``generator`` so runs repeat on any device.
    """
    n, device = len(batch), batch.device

    def uniform(lo: float, hi: float, size: tuple[int, ...] = ()) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand((n, *size), generator=generator)).to(device)

    def chance(p: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) < p).to(device).view(n, 1, 1, 1)

    x = batch.float() / 255
    area, log_ratio = uniform(crop_min_scale, 1.0), uniform(np.log(3 / 4), np.log(4 / 3))
    width = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
    height = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 1, 1] = width * flip, height
    theta[:, 0, 2], theta[:, 1, 2] = uniform(-1, 1) * (1 - width), uniform(-1, 1) * (1 - height)
    x = F.grid_sample(
        x,
        F.affine_grid(theta, list(x.shape), align_corners=False),
        mode="bilinear",
        padding_mode="reflection",
        align_corners=False,
    )

    grey = _grey(x)
    jitter = chance(0.8)
    brightness, contrast, saturation = (
        uniform(1 - s, 1 + s).view(n, 1, 1, 1) for s in (0.4, 0.4, 0.2)
    )
    jittered = x * brightness
    mean = grey.mean((2, 3), keepdim=True) * brightness
    jittered = (jittered - mean) * contrast + mean
    jittered_grey = _grey(jittered)
    jittered = jittered_grey + (jittered - jittered_grey) * saturation
    x = torch.where(jitter, jittered, x).clamp(0, 1)
    x = torch.where(chance(0.2), _grey(x).expand_as(x), x)
    x = torch.where(
        chance(0.5), F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), x
    )
    x = torch.where(chance(0.1) & (x >= 0.5), 1 - x, x)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601) of (B, 3, H, W) images in [0, 1], as (B, 1, H, W)."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def embed_images(
    backbone: torch.nn.Module, pixels: np.ndarray, device: torch.device, batch_size: int = 1024
) -> np.ndarray:
    """Backbone features of uint8 pixels (n, 3, H, W), in order, without augmentation."""
    backbone.eval().to(device)

    def forward(index: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            return backbone(to_input(pixels, index, device))

    return predict(forward, len(pixels), batch_size).numpy()


class PairSampler:
    """Batches of positive pairs (row positions into the training pixels) for one rule."""

    def __init__(self, rule: str, pairs: pd.DataFrame | None, n_images: int) -> None:
        self.rule, self.n_images = rule, n_images
        self.pairs = (
            None if pairs is None else torch.from_numpy(pairs[["a", "b"]].to_numpy(copy=True))
        )

    def sample(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pairs is None:  # global: both views come from one image
            rows = torch.randint(self.n_images, (batch_size,), generator=generator)
            return rows, rows
        chosen = self.pairs[torch.randint(len(self.pairs), (batch_size,), generator=generator)]
        swap = torch.rand(batch_size, generator=generator) < 0.5  # pairs are stored a < b
        return torch.where(swap, chosen[:, 1], chosen[:, 0]), torch.where(
            swap, chosen[:, 0], chosen[:, 1]
        )


def build_samplers(
    images: pd.DataFrame, rules: dict[str, float], config: PairConfig, source: str
) -> tuple[dict[str, PairSampler], dict[str, dict]]:
    """A sampler per rule and the statistics of its pairs."""
    samplers, statistics = {}, {}
    for rule in rules:
        if rule == "temporal":
            pairs = require_temporal(temporal_pairs(images, config, source), images, config, source)
        elif rule == "spatial":
            pairs = spatial_pairs(images, config, source)
            if pairs.empty:
                raise ValueError(f"{source}: no spatial pairs within {config.spatial_buffer_m:g} m")
        else:
            pairs = None
        samplers[rule] = PairSampler(rule, pairs, len(images))
        statistics[rule] = (
            pair_statistics(pairs, len(images))
            if pairs is not None
            else {"count": len(images), "n_images": len(images)}
        )
    return samplers, statistics


def train_contrastive(
    config: ContrastiveConfig,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> str:
    """Pretrain one encoder and write its run folder; returns the run id.

    With ``config.resume`` set to an interrupted run's id, that run's own config is used and
    training continues after its last checkpoint.
    """
    root = DataRoot(Path(config.data))
    if config.resume:
        run = RunWriter.resume(root.runs, config.resume, progress=progress)
        config = ContrastiveConfig.from_dict(
            {**run.config, "data": config.data, "device": config.device, "resume": config.resume}
        )
    device = resolve_device(config.device)
    generator = seed_everything(config.seed)
    images = source_images(root, config.source)
    held_out = holdout_cells(root, config.holdout_share, config.block_size, config.split_seed)
    train_images = images[~images["cell_id"].isin(held_out)].reset_index(drop=True)
    samplers, statistics = build_samplers(
        train_images, config.rules, config.pairs, str(root.catalog)
    )
    pixels = load_pixels(train_images, config.px, root.cache / "pixels")

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
        config.epochs,
        config.steps_per_epoch * config.batch_size,
        config.batch_size,
    )
    total_steps = config.epochs * config.steps_per_epoch
    if not config.resume:
        resolved = asdict(config) | {"label": f"contrastive {config.objective}"}
        run = RunWriter(root.runs, "contrastive", resolved, progress=progress)
    with run:
        start = 0
        if config.resume:
            start = load_checkpoint(
                run.path / CHECKPOINT_FILE, model, trainer.optimiser, trainer.schedule, generator
            )
            run.keep_epochs(start)
            log(f"resuming {run.run_id} after epoch {start}")
        run.progress(epoch=start, epochs=config.epochs)
        run.log(
            f"{config.objective}: {len(train_images)} training images ({len(images) - len(train_images)} "
            f"held out), pairs { ({r: s['count'] for r, s in statistics.items()}) }, device {device}"
        )
        for epoch in range(start + 1, config.epochs + 1):
            model.train()
            started, totals = time.perf_counter(), dict.fromkeys(config.rules, 0.0)
            for step in range(config.steps_per_epoch):
                momentum = cosine_momentum(
                    (epoch - 1) * config.steps_per_epoch + step, total_steps, config.base_momentum
                )
                loss = torch.zeros((), device=device)
                for i, (rule, weight) in enumerate(config.rules.items()):
                    first, second = samplers[rule].sample(config.batch_size, generator)
                    views = [
                        augment(
                            torch.as_tensor(np.asarray(pixels[rows.numpy()])).to(device),
                            generator,
                            config.crop_min_scale,
                        )
                        for rows in (first, second)
                    ]
                    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                        # the momentum encoder moves once per step, with the first rule
                        rule_loss = model(*views, momentum if i == 0 else 1.0)
                    totals[rule] += float(rule_loss.detach())
                    loss = loss + weight * rule_loss
                trainer.step(loss)
            seconds = time.perf_counter() - started
            losses = {
                f"loss_{rule}": total / config.steps_per_epoch for rule, total in totals.items()
            }
            pair_images = 2 * config.batch_size * config.steps_per_epoch * len(config.rules)
            run.log_epoch(
                epoch=epoch,
                **losses,
                momentum=round(momentum, 5),
                seconds=round(seconds, 2),
                images_per_s=round(pair_images / seconds, 1),
            )
            save_checkpoint(
                run.path / CHECKPOINT_FILE,
                model,
                trainer.optimiser,
                trainer.schedule,
                epoch,
                generator,
            )
            run.progress(epoch=epoch, epochs=config.epochs, loss=sum(losses.values()))
            log(
                f"contrastive {config.objective} epoch {epoch}/{config.epochs}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in losses.items())
                + f" ({seconds:.1f} s)"
            )
        _finish(run, root, config, model, images, held_out, statistics, device)
    log(f"contrastive {config.objective}: run {run.run_id}")
    return run.run_id


def _finish(
    run: RunWriter,
    root: DataRoot,
    config: ContrastiveConfig,
    model: MoCoV3,
    images: pd.DataFrame,
    held_out: set[int],
    statistics: dict[str, dict],
    device: torch.device,
) -> None:
    """Save the encoder, per-cell embeddings of every image, and the run's metrics."""
    save_backbone(
        model.backbone,
        run.path / BACKBONE_FILE,
        trained_on=f"contrastive {config.objective} pairs",
        px=str(config.px),
    )
    run.save_model(
        {k: v.cpu() for k, v in model.state_dict().items()},
        {"kind": "contrastive", "objective": config.objective, "backbone": config.backbone},
    )
    pixels = load_pixels(images, config.px, root.cache / "pixels")
    embeddings = embed_images(model.backbone, pixels, device)
    cells = images["cell_id"].to_numpy(np.int64)
    frame = pd.DataFrame(embeddings).groupby(cells).mean()
    run.write_embeddings(frame.index.to_numpy(np.int64), frame.to_numpy(np.float32))
    counts = pd.Series(cells).value_counts()
    run.write_predictions(
        pd.DataFrame(
            {
                "cell_id": frame.index.to_numpy(np.int64),
                "split": np.where(frame.index.isin(list(held_out)), HOLDOUT_SPLIT, "train"),
                "true": np.nan,
                "predicted": np.nan,
                "images": counts.reindex(frame.index).to_numpy(),
            }
        )
    )
    epochs = pd.read_csv(run.path / EPOCHS_FILE)
    run.write_metrics(
        {
            "label": f"contrastive {config.objective}",
            "objective": config.objective,
            "images_per_s": float(epochs["images_per_s"].median()),
            **{f"final_{k}": float(v) for k, v in epochs.iloc[-1].items() if k.startswith("loss_")},
            "pairs": statistics,
        }
    )
    (run.path / CHECKPOINT_FILE).unlink(
        missing_ok=True
    )  # the run is complete; the weights are saved
