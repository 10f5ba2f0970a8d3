"""``python -m train scene-filter``: the Places365-style scene filter of the paper.

Two ways to get a scene classifier:

- on the demo city (or any root with ``street/flickr_scene_labels.csv``), train one on half of
  the labelled photos (chosen by a hash of their id; the other half measures accuracy);
- with ``--checkpoint`` (and ``--scene-names``), load a classifier a user has, such as a
  Places365 ResNet-50, and only score.

Either way every Flickr photo is scored, the scores are cached beside the catalog
(``street/scene_scores-<run>.parquet``), and a ``scene`` run records the configuration, the
filter's precision/recall where labels exist, and the backbone as ground weights.

Under ``torchrun --nproc-per-node N`` the ranks share the decoding of the pixel cache, train on
their slices of each global batch (:func:`train.common.train_epoch`) and score their shares of
the photos, which are gathered; only rank 0 writes the run and the scores.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.configs import SceneTrainConfig
from core.dataroot import DataRoot
from core.datasets import street_images
from core.distributed import Ranks
from core.features import load_pixels
from core.io import write_atomic
from core.models.backbones import save_backbone
from core.models.scene_filter import SceneClassifier, load_scene_classifier, read_scene_names
from core.runs import BACKBONE_FILE, RunWriter
from core.scenes import SceneFilterConfig, scores_path, select
from train.common import (
    OneCycle,
    augment_street,
    predict_shared,
    quiet,
    seed_everything,
    to_input,
    train_epoch,
)


def _held_out(ids: pd.Series) -> np.ndarray:
    """Half of the photos, fixed by a hash of the id (stable across runs and seeds)."""
    return np.array([hashlib.md5(i.encode()).digest()[0] % 2 == 1 for i in ids])


def _labels(root: DataRoot, photos: pd.DataFrame, scenes: tuple[str, ...]) -> np.ndarray | None:
    """Scene index per photo (-1 where unlabelled), or None when the root has no labels."""
    if not root.scene_labels.exists():
        return None
    labels = pd.read_csv(root.scene_labels).set_index("id")["scene"]
    unknown = sorted(set(labels) - set(scenes))
    if unknown:
        raise ValueError(
            f"{root.scene_labels}: scenes {unknown} are not among the classifier's scenes"
        )
    index = labels.reindex(photos["id"]).map({s: i for i, s in enumerate(scenes)})
    return index.fillna(-1).to_numpy(np.int64)


def train_scene_filter(config: SceneTrainConfig, log=print) -> str:
    """Train (or load), score all Flickr photos, record the filter's quality; returns the run id."""
    root = DataRoot(Path(config.data))
    ranks = Ranks(config.device)
    device = ranks.device
    if not ranks.is_main:
        log = quiet
    generator = seed_everything(config.seed)
    photos = street_images(root, "flickr")
    if config.checkpoint:
        scenes = (
            read_scene_names(config.scene_names)
            if config.scene_names
            else tuple(config.filter.scenes)
        )
        model = load_scene_classifier(config.checkpoint, config.backbone, scenes)
    else:
        scenes = tuple(config.filter.scenes)
        model = SceneClassifier(config.backbone, scenes, seed=config.seed)
    config = replace(config, filter=replace(config.filter, scenes=scenes))  # recorded with the run
    truth = _labels(root, photos, scenes)
    if truth is None and not config.checkpoint:
        raise FileNotFoundError(
            f"{root.scene_labels}: no scene labels to train on; pass --checkpoint instead"
        )
    model = ranks.prepare(model).to(memory_format=torch.channels_last)
    pixels = load_pixels(photos, config.px, root.cache / "pixels", ranks=ranks)
    held_out = _held_out(photos["id"]) if not config.checkpoint else np.ones(len(photos), bool)

    resolved = asdict(config) | {"processes": ranks.world}
    with ranks.run_writer(lambda: RunWriter(root.runs, "scene", resolved)) as run:
        if not config.checkpoint:
            _fit(
                model,
                pixels,
                torch.tensor(truth),
                held_out & (truth >= 0),
                ~held_out & (truth >= 0),
                config,
                generator,
                ranks,
                run,
                log,
            )
        probabilities = predict_shared(
            ranks, model, lambda i: model(to_input(pixels, i, device)).softmax(1), len(photos)
        )
        scores = pd.DataFrame(probabilities, columns=[f"p_{s}" for s in scenes]).round(4)
        scores.insert(0, "id", photos["id"].to_numpy())
        metrics = {"photos": len(photos)}
        if truth is not None:
            metrics |= _filter_quality(
                scores, probabilities, truth, held_out & (truth >= 0), scenes, config.filter
            )
        run.write_metrics(metrics)
        run.write_predictions(
            pd.DataFrame(
                {
                    "cell_id": photos["cell_id"].to_numpy(np.int64),
                    "split": np.where(held_out, "test", "train"),
                    "true": truth.astype(float) if truth is not None else np.nan,
                    "predicted": probabilities.argmax(1).astype(float),
                    "image_id": photos["id"].to_numpy(),
                }
            )
        )
        run.save_model(
            model.state_dict(), {"scenes": ",".join(scenes), "backbone": config.backbone}
        )
        if ranks.is_main:
            save_backbone(
                model.backbone,
                run.path / BACKBONE_FILE,
                trained_on="scene classification",
                px=str(config.px),
            )
            write_atomic(
                scores_path(root, run.run_id), lambda tmp: scores.to_parquet(tmp, index=False)
            )
        run.log(f"metrics {metrics}")
    log(f"scene filter run {run.run_id}: {metrics}")
    return run.run_id


