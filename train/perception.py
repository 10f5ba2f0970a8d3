"""``python -m train perception``: a Place Pulse 2 style perception model, as a ground encoder.

Pairwise votes (``left_id, right_id, winner, category``) train one score per category with a
RankNet loss: P(left wins) = sigmoid(s(left) - s(right)); "equal" is a target of 0.5. The demo
city generates such votes; a user supplies Place Pulse 2's ``votes.csv`` with its images in the
catalog. The trained backbone is saved as "pp2-like" ground weights for the fusion model.

Under ``torchrun --nproc-per-node N`` the ranks share the decoding of the pixel cache, train on
their slices of each global batch of votes (:func:`train.common.train_epoch`) and judge their
shares of the held-out votes, which are gathered; only rank 0 writes the run.
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
from core.distributed import Ranks
from core.features import load_pixels
from core.io import read_table, require_columns
from core.models.backbones import create_backbone, save_backbone
from core.runs import BACKBONE_FILE, RunWriter, run_path
from train.common import (
    OneCycle,
    augment_street,
    predict_shared,
    quiet,
    seed_everything,
    to_input,
    train_epoch,
)

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
    ranks = Ranks(config.device)
    device = ranks.device
    if not ranks.is_main:
        log = quiet
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
    pixels = load_pixels(images, config.px, root.cache / "pixels", ranks=ranks)

    model = ranks.prepare(PerceptionModel(config.backbone, categories, config.seed)).to(
        memory_format=torch.channels_last
    )
    net = ranks.ddp(model)
    trainer = OneCycle(
        model.parameters(), config.lr, 1e-4, config.epochs, len(train_rows), config.batch_size
    )

    def margin(module: nn.Module, rows: torch.Tensor, augment: bool) -> torch.Tensor:
        pair = torch.cat([left[rows], right[rows]])
        x = to_input(pixels, pair, device)
        if augment:
            x = augment_street(x, generator)
        scores = module(x).gather(1, category[rows].repeat(2).to(device)[:, None]).squeeze(1)
        return scores[: len(rows)] - scores[len(rows) :]

    def rank_loss(rows: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(
            margin(net, rows, True), target[rows].to(device), reduction="sum"
        )

    def decided(rows: torch.Tensor) -> torch.Tensor:
        """Whether the model ranks each vote's winner higher."""
        return (margin(model, rows, False).cpu() > 0) == (target[rows] > 0.5)

    resolved = asdict(config) | {"processes": ranks.world}
    with ranks.run_writer(lambda: RunWriter(root.runs, "perception", resolved)) as run:
        run.log(
            f"{len(votes)} votes on {len(images)} images, categories {categories}, "
            f"device {device} x {ranks.world} process(es)"
        )
        for epoch in range(1, config.epochs + 1):
            model.train()
            started = time.perf_counter()
            loss = train_epoch(ranks, trainer, train_rows, config.batch_size, generator, rank_loss)
            accuracy = _pair_accuracy(ranks, model, decided, test, target, category, categories)
            run.log_epoch(
                epoch=epoch,
                train_loss=loss,
                val_accuracy=accuracy["all"],
                seconds=round(time.perf_counter() - started, 2),
            )
            run.progress(epoch=epoch, epochs=config.epochs, loss=loss, val_accuracy=accuracy["all"])
            log(
                f"perception epoch {epoch}: loss {loss:.3f}, held-out accuracy {accuracy['all']:.3f}"
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
        if ranks.is_main:
            save_backbone(
                model.backbone,
                run.path / BACKBONE_FILE,
                trained_on="pairwise perception votes",
                px=str(config.px),
            )
    weights = run_path(root.runs, run.run_id) / BACKBONE_FILE
    log(f"perception run {run.run_id}: ground weights at {weights}")
    return run.run_id


def _pair_accuracy(
    ranks: Ranks,
    model: nn.Module,
    decided,
    test: torch.Tensor,
    target: torch.Tensor,
    category: torch.Tensor,
    categories: tuple[str, ...],
) -> dict[str, float]:
    """Share of decided held-out votes whose winner the model ranks higher, overall and per category."""
    rows = torch.nonzero(test & (target != 0.5)).squeeze(1)
    correct = torch.from_numpy(
        predict_shared(ranks, model, lambda i: decided(rows[i]), len(rows), 1024) > 0.5
    )
    result = {"all": float(correct.float().mean())}
    for i, name in enumerate(categories):
        mine = category[rows] == i
        result[name] = float(correct[mine].float().mean())
    return result
