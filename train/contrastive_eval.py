"""``python -m train contrastive-eval`` and ``contrastive-matrix``: the downstream tables.

Every encoder (a contrastive run, or a baseline: random initialisation, a weights file such as
ImageNet's, or another run's backbone) embeds the same images, and the same three evaluations
of :mod:`core.downstream` run on the embeddings:

- place recognition on the held-out blocks of the contrastive runs (never trained on): the
  first capture year is the database, the last the queries, positives within 25 m;
- socioeconomic R² per target of ``socioeconomic/buurt_targets.csv`` (by ``cbsCode``);
- perception accuracy and AUC of a linear probe on ``perception/votes.csv`` (at most 4,000
  decided votes per category, drawn with a fixed seed), mean over categories (per category in
  the CSV).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from core.configs import ContrastiveConfig
from core.dataroot import DataRoot
from core.downstream import perception_probe, recall_at_k, region_means, socioeconomic_r2
from core.features import load_pixels
from core.grid import read_grid
from core.io import read_table, require_columns, write_atomic
from core.models.backbones import create_backbone, encoder_of_run
from core.models.device import resolve_device
from core.runs import load_run, run_path
from train.contrastive import (
    embed_images,
    holdout_cells,
    source_images,
    train_contrastive,
)

SOCIOECONOMIC_ID = "cbsCode"
TASK_COLUMNS = (
    "recall@1",
    "recall@5",
    "recall@10",
    "socioeconomic_r2",
    "perception_accuracy",
    "perception_auc",
)


class Evaluation:
    """The images, split and targets every encoder is evaluated on, loaded once."""

    def __init__(
        self,
        root: DataRoot,
        config: ContrastiveConfig,
        radius_m: float = 25.0,
        max_votes: int | None = 4000,
    ) -> None:
        self.root, self.config, self.radius_m = root, config, radius_m
        self.images = source_images(root, config.source)
        self.pixels = load_pixels(self.images, config.px, root.cache / "pixels")
        held_out = holdout_cells(root, config.holdout_share, config.block_size, config.split_seed)
        years = self.images["captured_at"].dt.year
        self.in_holdout = self.images["cell_id"].isin(held_out).to_numpy()
        self.database = self.in_holdout & (years == years[self.in_holdout].min()).to_numpy()
        self.queries = self.in_holdout & (years == years[self.in_holdout].max()).to_numpy()
        grid = read_grid(root.grid).set_index("cell_id")
        self.regions = grid["cbs_code"].reindex(self.images["cell_id"]).fillna("").to_numpy()
        targets = read_table(root.socioeconomic, "socioeconomic targets")
        require_columns(targets, (SOCIOECONOMIC_ID,), root.socioeconomic)
        self.targets = targets.set_index(SOCIOECONOMIC_ID).select_dtypes("number")
        votes = read_table(root.votes, "perception votes")
        require_columns(votes, ("left_id", "right_id", "winner", "category"), root.votes)
        row = pd.Series(np.arange(len(self.images)), index=self.images["id"])
        votes = votes[
            votes["winner"].isin(["left", "right"])
            & votes["left_id"].isin(row.index)
            & votes["right_id"].isin(row.index)
        ]
        if max_votes is not None:  # a linear probe settles long before Place Pulse's 1.2M votes
            shuffled = votes.sample(frac=1.0, random_state=0)
            votes = shuffled[shuffled.groupby("category").cumcount() < max_votes]
        self.votes = votes.assign(
            left=row[votes["left_id"]].to_numpy(), right=row[votes["right_id"]].to_numpy()
        )

    def embed(self, backbone: str, weights: str | None, seed: int = 0) -> np.ndarray:
        """Embeddings of every image by one encoder (``weights`` None: random initialisation)."""
        model = create_backbone(backbone, weights=weights, seed=seed)
        return embed_images(model, self.pixels, resolve_device(self.config.device))

    def scores(self, embeddings: np.ndarray) -> dict[str, float]:
        """The three tasks on one encoder's image embeddings."""
        xy = self.images[["x", "y"]].to_numpy()
        result = recall_at_k(
            embeddings[self.database],
            xy[self.database],
            embeddings[self.queries],
            xy[self.queries],
            radius_m=self.radius_m,
        )
        known = self.regions != ""
        r2 = socioeconomic_r2(region_means(embeddings[known], self.regions[known]), self.targets)
        result |= {f"r2_{k}": v for k, v in r2.items()}
        result["socioeconomic_r2"] = float(np.nanmean(list(r2.values())))
        per_category = {}
        for category, votes in self.votes.groupby("category"):
            per_category[category] = perception_probe(
                embeddings[votes["left"]],
                embeddings[votes["right"]],
                (votes["winner"] == "left").to_numpy(),
            )
        for name, probe in per_category.items():
            result[f"accuracy_{name}"] = probe["accuracy"]
        result["perception_accuracy"] = float(
            np.mean([p["accuracy"] for p in per_category.values()])
        )
        result["perception_auc"] = float(np.mean([p["auc"] for p in per_category.values()]))
        return result


