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

Under ``torchrun --nproc-per-node N`` (:mod:`core.distributed`) every rank draws the same pairs
and view decisions from the same seeded generator and takes its slice of each global batch;
queries meet the keys of all ranks (MoCo v3's gather), DDP averages the gradients, and the
momentum encoder follows the synchronised base encoder on every rank. The embeddings are
computed in shares and gathered; rank 0 alone writes the run folder and its checkpoints, which
every rank reads on ``--resume``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from core.configs import ContrastiveConfig
from core.dataroot import DataRoot
from core.datasets import street_images
from core.distributed import Ranks
from core.features import load_pixels
from core.grid import read_grid, spatial_split
from core.models.backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone, save_backbone
from core.models.contrastive import MoCoV3, cosine_momentum
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


@dataclass(frozen=True)
class Views:
    """The random MoCo v3 view decisions for a batch of images, one row per image.

    Drawn on the CPU from a generator (:meth:`draw`) apart from the images, so that every rank
    can draw the decisions of the whole global batch, take its own rows (:meth:`take`) and
    apply them to its own images only: N ranks then see exactly the views one process would.
    """

    area: torch.Tensor
    log_ratio: torch.Tensor
    flip: torch.Tensor
    shift_x: torch.Tensor
    shift_y: torch.Tensor
    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    grey: torch.Tensor
    blur: torch.Tensor
    solarize: torch.Tensor

    @classmethod
    def draw(cls, n: int, generator: torch.Generator, crop_min_scale: float) -> Views:
        """Decisions for ``n`` images (see :func:`augment` for what they are)."""

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator)

        def chance(p: float) -> torch.Tensor:
            return torch.rand(n, generator=generator) < p

        # the order of the draws is part of a run's reproducibility: keep it
        area, log_ratio = uniform(crop_min_scale, 1.0), uniform(np.log(3 / 4), np.log(4 / 3))
        flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
        shift_x, shift_y = uniform(-1, 1), uniform(-1, 1)
        jitter = chance(0.8)
        brightness, contrast, saturation = (uniform(1 - s, 1 + s) for s in (0.4, 0.4, 0.2))
        grey, blur, solarize = chance(0.2), chance(0.5), chance(0.1)
        return cls(
            area, log_ratio, flip, shift_x, shift_y, jitter, brightness, contrast, saturation,
            grey, blur, solarize,
        )  # fmt: skip

    def take(self, rows: torch.Tensor) -> Views:
        """The decisions of ``rows`` only (a rank's share of a global batch)."""
        return Views(*(getattr(self, f.name)[rows] for f in fields(self)))

    def apply(self, batch: torch.Tensor) -> torch.Tensor:
        """Views of uint8 images (B, 3, H, W), one row of decisions each: normalised float,
        channels-last, on the images' device."""
        n, device = len(batch), batch.device

        area, log_ratio = self.area.to(device), self.log_ratio.to(device)
        width = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)
        height = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 1, 1] = width * self.flip.to(device), height
        theta[:, 0, 2] = self.shift_x.to(device) * (1 - width)
        theta[:, 1, 2] = self.shift_y.to(device) * (1 - height)
        x = F.grid_sample(
            batch.float() / 255,
            F.affine_grid(theta, list(batch.shape), align_corners=False),
            mode="bilinear",
            padding_mode="reflection",
            align_corners=False,
        )

        # Colour jitter in one pass. Brightness b, contrast c about the grey mean g_m and
        # saturation s about the luma are each affine and the luma of an image is affine in
        # it, so together: s*b*c * x + (1 - s)*b*c * luma(x) + b*(1 - c)*g_m; b = c = s = 1
        # (no jitter) leaves x.
        jitter = self.jitter.to(device)
        one = torch.ones(n, device=device)
        brightness, contrast, saturation = (
            torch.where(jitter, v.to(device), one)
            for v in (self.brightness, self.contrast, self.saturation)
        )
        scale = (brightness * contrast).view(n, 1, 1, 1)
        grey_mean = _grey(x.mean((2, 3), keepdim=True))
        shift = (brightness.view(n, 1, 1, 1) * (1 - contrast.view(n, 1, 1, 1))) * grey_mean
        saturation = saturation.view(n, 1, 1, 1)
        x = torch.addcmul(_grey(x) * (scale * (1 - saturation)) + shift, x, scale * saturation)
        x = x.clamp_(0, 1)
        x = _transform_rows(x, self.grey, lambda y: _grey(y).expand_as(y))
        x = _transform_rows(x, self.blur, _box_blur)
        # min(x, 1 - x) is exactly 1 - x where x >= 0.5 and x elsewhere
        x = _transform_rows(x, self.solarize, lambda y: torch.minimum(y, 1 - y))
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) / std
        out = torch.empty_like(x, memory_format=torch.channels_last)
        return torch.addcmul(-mean, x, 1 / std, out=out)


