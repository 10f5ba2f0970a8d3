"""The paper's three Flickr subsets, without torch: which photos a scene filter keeps.

A scene run (``python -m train scene-filter``) scores every Flickr photo and caches the scores
beside the catalog; this module reads them back and applies the subset rules, so the dashboard
can show a filter's verdict without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.dataroot import DataRoot
from core.io import read_table, require_columns
from core.runs import load_run, run_path

SUBSETS = ("all", "outdoor", "building")


@dataclass
class SceneFilterConfig:
    """Which scenes count as building-related or indoor, and the probability threshold."""

    building_scenes: tuple[str, ...] = ("building", "street")
    """Scenes that count as building-related (the building subset)."""
    indoor_scenes: tuple[str, ...] = ("food", "interior")
    """Indoor scenes (the outdoor subset leaves them out)."""
    threshold: float = 0.5
    """Probability a photo needs to count as building-related, or as outdoor."""
    scenes: tuple[str, ...] = field(
        default=("building", "street", "water", "park", "people", "food", "interior")
    )
    """The classifier's scenes, in the order of its outputs."""


def select(scores: pd.DataFrame, subset: str, config: SceneFilterConfig) -> np.ndarray:
    """Boolean mask of the photos kept by a subset.

    Args:
        scores: one row per photo with a probability column ``p_<scene>`` per scene.
        subset: ``all``; ``outdoor`` (the non-indoor scenes together hold at least
            ``threshold`` of the probability); ``building`` (at least one building-related
            scene at or above ``threshold``).
        config: the scene lists and the threshold.
    """
    if subset not in SUBSETS:
        raise ValueError(f"unknown Flickr subset {subset!r}; expected one of {SUBSETS}")
    if subset == "all":
        return np.ones(len(scores), bool)
    needed = config.building_scenes if subset == "building" else config.indoor_scenes
    missing = [f"p_{s}" for s in needed if f"p_{s}" not in scores.columns]
    if missing:
        raise ValueError(f"scene scores lack columns {missing} needed for the {subset!r} subset")
    if subset == "building":
        return (scores[[f"p_{s}" for s in needed]].to_numpy() >= config.threshold).any(axis=1)
    indoor = scores[[f"p_{s}" for s in needed]].to_numpy().sum(axis=1)
    return 1 - indoor >= config.threshold


def scores_path(root: DataRoot, run_id: str) -> Path:
    """Where a scene run's per-photo scores are cached, beside the catalog.

    Raises:
        ValueError: if ``run_id`` is not a run id (:func:`core.runs.run_path`).
    """
    run_path(root.runs, run_id)  # the id names a file too: no "../" out of street/
    return root.catalog.parent / f"scene_scores-{run_id}.parquet"


def filter_config(root: DataRoot, run_id: str) -> SceneFilterConfig:
    """The scene lists and threshold a scene run was made with."""
    stored = load_run(run_path(root.runs, run_id)).config["filter"]
    return SceneFilterConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
    )


def scene_verdicts(root: DataRoot, run_id: str) -> pd.DataFrame:
    """Per Flickr photo: its most likely scene and whether each subset keeps it.

    Returns:
        DataFrame with ``id``, ``scene``, ``scene_p`` and one boolean column per subset.

    Raises:
        FileNotFoundError, ValueError: if the run's cached scores are missing or malformed.
    """
    path = scores_path(root, run_id)
    scores = read_table(path, "scene scores")
    require_columns(scores, ("id",), path)
    probabilities = [c for c in scores.columns if c.startswith("p_")]
    if not probabilities:
        raise ValueError(f"{path}: no p_<scene> probability columns")
    config = filter_config(root, run_id)
    best = scores[probabilities].to_numpy().argmax(axis=1)
    verdicts = pd.DataFrame(
        {
            "id": scores["id"],
            "scene": [probabilities[i].removeprefix("p_") for i in best],
            "scene_p": scores[probabilities].to_numpy().max(axis=1),
        }
    )
    for subset in SUBSETS:
        verdicts[subset] = select(scores, subset, config)
    return verdicts
