"""``python -m train scene-filter``: the Places365-style scene classifier of the demo city.

Trains a classifier on the demo's Flickr scene labels (half of the photos, chosen by a hash of
their id; the other half measures accuracy), scores every Flickr photo, caches the scores beside
the catalog and saves the backbone as a ground encoder ("places-like" weights).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.dataroot import DataRoot
from core.datasets import street_images
from core.features import load_pixels, resolve_device
from core.io import write_atomic
from core.models.backbones import save_backbone
from core.models.scene_filter import SceneClassifier, SceneFilterConfig, select
from core.runs import RunWriter
from train.common import augment_street, batches, predict, seed_everything, to_input


@dataclass
class SceneTrainConfig:
    """Scene classifier training on the data root's scene labels."""

    data: str = "data/demo"
    backbone: str = "convnet_small"
    px: int = 32
    epochs: int = 6
    batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0
    device: str = "auto"
    filter: SceneFilterConfig = field(default_factory=SceneFilterConfig)


def _held_out(ids: pd.Series) -> np.ndarray:
    """Half of the photos, fixed by a hash of the id (stable across runs and seeds)."""
    return np.array([hashlib.md5(i.encode()).digest()[0] % 2 == 1 for i in ids])


def scores_path(root: DataRoot, run_id: str) -> Path:
    """Where a scene run's per-photo scores are cached, beside the catalog."""
    return root.catalog.parent / f"scene_scores-{run_id}.parquet"


def train_scene_filter(config: SceneTrainConfig, log=print) -> str:
    """Train, evaluate, score all Flickr photos; returns the run id."""
    root = DataRoot(Path(config.data))
    device = resolve_device(config.device)
    generator = seed_everything(config.seed)
    photos = street_images(root, "flickr")
    if not root.scene_labels.exists():
        raise FileNotFoundError(f"{root.scene_labels}: no scene labels to train the scene filter on")
    labels = pd.read_csv(root.scene_labels).set_index("id")["scene"]
    scenes = tuple(config.filter.scenes)
    unknown = sorted(set(labels) - set(scenes))
    if unknown:
        raise ValueError(f"{root.scene_labels}: scenes {unknown} are not in the configured list {scenes}")
    photos = photos[photos["id"].isin(labels.index)].reset_index(drop=True)
    y = torch.tensor(labels.reindex(photos["id"]).map({s: i for i, s in enumerate(scenes)}).to_numpy())
    pixels = load_pixels(photos, config.px, root.cache / "pixels")
    held_out = _held_out(photos["id"])
    train_index = torch.from_numpy(np.flatnonzero(~held_out))

    model = SceneClassifier(config.backbone, scenes, seed=config.seed).to(device).to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps = config.epochs * ((len(train_index) + config.batch_size - 1) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.lr, total_steps=steps)
    with RunWriter(root.runs, "scene", asdict(config)) as run:
        run.log(f"{len(photos)} labelled photos, {len(train_index)} for training, device {device}")
        for epoch in range(1, config.epochs + 1):
            model.train()
            started, total = time.perf_counter(), 0.0
            for index in batches(len(train_index), config.batch_size, generator):
                rows = train_index[index]
                x = augment_street(to_input(pixels, rows, device), generator)
                loss = nn.functional.cross_entropy(model(x), y[rows].to(device))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                total += loss.item() * len(rows)
            accuracy = _accuracy(model, pixels, y, held_out, device)
            run.log_epoch(epoch=epoch, train_loss=total / len(train_index), val_accuracy=accuracy,
                          seconds=round(time.perf_counter() - started, 2))
            run.progress(epoch=epoch, epochs=config.epochs, loss=total / len(train_index), val_accuracy=accuracy)
            log(f"scene epoch {epoch}: loss {total / len(train_index):.3f}, held-out accuracy {accuracy:.3f}")

        model.eval()
        probabilities = predict(lambda i: model(to_input(pixels, i, device)).softmax(1), len(photos)).numpy()
        scores = pd.DataFrame(probabilities, columns=[f"p_{s}" for s in scenes]).round(4)
        scores.insert(0, "id", photos["id"].to_numpy())
        truth = y.numpy()
        metrics = {"held_out_accuracy": float((probabilities.argmax(1) == truth)[held_out].mean())}
        for subset in ("outdoor", "building"):
            kept = select(scores, subset, config.filter)
            wanted = np.isin(truth, [scenes.index(s) for s in scenes if _in_subset(s, subset, config.filter)])
            metrics[f"{subset}_precision"] = float(wanted[kept & held_out].mean())
            metrics[f"{subset}_recall"] = float(kept[wanted & held_out].mean())
            metrics[f"{subset}_kept_share"] = float(kept.mean())
        run.write_metrics(metrics)
        run.write_predictions(pd.DataFrame({"cell_id": photos["cell_id"].to_numpy(np.int64),
                                            "split": np.where(held_out, "test", "train"),
                                            "true": truth.astype(float),
                                            "predicted": probabilities.argmax(1).astype(float),
                                            "image_id": photos["id"].to_numpy()}))
        run.save_model(model.state_dict(), {"scenes": ",".join(scenes), "backbone": config.backbone})
        save_backbone(model.backbone, run.path / "backbone.safetensors", trained_on="scene labels",
                      px=str(config.px))
        write_atomic(scores_path(root, run.run_id), lambda tmp: scores.to_parquet(tmp, index=False))
        run.log(f"metrics {metrics}")
    log(f"scene filter run {run.run_id}: {metrics}")
    return run.run_id


def _in_subset(scene: str, subset: str, config: SceneFilterConfig) -> bool:
    if subset == "building":
        return scene in config.building_scenes
    return scene not in config.indoor_scenes


@torch.inference_mode()
def _accuracy(model: nn.Module, pixels: np.ndarray, y: torch.Tensor, held_out: np.ndarray,
              device: torch.device) -> float:
    model.eval()
    index = torch.from_numpy(np.flatnonzero(held_out))
    predicted = torch.cat([model(to_input(pixels, index[b], device)).argmax(1).cpu()
                           for b in batches(len(index), 1024)])
    return float((predicted == y[index]).float().mean())
