"""The scene filter's classifier (the subset rules are in :mod:`core.scenes`).

The paper scores every Flickr photo with a Places365 classifier and keeps (a) all photos,
(b) outdoor photos, or (c) "building" photos: at least one building-related scene above a
threshold. Here the classifier is any registered backbone with a linear head over a list of
scene names: a Places365 checkpoint a user has, or, on the demo city, a classifier trained on
the demo's scene labels (``train scene-filter``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from typing_extensions import override

from core.models.backbones import (
    check_state_fits,
    create_backbone,
    read_state_dict,
    strip_common_prefix,
)


class SceneClassifier(nn.Module):
    """Backbone + linear head over ``scenes``; outputs logits (B, len(scenes))."""

    def __init__(
        self, backbone: str, scenes: tuple[str, ...], weights: str | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        self.scenes = tuple(scenes)
        self.backbone = create_backbone(backbone, weights=weights, seed=seed)
        self.head = nn.Linear(self.backbone.num_features, len(self.scenes))

    @override
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


#: Names classifier heads go by in timm, torchvision and the Places365 release.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.")


def load_scene_classifier(
    path: str | Path, backbone: str, scenes: tuple[str, ...]
) -> SceneClassifier:
    """A classifier from a full checkpoint (backbone + head), e.g. a Places365 ResNet-50.

    Accepts our own ``scene`` runs' ``model.safetensors`` and foreign layouts where the head is
    called ``fc``/``head``/``classifier``/``last_linear`` and the rest is the backbone (an
    optional ``module.`` prefix is dropped). The head must have one output per scene name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scene classifier checkpoint not found")
    model = SceneClassifier(backbone, scenes)
    expected = model.state_dict()
    state = read_state_dict(path)
    if not any(key.startswith("backbone.") for key in state):
        state = strip_common_prefix(state, {k.removeprefix("backbone.") for k in expected})
        state = {
            (
                "head." + key.split(".", 1)[1]
                if key.startswith(_HEAD_PREFIXES)
                else "backbone." + key
            ): value
            for key, value in state.items()
        }
    check_state_fits(state, expected, path)
    model.load_state_dict(
        state, strict=False
    )  # BatchNorm counters of old checkpoints may be absent
    return model


def read_scene_names(path: str | Path) -> tuple[str, ...]:
    """Scene names, one per line; Places365's ``categories_places365.txt`` (``/a/abbey 0``) works too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: scene names file not found")
    names = [
        line.split()[0].strip("/").split("/", 1)[-1]
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: scene names must be unique")
    return tuple(names)
