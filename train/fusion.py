"""``python -m train fusion``: train and evaluate the cross-modal housing-quality model.

Plain PyTorch, no Lightning: the loop is short, the data fits in memory (aerial patches as one
uint8 array, ground features pooled per cell), and the same code must run on one CPU and on a GPU.

Schedule (the paper's shape): the aerial backbone stays frozen for ``warmup_epochs`` while the
fusion head learns on the ground features and the frozen aerial features, then everything but the
frozen ground branch trains, with a one-cycle learning rate. The epoch with the best validation
Kendall's tau is kept. The target is standardised on the training cells.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.configs import FusionConfig
from core.dataroot import DataRoot
from core.datasets import Imagery, aerial_patches, label_year, labelled_cells, street_images
from core.distributed import Ranks
from core.features import extract_features, pool_by_cell
from core.metrics import grouped_metrics, kendall_tau_b, score_metrics
from core.models.backbones import create_backbone
from core.models.device import bf16_autocast, resolve_device
from core.models.fusion import FusionRegressor, restore
from core.progress import Progress
from core.runs import RunWriter, load_run
from core.scenes import filter_config, scores_path, select
from train.common import (
    OneCycle,
    augment_aerial,
    predict_shared,
    quiet,
    seed_everything,
    to_input,
    train_batch,
    train_epoch,
)

#: Rows per rank a global batch needs to be stepped on: the fusion head's BatchNorm needs two.
MIN_ROWS = 2


def ground_inputs(
    config: FusionConfig,
    root: DataRoot,
    cell_ids: np.ndarray,
    log=print,
    ranks: Ranks | None = None,
    imagery: Imagery | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Frozen ground features (extracted or from the cache) pooled per cell, and image counts.

    With several sources (``--ground amsterdam_panorama,mapillary``) the images of all of them
    are pooled per cell together (docs/DESIGN.md, "Several ground sources"); each source's
    features are extracted into its own cache, the one a single-source run uses. Under a
    process group every rank extracts its share of the missing features into the one cache
    (:func:`core.features.extract_features`). With ``imagery`` only the images captured in its
    window are pooled; the features of all the cells' images are extracted, so that one cache
    serves every year.

    Returns:
        The pooled features ``(cells, dim)`` and the images pooled per cell and source (int
        columns ``config.sources``, rows in ``cell_ids``' order).

    Raises:
        ValueError: naming the source, when the catalog has no usable image of it in these
            cells, or naming the year, when no image of the sources was captured in the window.
    """
    sums, counts = None, {}
    for source in config.sources:
        pooled, count = _source_features(config, root, source, cell_ids, log, ranks, imagery)
        total = pooled.astype(np.float64) * count[:, None]
        sums = total if sums is None else sums + total
        counts[source] = count
    counts = pd.DataFrame(counts)
    if imagery is not None and imagery.captured_years is not None and not counts.to_numpy().any():
        first, last = imagery.captured_years
        raise ValueError(
            f"{root.catalog}: no {'+'.join(config.sources)} street images of {imagery.year} "
            f"(captured {first}..{last}) in these cells"
        )
    pooled = (sums / np.maximum(counts.sum(axis=1).to_numpy(), 1)[:, None]).astype(np.float32)
    return pooled, counts


