"""The scene filter: a scene classifier and the paper's three Flickr subsets.

The paper scores every Flickr photo with a Places365 classifier and keeps (a) all photos,
(b) outdoor photos, or (c) "building" photos: at least one building-related scene above a
threshold. Here the classifier is any registered backbone with a linear head over a list of
scene names: a Places365 checkpoint a user has, or, on the demo city, a classifier trained on
the demo's scene labels (``train scene-filter``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.models.backbones import create_backbone

SUBSETS = ("all", "outdoor", "building")


@dataclass
class SceneFilterConfig:
    """Which scenes count as building-related or indoor, and the probability threshold."""

    building_scenes: tuple[str, ...] = ("building", "street")
    indoor_scenes: tuple[str, ...] = ("food", "interior")
    threshold: float = 0.5
    scenes: tuple[str, ...] = field(default=("building", "street", "water", "park", "people", "food", "interior"))


class SceneClassifier(nn.Module):
    """Backbone + linear head over ``scenes``; outputs logits (B, len(scenes))."""

    def __init__(self, backbone: str, scenes: tuple[str, ...], weights: str | None = None, seed: int = 0):
        super().__init__()
        self.scenes = tuple(scenes)
        self.backbone = create_backbone(backbone, weights=weights, seed=seed)
        self.head = nn.Linear(self.backbone.num_features, len(self.scenes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


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
