"""``python -m train predict``: apply fusion runs to every cell of a data root for one year.

One run, or an ensemble of runs (the seeds of one configuration), predicts every cell of the
data root's grid, labelled or not, from that year's aerial mosaic and the street images captured
within a window around it; the root may be another one than the runs were trained on. The
per-cell uncertainty is the standard deviation of the members' predictions; its calibration is
measured on the training root's held-out test cells (docs/DESIGN.md, "Predictions").

The prediction is a run folder of kind ``prediction`` (:class:`core.runs.RunWriter`), so
``list_runs``, ``stadsbeeld runs`` and the dashboard's runs page see it. Everything that can be
wrong with the request (the runs, the year's imagery) is found before the folder is created.

Under ``torchrun`` (a worker with ``worker_processes`` above 1) the ranks share the work as the
trainers' evaluation does (:mod:`core.distributed`): each extracts its share of the missing
street-image features and predicts its share of the cells, the shares are gathered, and only
rank 0 writes the one prediction folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import torch

from core.configs import FusionConfig, PredictConfig
from core.dataroot import DataRoot
from core.datasets import Imagery, label_year
from core.distributed import Ranks
from core.grid import read_grid
from core.metrics import score_metrics
from core.models.fusion import FusionRegressor, restore
from core.runs import Run, RunWriter, load_run, parse_run_id, run_path
from core.sources.lbm import read_lbm, target
from train.common import quiet
from train.fusion import cell_inputs, predict_cells

PREDICTION_KIND = "prediction"
#: What every member of an ensemble must share: the training data, label year and target (what
#: the score means) and the inputs (so they are computed once, and mean the same to each).
SHARED_KEYS = (
    "data",
    "year",
    "target",
    "aerial",
    "patch_m",
    "aerial_px",
    "ground",
    "flickr_subset",
    "scene_run",
    "scene_threshold",
    "ground_backbone",
    "ground_weights",
    "ground_px",
)
#: The central intervals whose coverage of the true scores calibration reports.
INTERVALS = (0.5, 0.9)
#: The split of a cell no member saw a label of, and of one the members split differently.
UNSEEN, MIXED = "none", "mixed"


@dataclass
class Member:
    """One run of the ensemble: its folder, its model and its training config."""

    run: Run
    model: FusionRegressor
    config: FusionConfig

    def unstandardise(self, standardised: np.ndarray) -> np.ndarray:
        """Scores on the target's scale from the model's standardised output."""
        return standardised * self.run.config["target_std"] + self.run.config["target_mean"]


def member_folder(runs_root: Path, value: str) -> Path:
    """The folder of ``--run`` ``value``: a run folder as given, else a run id in ``runs_root``.

    Raises:
        FileNotFoundError: if it is neither.
    """
    given = Path(value)
    if (given / "config.yaml").is_file():
        return given
    try:
        folder = run_path(runs_root, value)
    except ValueError:
        raise FileNotFoundError(
            f"{value}: neither a run folder nor a run id (<kind>-<yyyymmdd-hhmmss>-<4 hex>)"
        ) from None
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: no run {value} in {runs_root}; give a run of another root as its folder"
        )
    return folder


def load_members(runs_root: Path, values: list[str], device: str) -> list[Member]:
    """The fusion runs ``values`` with their models, checked to form one ensemble.

    Raises:
        FileNotFoundError: for a run that is not there or has no model.
        ValueError: for a run that is not a fusion run, one listed twice, or members that do
            not share :data:`SHARED_KEYS` (naming the first difference).
    """
    members = []
    for value in values:
        run = load_run(member_folder(runs_root, value))
        kind = parse_run_id(run.run_id)[0]
        if kind != "fusion":
            raise ValueError(f"{run.path}: a {kind} run; predict applies fusion runs")
        model, config = restore(run, device)
        members.append(Member(run, model, config))
    ids = [m.run.run_id for m in members]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise ValueError(f"--run lists {twice} more than once; an ensemble's members differ")
    first = asdict(members[0].config)
    for member in members[1:]:
        other = asdict(member.config)
        differ = [k for k in SHARED_KEYS if other[k] != first[k]]
        if differ:
            key = differ[0]
            raise ValueError(
                f"runs {members[0].run.run_id} and {member.run.run_id} differ in {differ}: "
                f"{key} {first[key]!r} vs {other[key]!r}; an ensemble's members share "
                "their data, year, target and inputs"
            )
    return members


def ensemble_predict(
    members: list[Member],
    root: DataRoot,
    ids: np.ndarray,
    imagery: Imagery,
    log=print,
    ranks: Ranks | None = None,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Every member's scores ``(members, cells)`` and the ground images pooled per cell and
    source (:func:`train.fusion.ground_inputs`).

    The inputs are computed once (the members share them) and each model predicts them. With
    ``ranks`` each rank extracts and predicts its share, and every rank gets all the scores.
    """
    inputs, counts = cell_inputs(members[0].config, root, ids, log, ranks, imagery)
    device = next(members[0].model.parameters()).device
    scores = []
    for member in members:
        standardised, _ = predict_cells(member.model, inputs, torch.arange(len(ids)), ranks, device)
        scores.append(member.unstandardise(standardised.astype(np.float64)))
    return np.stack(scores), counts