def augment(batch: torch.Tensor, generator: torch.Generator, crop_min_scale: float) -> torch.Tensor:
    """MoCo v3 views of uint8 images (B, 3, H, W): normalised float, channels-last.

    Random resized crop (area ``crop_min_scale``..1, aspect 3/4..4/3) with a random horizontal
    flip in one affine resampling; colour jitter (p 0.8: brightness, contrast, saturation 0.4,
    0.4, 0.2; hue is left out at these sizes); grayscale (p 0.2); blur (p 0.5); solarize (p 0.1).
    Parameters are drawn on the CPU from ``generator`` (:class:`Views`) so runs repeat on any
    device.
    """
    return Views.draw(len(batch), generator, crop_min_scale).apply(batch)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601) of (B, 3, H, W) images in [0, 1], as (B, 1, H, W)."""
    # three multiply-adds on channel planes: no (B, 3, H, W) temporary
    return x[:, :1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:] * 0.114


def _transform_rows(
    x: torch.Tensor, chosen: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``x`` with ``transform`` applied to the images where ``chosen`` (a CPU bool per image)
    is set, in place: only those images are transformed."""
    rows = chosen.nonzero().squeeze(1).to(x.device)  # on the CPU: no device sync
    if len(rows):
        x.index_copy_(0, rows, transform(x.index_select(0, rows)))
    return x


def _box_blur(x: torch.Tensor) -> torch.Tensor:
    """The mean of each pixel's 3 x 3 neighbourhood inside the image, for (B, C, H, W).

    ``avg_pool2d(x, 3, 1, 1, count_include_pad=False)`` up to rounding, as two one-dimensional
    sums, in a tenth of its time on CPU.
    """
    return _box_sum(x) / _box_sum(torch.ones_like(x[:1, :1]))


def _box_sum(x: torch.Tensor) -> torch.Tensor:
    """Sums over each pixel's 3 x 3 neighbourhood of (B, C, H, W), zeros outside the image."""
    padded = F.pad(x, (1, 1, 1, 1))
    rows = padded[..., :-2] + padded[..., 1:-1] + padded[..., 2:]
    return rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]


