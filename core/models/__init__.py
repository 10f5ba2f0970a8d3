"""Models: image backbones (registry and local weights), cross-modal fusion, scene filter."""

from core.models.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    backbone_fingerprint,
    create_backbone,
    load_backbone_weights,
    normalise,
    register_backbone,
    save_backbone,
)

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "backbone_fingerprint",
    "create_backbone",
    "load_backbone_weights",
    "normalise",
    "register_backbone",
    "save_backbone",
]