def evaluate(
    root: DataRoot,
    run_ids: list[str],
    baselines: dict[str, str | None],
    log: Callable[[str], None] = print,
    device: str = "auto",
) -> pd.DataFrame:
    """One row per encoder: the contrastive runs (objective, seed) and the baselines.

    The images, held-out blocks and input size follow the first run's config, so every encoder
    is evaluated on the same data. A baseline is a weights file, or None for a random encoder of
    the runs' backbone.
    """
    if not run_ids:
        raise ValueError("contrastive evaluation needs at least one contrastive run")
    first = load_run(run_path(root.runs, run_ids[0]))
    config = ContrastiveConfig.from_dict(
        {**first.config, "data": str(root.root), "device": device, "resume": None}
    )
    evaluation = Evaluation(root, config)
    rows = []
    for run_id in run_ids:
        run = load_run(run_path(root.runs, run_id))
        backbone, weights = encoder_of_run(run)
        rows.append(
            {
                "encoder": run.config["objective"],
                "seed": run.config["seed"],
                "run_id": run_id,
                **evaluation.scores(evaluation.embed(backbone, weights)),
            }
        )
        log(f"{run_id} ({run.config['objective']}): " + _summary(rows[-1]))
    for name, weights in baselines.items():
        rows.append(
            {
                "encoder": name,
                "seed": None,
                "run_id": None,
                **evaluation.scores(evaluation.embed(config.backbone, weights)),
            }
        )
        log(f"baseline {name}: " + _summary(rows[-1]))
    return pd.DataFrame(rows)


def _summary(row: dict) -> str:
    return ", ".join(f"{k} {row[k]:.3f}" for k in TASK_COLUMNS)


def write_report(results: pd.DataFrame, out: Path, title: str) -> tuple[Path, Path]:
    """``contrastive_eval.csv`` (every encoder) and ``contrastive_eval.md`` (mean ± std per encoder)."""
    csv = write_atomic(out / "contrastive_eval.csv", lambda tmp: results.to_csv(tmp, index=False))
    grouped = results.groupby("encoder", sort=False)
    lines = [
        f"# {title}",
        "",
        "Mean ± std over seeds (n = number of runs); baselines have one row.",
        "",
        "| encoder | n | " + " | ".join(TASK_COLUMNS) + " |",
        "|---" * (len(TASK_COLUMNS) + 2) + "|",
    ]
    for name, rows in grouped:
        cells = []
        for column in TASK_COLUMNS:
            values = rows[column].astype(float)
            spread = f" ± {values.std():.3f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.3f}{spread}")
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    runs = [r for r in results["run_id"].dropna()]
    lines += ["", "Runs: " + ", ".join(runs)]
    md = write_atomic(
        out / "contrastive_eval.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n")
    )
    return csv, md


def run_matrix(
    base: ContrastiveConfig,
    objectives: list[str],
    seeds: list[int],
    log: Callable[[str], None] = print,
) -> list[str]:
    """Train every objective for every seed (same held-out blocks); returns the run ids."""
    return [
        train_contrastive(replace(base, objective=objective, seed=seed), log=log)
        for seed in seeds
        for objective in objectives
    ]