#: Image-count columns every prediction has (0 where the runs read no such images).
IMAGE_COUNT_SOURCES = ("gsv", "flickr")


def image_columns(counts: pd.DataFrame, n: int) -> dict[str, np.ndarray]:
    """``<source>_images`` per cell: for :data:`IMAGE_COUNT_SOURCES` (zeros unless pooled)
    and for every source the runs pool (``counts``' columns)."""
    sources = [*IMAGE_COUNT_SOURCES, *(s for s in counts.columns if s not in IMAGE_COUNT_SOURCES)]
    return {
        f"{s}_images": counts[s].to_numpy(np.int64) if s in counts else np.zeros(n, np.int64)
        for s in sources
    }


def spread(scores: np.ndarray) -> np.ndarray:
    """The members' standard deviation per cell (``ddof=1``): NaN with one member."""
    if len(scores) < 2:
        return np.full(scores.shape[1], np.nan)
    return scores.std(axis=0, ddof=1)


def coverage(mean: np.ndarray, std: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Share of ``true`` inside the central Gaussian intervals of :data:`INTERVALS`.

    Returns:
        ``coverage_50``, ``coverage_90``, ...: NaN without cells or without a spread.
    """
    result = {}
    for level in INTERVALS:
        z = NormalDist().inv_cdf(0.5 + level / 2)
        inside = np.abs(true - mean) <= z * std
        share = float(inside.mean()) if len(true) and np.isfinite(std).all() else float("nan")
        result[f"coverage_{round(level * 100)}"] = share
    return result


def member_splits(members: list[Member]) -> pd.Series:
    """Each labelled cell's split: the members' common one, or :data:`MIXED`."""
    splits = pd.concat([m.run.predictions().set_index("cell_id")["split"] for m in members], axis=1)
    agreed = splits.nunique(axis=1, dropna=False) == 1
    return splits.iloc[:, 0].where(agreed, MIXED)


def year_labels(root: DataRoot, year: int, column: str) -> pd.Series:
    """The root's ``column`` scores of ``year`` by cell id (empty without labels of it)."""
    if not root.scores.is_file():
        return pd.Series(dtype=float)
    labels = read_lbm(root.scores, root.lbm_grid)
    return target(labels[labels["jaar"] == year], column).astype(float)


def predict(config: PredictConfig, log=print) -> str:
    """Predict every grid cell of ``config.data`` for one year; returns the prediction's run id.

    Raises:
        FileNotFoundError: for a missing run or root, or a year without an aerial mosaic
            (naming the year), before anything is written.
        ValueError: for runs that do not form one ensemble, or a year without street images
            where the runs read them (naming the year), before anything is written.
    """
    root = DataRoot(Path(config.data))
    if not root.grid.is_file():
        raise FileNotFoundError(f"{root.grid}: no grid; {root.root} is not a data root")
    ranks = Ranks(config.device)  # one process: world 1, and nothing below is shared
    device = ranks.device
    if not ranks.is_main:
        log = quiet  # rank 0 speaks for the prediction
    members = load_members(root.runs, config.run, str(device))
    fusion = members[0].config
    train_root = DataRoot(Path(fusion.data))
    learnt = label_year(train_root, fusion.year)
    year = learnt if config.year is None else config.year
    imagery = Imagery.of(root, year, config.window_years)
    ids = read_grid(root.grid)["cell_id"].to_numpy(np.int64)
    log(f"predicting {len(ids)} cells of {root.root} for {year} with {len(members)} run(s)")
    scores, counts = ensemble_predict(members, root, ids, imagery, log, ranks)
    mean, std = scores.mean(axis=0), spread(scores)

    splits = member_splits(members)
    test = splits.index[splits == "test"].to_numpy(np.int64)
    same = root.root.resolve() == train_root.root.resolve() and year == learnt
    if same:
        test = test[np.isin(test, ids)]
        rows = pd.Series(np.arange(len(ids)), index=ids).reindex(test).to_numpy()
        test_mean, test_std = mean[rows], std[rows]
    elif len(test):
        test_scores, _ = ensemble_predict(
            members,
            train_root,
            test,
            Imagery.of(train_root, learnt, config.window_years),
            log,
            ranks,
        )
        test_mean, test_std = test_scores.mean(axis=0), spread(test_scores)
    else:
        test_mean = test_std = np.zeros(0)
    truth = members[0].run.predictions().set_index("cell_id")["true"]
    test_true = truth.reindex(test).to_numpy(np.float64)

    predictions = pd.DataFrame(
        {
            "cell_id": ids,
            "split": splits.reindex(ids).fillna(UNSEEN).to_numpy(),
            "true": year_labels(root, year, fusion.target).reindex(ids).to_numpy(np.float64),
            "predicted": mean,
            "uncertainty": std,
            "year": np.full(len(ids), year, np.int64),
            **image_columns(counts, len(ids)),
            **{f"member_{i}": s for i, s in enumerate(scores)},
        }
    )
    uncertainty = (
        f"standard deviation (ddof 1) of {len(members)} members' predictions"
        if len(members) > 1
        else "none: one member, so uncertainty is NaN and calibration null"
    )
    resolved = asdict(config) | {
        "year": year,
        "label": f"{fusion.label} x{len(members)} ({year})",
        "target": fusion.target,
        "members": [
            {"run_id": m.run.run_id, "path": str(m.run.path), "seed": m.config.seed}
            for m in members
        ],
        "train_data": str(train_root.root),
        "trained_year": learnt,
        "aerial_raster": str(imagery.aerial) if fusion.aerial else None,
        "captured_years": list(imagery.captured_years)
        if fusion.ground and imagery.captured_years
        else None,
        "uncertainty": uncertainty,
        "device_resolved": str(device),
        "processes": ranks.world,
    }
    metrics = {
        "cells": len(ids),
        "members": len(members),
        "year": year,
        "cells_with_ground_images": int((counts.sum(axis=1) > 0).sum()),
        "mean_uncertainty": float(np.nanmean(std)) if len(members) > 1 else None,
        "calibration_cells": len(test),
        **coverage(test_mean, test_std, test_true),
        **{f"test_{k}": v for k, v in score_metrics(test_mean, test_true).items()},
    }
    with ranks.run_writer(lambda: RunWriter(root.runs, PREDICTION_KIND, resolved)) as run:
        run.log(f"{len(ids)} cells of {root.root}, year {year}, members {config.run}")
        run.log(f"uncertainty: {uncertainty}")
        run.log(
            f"calibration on {len(test)} test cells of {train_root.root} ({learnt}): "
            + ", ".join(f"{k} {metrics[k]:.3f}" for k in ("coverage_50", "coverage_90"))
        )
        run.write_metrics(metrics)
        run.write_predictions(predictions)
    log(f"prediction {run.run_id}: {len(ids)} cells, {year}; {root.runs / run.run_id}")
    return run.run_id