def _fit(
    model: SceneClassifier,
    pixels: np.ndarray,
    truth: torch.Tensor,
    evaluate: np.ndarray,
    train: np.ndarray,
    config: SceneTrainConfig,
    generator: torch.Generator,
    ranks: Ranks,
    run: RunWriter,
    log,
) -> None:
    device = ranks.device
    train_index = torch.from_numpy(np.flatnonzero(train))
    held_out = torch.from_numpy(np.flatnonzero(evaluate))
    trainer = OneCycle(
        model.parameters(), config.lr, 1e-4, config.epochs, len(train_index), config.batch_size
    )
    run.log(
        f"{int(train.sum())} labelled photos for training, {int(evaluate.sum())} held out, "
        f"device {device} x {ranks.world} process(es)"
    )
    net = ranks.ddp(model)

    def cross_entropy(rows: torch.Tensor) -> torch.Tensor:
        x = augment_street(to_input(pixels, rows, device), generator)
        return nn.functional.cross_entropy(net(x), truth[rows].to(device), reduction="sum")

    for epoch in range(1, config.epochs + 1):
        model.train()
        started = time.perf_counter()
        loss = train_epoch(ranks, trainer, train_index, config.batch_size, generator, cross_entropy)
        predicted = predict_shared(
            ranks,
            model,
            lambda i: model(to_input(pixels, held_out[i], device)).argmax(1),
            len(held_out),
        )
        accuracy = float((predicted == truth[held_out].numpy()).mean())
        run.log_epoch(
            epoch=epoch,
            train_loss=loss,
            val_accuracy=accuracy,
            seconds=round(time.perf_counter() - started, 2),
        )
        run.progress(epoch=epoch, epochs=config.epochs, loss=loss, val_accuracy=accuracy)
        log(f"scene epoch {epoch}: loss {loss:.3f}, held-out accuracy {accuracy:.3f}")


def _filter_quality(
    scores: pd.DataFrame,
    probabilities: np.ndarray,
    truth: np.ndarray,
    evaluate: np.ndarray,
    scenes: tuple[str, ...],
    config: SceneFilterConfig,
) -> dict[str, float]:
    """Accuracy, and precision/recall of the outdoor and building subsets on the evaluated photos."""
    metrics = {"held_out_accuracy": float((probabilities.argmax(1) == truth)[evaluate].mean())}
    wanted_scenes = {
        "building": set(config.building_scenes),
        "outdoor": set(scenes) - set(config.indoor_scenes),
    }
    for subset, wanted_names in wanted_scenes.items():
        kept = select(scores, subset, config)
        wanted = np.isin(truth, [scenes.index(s) for s in wanted_names if s in scenes])
        metrics[f"{subset}_precision"] = _share(wanted[kept & evaluate])
        metrics[f"{subset}_recall"] = _share(kept[wanted & evaluate])
        metrics[f"{subset}_kept_share"] = float(kept.mean())
    return metrics


def _share(flags: np.ndarray) -> float:
    """Share of True, NaN when there is nothing to count (a tiny held-out set)."""
    return float(flags.mean()) if len(flags) else float("nan")
