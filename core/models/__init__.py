"""Models: image backbones (registry and local weights), cross-modal fusion, scene filter, and
the device they run on."""

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
from core.models.device import resolve_device

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "backbone_fingerprint",
    "create_backbone",
    "load_backbone_weights",
    "normalise",
    "register_backbone",
    "resolve_device",
    "save_backbone",
]