def embed_images(
    backbone: torch.nn.Module,
    pixels: np.ndarray,
    device: torch.device,
    batch_size: int = 1024,
    rows: torch.Tensor | None = None,
) -> np.ndarray:
    """Backbone features of uint8 pixels (n, 3, H, W), in order, without augmentation.

    With ``rows`` only those images (a rank's share), in the order of ``rows``.
    """
    backbone.eval().to(device)
    rows = torch.arange(len(pixels)) if rows is None else rows

    def forward(index: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            return backbone(to_input(pixels, rows[index], device))

    return predict(forward, len(rows), batch_size).numpy()


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


class Objectives(nn.Module):
    """The losses of all of a step's rules in one forward pass, so that DDP reduces the
    gradients once per step (it allows one forward per backward).

    Args:
        model: the MoCo v3 model; its momentum encoder moves once per step, with the first rule.
    """

    def __init__(self, model: MoCoV3) -> None:
        super().__init__()
        self.model = model

    @override
    def forward(
        self, views: list[tuple[torch.Tensor, torch.Tensor]], momentum: float
    ) -> list[torch.Tensor]:
        """One MoCo v3 loss per pair of view batches (this rank's queries against all keys)."""
        return [self.model(x1, x2, momentum if i == 0 else 1.0) for i, (x1, x2) in enumerate(views)]


def rank_views(
    sampler: PairSampler,
    batch_size: int,
    pixels: np.ndarray,
    generator: torch.Generator,
    crop_min_scale: float,
    ranks: Ranks,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's two view batches of one global batch of ``batch_size`` pairs.

    Every rank draws the same global batch of pairs and the same view decisions for all of it
    from the same generator, then decodes and augments only its slice (pairs ``rank, rank + N,
    ...``): the ranks together hold exactly one process's batch, and their generators stay equal.
    """
    first, second = sampler.sample(batch_size, generator)
    mine = ranks.shard(torch.arange(batch_size))
    views = []
    for rows in (first, second):
        decisions = Views.draw(batch_size, generator, crop_min_scale).take(mine)
        images = torch.as_tensor(np.asarray(pixels[rows[mine].numpy()])).to(ranks.device)
        views.append(decisions.apply(images))
    return views[0], views[1]


def step_losses(
    net: nn.Module,
    samplers: dict[str, PairSampler],
    pixels: np.ndarray,
    generator: torch.Generator,
    config: ContrastiveConfig,
    momentum: float,
    ranks: Ranks,
) -> list[torch.Tensor]:
    """The forward pass of one step: this rank's loss for each of ``config.rules``, in order.

    Each loss is the mean over this rank's equal share of the global batch, its queries against
    the keys of all ranks; DDP's average of the gradients over the ranks then makes the step
    the global batch's mean, as in one process.

    Args:
        net: :class:`Objectives` of the model (DDP-wrapped under torchrun).
        samplers: a pair sampler per rule.
        pixels: uint8 training images (n, 3, H, W), which the samplers index.
        generator: the run's generator, in the same state on every rank.
        config: the run (rules, ``batch_size``, ``crop_min_scale``).
        momentum: of the momentum encoder's update, made once, with the first rule.
        ranks: where this process stands.
    """
    views = [
        rank_views(
            samplers[rule], config.batch_size, pixels, generator, config.crop_min_scale, ranks
        )
        for rule in config.rules
    ]
    device = ranks.device
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        return net(views, momentum)


def train_contrastive(
    config: ContrastiveConfig,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> str:
    """Pretrain one encoder and write its run folder; returns the run id.

    With ``config.resume`` set to an interrupted run's id, that run's own config is used and
    training continues after its last checkpoint.

    Under torchrun every rank runs this (see :mod:`core.distributed`): each takes its share of
    every global batch of ``batch_size`` pairs, contrasts its queries with the keys of all ranks
    (:meth:`core.models.contrastive.MoCoV3.contrastive_loss`), and DDP averages the gradients,
    so a step is the global batch's step; rank 0 alone writes the run folder and checkpoints.

    Raises:
        ValueError: if ``batch_size`` does not split evenly over the ranks (the keys of all
            ranks are gathered in equal shares).
    """
    root = DataRoot(Path(config.data))
    ranks = Ranks(config.device)
    device = ranks.device
    log = log if ranks.is_main else (lambda line: None)  # rank 0 speaks for the run
    resumed, checkpoint = None, None
    if config.resume:
        # rank 0 reopens the run; every rank then reads its config and checkpoint
        if ranks.is_main:
            resumed = RunWriter.resume(root.runs, config.resume, progress=progress)
        saved, folder = ranks.broadcast(
            (resumed.config, str(resumed.path)) if resumed is not None else None
        )
        config = ContrastiveConfig.from_dict(
            {**saved, "data": config.data, "device": config.device, "resume": config.resume}
        )
        checkpoint = Path(folder) / CHECKPOINT_FILE
    if config.batch_size % ranks.world:
        raise ValueError(
            f"batch_size {config.batch_size} does not split evenly over {ranks.world} processes"
        )
    generator = seed_everything(config.seed)
    images = source_images(root, config.source)
    held_out = holdout_cells(root, config.holdout_share, config.block_size, config.split_seed)
    train_images = images[~images["cell_id"].isin(held_out)].reset_index(drop=True)
    samplers, statistics = build_samplers(
        train_images, config.rules, config.pairs, str(root.catalog)
    )
    with ranks.main_first():  # rank 0 fills the pixel cache, the others read it
        pixels = load_pixels(train_images, config.px, root.cache / "pixels")

    model = ranks.prepare(
        MoCoV3(
            create_backbone(config.backbone, seed=config.seed),
            config.dim,
            config.mlp_dim,
            config.temperature,
        )
    ).to(memory_format=torch.channels_last)
    trainer = OneCycle(
        [p for p in model.parameters() if p.requires_grad],
        config.lr,
        config.weight_decay,
        config.epochs,
        config.steps_per_epoch * config.batch_size,
        config.batch_size,
    )
    total_steps = config.epochs * config.steps_per_epoch
    resolved = asdict(config) | {
        "label": f"contrastive {config.objective}",
        "processes": ranks.world,
    }

    def start() -> RunWriter:
        return resumed or RunWriter(root.runs, "contrastive", resolved, progress=progress)

    with ranks.run_writer(start) as run:
        start_epoch = 0
        if checkpoint is not None:
            # every rank the same state: weights, optimiser, schedule and shuffling generator
            start_epoch = load_checkpoint(
                checkpoint, model, trainer.optimiser, trainer.schedule, generator
            )
            run.keep_epochs(start_epoch)
            message = f"resuming after epoch {start_epoch} on {ranks.world} process(es)"
            run.log(message)
            log(f"{run.run_id}: {message}")
        net = ranks.ddp(Objectives(model))
        run.progress(epoch=start_epoch, epochs=config.epochs)
        run.log(
            f"{config.objective}: {len(train_images)} training images ({len(images) - len(train_images)} "
            f"held out), pairs { ({r: s['count'] for r, s in statistics.items()}) }, "
            f"device {device} x {ranks.world} process(es)"
        )
        weights = list(config.rules.values())
        for epoch in range(start_epoch + 1, config.epochs + 1):
            model.train()
            started, totals = time.perf_counter(), dict.fromkeys(config.rules, 0.0)
            for step in range(config.steps_per_epoch):
                momentum = cosine_momentum(
                    (epoch - 1) * config.steps_per_epoch + step, total_steps, config.base_momentum
                )
                rule_losses = step_losses(net, samplers, pixels, generator, config, momentum, ranks)
                loss = torch.zeros((), device=device)
                for rule, weight, rule_loss in zip(config.rules, weights, rule_losses, strict=True):
                    totals[rule] += float(rule_loss.detach())
                    loss = loss + weight * rule_loss
                trainer.step(loss)
            seconds = time.perf_counter() - started
            losses = {
                f"loss_{rule}": ranks.sum(total) / ranks.world / config.steps_per_epoch
                for rule, total in totals.items()
            }
            pair_images = 2 * config.batch_size * config.steps_per_epoch * len(config.rules)
            run.log_epoch(
                epoch=epoch,
                **losses,
                momentum=round(momentum, 5),
                seconds=round(seconds, 2),
                images_per_s=round(pair_images / seconds, 1),
            )
            if ranks.is_main:
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
        _finish(run, root, config, model, images, held_out, statistics, ranks)
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
    ranks: Ranks,
) -> None:
    """Save the encoder, per-cell embeddings of every image, and the run's metrics.

    Every rank embeds its share of the images with rank 0's weights and BatchNorm statistics;
    rank 0 gathers them and writes.
    """
    with ranks.main_first():  # the held-out images' pixels are not cached yet
        pixels = load_pixels(images, config.px, root.cache / "pixels")
    ranks.broadcast_buffers(model)
    rows = ranks.shard(torch.arange(len(images)))
    mine = embed_images(model.backbone, pixels, ranks.device, rows=rows)
    embeddings = ranks.gather_rows(rows, mine, len(images))
    if not ranks.is_main:
        return
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
