"""``python -m train perception``: a Place Pulse 2 style perception model, as a ground encoder.

Pairwise votes (``left_id, right_id, winner, category``) train one score per category with a
RankNet loss: P(left wins) = sigmoid(s(left) - s(right)); "equal" is a target of 0.5. The demo
city generates such votes; a user supplies Place Pulse 2's ``votes.csv`` with its images in the
catalog. The trained backbone is saved as "pp2-like" ground weights for the fusion model.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.configs import PerceptionConfig
from core.dataroot import DataRoot
from core.datasets import street_images
from core.features import load_pixels
from core.io import read_table, require_columns
from core.models.backbones import create_backbone, save_backbone
from core.models.device import resolve_device
from core.runs import BACKBONE_FILE, RunWriter
from train.common import OneCycle, augment_street, batches, seed_everything, to_input

WINNER_TARGET = {"left": 1.0, "right": 0.0, "equal": 0.5}


def read_votes(path: Path, image_ids: pd.Index) -> pd.DataFrame:
    """Votes whose two images are in the catalog; unknown winners are an error naming the file."""
    votes = read_table(path, "perception votes")
    require_columns(votes, ("left_id", "right_id", "winner", "category"), path)
    bad = sorted(set(votes["winner"]) - set(WINNER_TARGET))
    if bad:
        raise ValueError(f"{path}: winner must be one of {sorted(WINNER_TARGET)}, found {bad}")
    known = votes["left_id"].isin(image_ids) & votes["right_id"].isin(image_ids)
    if not known.any():
        raise ValueError(f"{path}: no vote refers to two images of the catalog")
    return votes[known].reset_index(drop=True)


class PerceptionModel(nn.Module):
    """Backbone + one linear score per category."""

    def __init__(self, backbone: str, categories: tuple[str, ...], seed: int = 0):
        super().__init__()
        self.categories = categories
        self.backbone = create_backbone(backbone, seed=seed)
        self.head = nn.Linear(self.backbone.num_features, len(categories))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def train_perception(config: PerceptionConfig, log=print) -> str:
    """Train on votes, report held-out pair accuracy per category; returns the run id."""
    root = DataRoot(Path(config.data))
    device = resolve_device(config.device)
    generator = seed_everything(config.seed)
    images = street_images(root, "gsv")
    votes = read_votes(root.votes, pd.Index(images["id"]))
    used = pd.unique(pd.concat([votes["left_id"], votes["right_id"]]))
    images = images[images["id"].isin(used)].reset_index(drop=True)
    row = pd.Series(np.arange(len(images)), index=images["id"])
    left = torch.tensor(row[votes["left_id"]].to_numpy())
    right = torch.tensor(row[votes["right_id"]].to_numpy())
    categories = tuple(sorted(votes["category"].unique()))
    category = torch.tensor(
        votes["category"].map({c: i for i, c in enumerate(categories)}).to_numpy()
    )
    target = torch.tensor(votes["winner"].map(WINNER_TARGET).to_numpy(), dtype=torch.float32)
    test = torch.from_numpy(
        np.random.default_rng(config.seed).random(len(votes)) < config.test_share
    )
    train_rows = torch.nonzero(~test).squeeze(1)
    pixels = load_pixels(images, config.px, root.cache / "pixels")

    model = (
        PerceptionModel(config.backbone, categories, config.seed)
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    trainer = OneCycle(
        model.parameters(), config.lr, 1e-4, config.epochs, len(train_rows), config.batch_size
    )

    def margin(rows: torch.Tensor, augment: bool) -> torch.Tensor:
        pair = torch.cat([left[rows], right[rows]])
        x = to_input(pixels, pair, device)
        if augment:
            x = augment_street(x, generator)
        scores = model(x).gather(1, category[rows].repeat(2).to(device)[:, None]).squeeze(1)
        return scores[: len(rows)] - scores[len(rows) :]

    with RunWriter(root.runs, "perception", asdict(config)) as run:
        run.log(
            f"{len(votes)} votes on {len(images)} images, categories {categories}, device {device}"
        )
        for epoch in range(1, config.epochs + 1):
            model.train()
            started, total = time.perf_counter(), 0.0
            for index in batches(len(train_rows), config.batch_size, generator):
                rows = train_rows[index]
                loss = nn.functional.binary_cross_entropy_with_logits(
                    margin(rows, True), target[rows].to(device)
                )
                total += trainer.step(loss) * len(rows)
            accuracy = _pair_accuracy(model, margin, test, target, category, categories)
            run.log_epoch(
                epoch=epoch,
                train_loss=total / len(train_rows),
                val_accuracy=accuracy["all"],
                seconds=round(time.perf_counter() - started, 2),
            )
            run.progress(
                epoch=epoch,
                epochs=config.epochs,
                loss=total / len(train_rows),
                val_accuracy=accuracy["all"],
            )
            log(
                f"perception epoch {epoch}: loss {total / len(train_rows):.3f}, held-out accuracy {accuracy['all']:.3f}"
            )
        run.write_metrics({f"pair_accuracy_{k}": v for k, v in accuracy.items()})
        run.write_predictions(
            pd.DataFrame(
                {
                    "cell_id": images["cell_id"].to_numpy(np.int64),
                    "split": "all",
                    "true": np.nan,
                    "predicted": np.nan,
                    "image_id": images["id"],
                }
            )
        )
        run.save_model(
            model.state_dict(), {"categories": ",".join(categories), "backbone": config.backbone}
        )
        save_backbone(
            model.backbone,
            run.path / BACKBONE_FILE,
            trained_on="pairwise perception votes",
            px=str(config.px),
        )
    return run.run_id


@torch.inference_mode()
def _pair_accuracy(
    model: nn.Module,
    margin,
    test: torch.Tensor,
    target: torch.Tensor,
    category: torch.Tensor,
    categories: tuple[str, ...],
) -> dict[str, float]:
    """Share of decided held-out votes whose winner the model ranks higher, overall and per category."""
    model.eval()
    rows = torch.nonzero(test & (target != 0.5)).squeeze(1)
    correct = torch.cat(
        [
            (margin(rows[b], False).cpu() > 0) == (target[rows[b]] > 0.5)
            for b in batches(len(rows), 1024)
        ]
    )
    result = {"all": float(correct.float().mean())}
    for i, name in enumerate(categories):
        mine = category[rows] == i
        result[name] = float(correct[mine].float().mean())
    return result