def _source_features(
    config: FusionConfig,
    root: DataRoot,
    source: str,
    cell_ids: np.ndarray,
    log,
    ranks: Ranks | None,
    imagery: Imagery | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One source's features pooled per cell and its image count per cell
    (:func:`ground_inputs`); the scene filter applies to Flickr."""
    images = street_images(root, source, cell_ids)
    keep = np.ones(len(images), bool)
    if imagery is not None and imagery.captured_years is not None:
        keep = imagery.captured(images["captured_at"])
        if not keep.any() and len(config.sources) == 1:
            first, last = imagery.captured_years
            years = pd.to_datetime(images["captured_at"]).dt.year
            raise ValueError(
                f"{root.catalog}: no {source} street images of {imagery.year} "
                f"(captured {first}..{last}) in these cells; their captures span "
                f"{years.min():.0f}..{years.max():.0f}"
            )
    if source == "flickr" and config.flickr_subset != "all":
        path = scores_path(root, config.scene_run)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no scene scores for scene run {config.scene_run!r}")
        scores = pd.read_parquet(path).set_index("id").reindex(images["id"]).reset_index()
        missing = scores.drop(columns="id").isna().all(axis=1).to_numpy()
        scene_filter = filter_config(root, config.scene_run)
        if config.scene_threshold is not None:
            scene_filter = replace(scene_filter, threshold=config.scene_threshold)
        chosen = select(scores.fillna(0.0), config.flickr_subset, scene_filter)
        keep = keep & ~missing & np.asarray(chosen, bool)
    started = time.perf_counter()
    features = extract_features(
        images,
        config.ground_backbone,
        config.ground_weights,
        root.cache / "features",
        px=config.ground_px,
        device=config.device,
        ranks=ranks,
    )
    log(
        f"ground features: {len(images)} {source} images, {keep.sum()} kept "
        f"({time.perf_counter() - started:.1f} s incl. cache)"
    )
    image_cells = pd.Series(images["cell_id"].to_numpy(), index=images["id"].to_numpy())
    return pool_by_cell(features, image_cells, cell_ids, keep=keep)


@dataclass
class CellInputs:
    """Model inputs of every labelled cell: aerial pixels and/or pooled ground features."""

    aerial: np.ndarray | None
    ground: torch.Tensor | None
    has_ground: torch.Tensor | None

    def batch(
        self, rows: torch.Tensor, device: torch.device, generator: torch.Generator | None = None
    ):
        """``(aerial, ground, has_ground)`` for ``rows``; aerial augmented when a generator is given."""
        x_aerial = None
        if self.aerial is not None:
            x_aerial = to_input(self.aerial, rows, device)
            if generator is not None:
                x_aerial = augment_aerial(x_aerial, generator)
        if self.ground is None:
            return x_aerial, None, None
        return x_aerial, self.ground[rows].to(device), self.has_ground[rows].to(device)


def cell_inputs(
    config: FusionConfig,
    root: DataRoot,
    ids: np.ndarray,
    log=print,
    ranks: Ranks | None = None,
    imagery: Imagery | None = None,
) -> tuple[CellInputs, pd.DataFrame]:
    """The inputs of ``config`` for cells ``ids``, and the ground images pooled per cell and
    source (:func:`ground_inputs`; no columns without a ground branch).

    With ``ranks``: rank 0 cuts and caches the aerial patches before the others read them, and
    the ranks share the extraction of the ground features. With ``imagery``: one year's aerial
    mosaic and street images (default: the root's mosaic and all its street images).
    """
    aerial = None
    if config.aerial:
        raster = imagery.aerial if imagery is not None else None
        with ranks.main_first() if ranks is not None else nullcontext():
            aerial = aerial_patches(root, ids, config.patch_m, config.aerial_px, raster)
    if not config.ground:
        return CellInputs(aerial, None, None), pd.DataFrame(index=range(len(ids)))
    pooled, counts = ground_inputs(config, root, ids, log, ranks, imagery)
    has_ground = torch.from_numpy(counts.sum(axis=1).to_numpy() > 0)
    return CellInputs(aerial, torch.from_numpy(pooled), has_ground), counts


def predict_cells(
    model: FusionRegressor,
    inputs: CellInputs,
    rows: torch.Tensor,
    ranks: Ranks | None,
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Standardised predictions ``(len(rows),)`` and embeddings ``(len(rows), hidden)`` of the
    cells ``rows`` of ``inputs``, in their order (all of them, or the validation cells after
    each epoch).

    Each rank predicts its share (:func:`train.common.predict_shared`); ``ranks`` None is one
    process on ``device``.
    """
    device = ranks.device if ranks is not None else device

    def predict(index: torch.Tensor) -> torch.Tensor:
        with bf16_autocast(device):
            embedding = model.embed(*inputs.batch(rows[index], device)).float()
        # the last layer in float32: bf16 scores would tie cells that Kendall's tau tells apart
        return torch.cat([model.out(embedding), embedding], 1)

    values = predict_shared(ranks, model, predict, len(rows))
    return values[:, 0], np.ascontiguousarray(values[:, 1:])


def squared_error(
    net: nn.Module,
    inputs: CellInputs,
    y: torch.Tensor,
    mine: torch.Tensor,
    device: torch.device,
    generator: torch.Generator,
) -> torch.Tensor:
    """The squared error summed over the rows ``mine`` (the forward in bf16 autocast on a GPU,
    the error in float32): the loss :func:`train.common.train_epoch` steps on."""
    with bf16_autocast(device):
        predicted = net(*inputs.batch(mine, device, generator))
    return nn.functional.mse_loss(predicted.float(), y[mine].to(device), reduction="sum")


def train_step(
    net: nn.Module,
    trainer: OneCycle,
    inputs: CellInputs,
    y: torch.Tensor,
    rows: torch.Tensor,
    ranks: Ranks,
    generator: torch.Generator,
) -> float | None:
    """One optimisation step of ``train_fusion``'s epoch loop on the global batch ``rows``.

    :func:`train.common.train_batch` with :func:`squared_error`: each rank runs its slice and
    DDP's averaging gives the global batch's mean gradient. Returns this rank's summed squared
    error, or None for a batch too small to step on (BatchNorm needs two samples per rank).
    """

    def loss_sum(mine: torch.Tensor) -> torch.Tensor:
        return squared_error(net, inputs, y, mine, ranks.device, generator)

    return train_batch(ranks, trainer, rows, loss_sum, min_rows=MIN_ROWS)


def train_fusion(config: FusionConfig, log=print, progress: Progress | None = None) -> str:
    """Train one configuration and write its run folder; returns the run id.

    Args:
        config: the run's configuration.
        log: takes each progress line.
        progress: called with ``epoch`` 0 and the run id as soon as the run folder exists, then
            after every epoch with the epoch, loss and validation tau (see
            :meth:`core.runs.RunWriter.progress`); an exception it raises fails the run.
    """
    root = DataRoot(Path(config.data))
    ranks = Ranks(config.device)
    device = ranks.device
    if not ranks.is_main:
        log = quiet
    cells = labelled_cells(
        root,
        config.year,
        config.target,
        config.block_size,
        config.seed if config.split_seed is None else config.split_seed,
    )
    ids = cells["cell_id"].to_numpy()
    year = label_year(root, config.year)
    imagery = Imagery.for_training(root, year, config.window_years)
    inputs, source_counts = cell_inputs(config, root, ids, log, ranks, imagery)
    image_counts = source_counts.sum(axis=1).to_numpy(np.int64)
    generator = seed_everything(config.seed)

    train_rows = torch.from_numpy(np.flatnonzero(cells["split"].to_numpy() == "train"))
    val_rows = torch.from_numpy(np.flatnonzero(cells["split"].to_numpy() == "val"))
    true = cells["true"].to_numpy(np.float32)
    mean, std = float(true[train_rows].mean()), float(true[train_rows].std())
    y = torch.from_numpy((true - mean) / std)

    backbone = (
        create_backbone(config.aerial_backbone, weights=config.aerial_weights, seed=config.seed)
        if config.aerial
        else None
    )
    model = ranks.prepare(
        FusionRegressor(backbone, inputs.ground.shape[1] if inputs.ground is not None else None)
    )
    if backbone is not None:
        model.aerial.to(memory_format=torch.channels_last)

    trainer = OneCycle(
        model.parameters(),
        config.lr,
        config.weight_decay,
        config.epochs,
        len(train_rows),
        config.batch_size,
    )
    resolved = asdict(config) | {
        "label": config.label,
        "device_resolved": str(device),
        "processes": ranks.world,
        "target_mean": mean,
        "target_std": std,
        "label_year": year,
        "aerial_raster": str(imagery.aerial) if config.aerial else None,
        "captured_years": (
            list(imagery.captured_years) if config.ground and imagery.captured_years else None
        ),
    }
    with ranks.run_writer(
        lambda: RunWriter(root.runs, "fusion", resolved, progress=progress)
    ) as run:
        run.progress(epoch=0, epochs=config.epochs)  # tells a job its run id before epoch 1
        run.log(
            f"{config.label}: {len(ids)} cells ({len(train_rows)} train, {len(val_rows)} val), "
            f"target {config.target}, device {device} x {ranks.world} process(es)"
        )
        if config.ground:
            per_source = ", ".join(f"{s} {int(n)}" for s, n in source_counts.sum().items())
            run.log(
                f"ground: {int(image_counts.sum())} images ({per_source}), "
                f"{int((image_counts > 0).sum())} cells with images"
            )
        best_tau, best_state, best_epoch = -np.inf, None, 0
        net, net_frozen = None, None

        def loss_sum(mine: torch.Tensor) -> torch.Tensor:
            return squared_error(net, inputs, y, mine, device, generator)

        for epoch in range(1, config.epochs + 1):
            frozen = epoch <= config.warmup_epochs
            if model.aerial is not None:
                model.aerial.requires_grad_(not frozen)
            if frozen != net_frozen:
                net, net_frozen = ranks.ddp(model), frozen
            model.train()
            started = time.perf_counter()
            loss = train_epoch(
                ranks,
                trainer,
                train_rows,
                config.batch_size,
                generator,
                loss_sum,
                min_rows=MIN_ROWS,
            )
            predicted = predict_cells(model, inputs, val_rows, ranks)[0] * std + mean
            val_tau = kendall_tau_b(predicted, true[val_rows.numpy()])
            seconds = round(time.perf_counter() - started, 2)
            run.log_epoch(
                epoch=epoch,
                train_loss=loss,
                val_kendall_tau=val_tau,
                aerial_frozen=frozen,
                seconds=seconds,
            )
            run.progress(
                epoch=epoch,
                epochs=config.epochs,
                loss=loss,
                val_kendall_tau=val_tau,
            )
            log(
                f"{config.label} epoch {epoch}/{config.epochs}: loss {loss:.4f}, "
                f"val tau {val_tau:.3f} ({seconds} s)"
            )
            if best_state is None or (
                not np.isnan(val_tau) and (np.isnan(best_tau) or val_tau > best_tau)
            ):
                best_tau, best_epoch = val_tau, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_state)
        predicted, embeddings = predict_cells(model, inputs, torch.arange(len(ids)), ranks)
        predicted = predicted * std + mean
        result = cells.assign(
            predicted=predicted, residual=predicted - true, ground_images=image_counts
        )
        metrics = {
            "best_epoch": best_epoch,
            "label": config.label,
            "ground_images": {s: int(n) for s, n in source_counts.sum().items()},
        }
        for split in ("train", "val", "test"):
            part = result[result["split"] == split]
            metrics.update(
                {
                    f"{split}_{k}": v
                    for k, v in score_metrics(part["predicted"], part["true"]).items()
                }
            )
        test = result[result["split"] == "test"]
        metrics["test_per_district"] = (
            grouped_metrics(test, "district").reset_index().to_dict(orient="records")
        )
        run.write_metrics(metrics)
        run.write_predictions(result)
        run.write_embeddings(ids, embeddings)
        run.save_model(
            {k: v.cpu() for k, v in model.state_dict().items()},
            {"kind": "fusion", "label": config.label},
        )
        run.log(f"test kendall tau {metrics['test_kendall_tau']:.3f} (best epoch {best_epoch})")
    log(f"{config.label}: run {run.run_id}, test tau {metrics['test_kendall_tau']:.3f}")
    return run.run_id


def predict_run(run_dir: str | Path, device: str = "cpu") -> pd.DataFrame:
    """Re-predict a run's cells from its saved weights and the data root (``cell_id, predicted``)."""
    run = load_run(run_dir)
    model, config = restore(run, device)
    ids = run.predictions()["cell_id"].to_numpy()
    inputs, _ = cell_inputs(config, DataRoot(Path(config.data)), ids, log=lambda _: None)
    standardised, _ = predict_cells(
        model, inputs, torch.arange(len(ids)), None, resolve_device(device)
    )
    return pd.DataFrame(
        {
            "cell_id": ids,
            "predicted": standardised * run.config["target_std"] + run.config["target_mean"],
        }
    )
