"""Cross-modal fusion of aerial and ground-level imagery (arXiv 2403.08915).

An aerial patch goes through a trainable backbone to a ``width``-d vector; the cell's ground
images went through a frozen backbone whose per-image features were average-pooled (see
``core.features``). The two vectors are added element-wise, then BatchNorm -> FC(100) -> FC(1)
predicts the score. The FC(100) output is the cell's embedding.

Cells without ground images: the paper trains on cells that have them; we keep every cell and
give the image-less ones a learned "missing" vector in place of the ground vector, so the model
falls back to the aerial path instead of crashing or seeing zeros as a real observation.

:func:`restore` rebuilds the trained model of a ``fusion`` run from its run folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from core.configs import FusionConfig
from core.models.backbones import create_backbone
from core.models.device import resolve_device

if TYPE_CHECKING:
    from core.runs import Run


class FusionRegressor(nn.Module):
    """Aerial + pooled ground features -> score. Either branch may be absent (unimodal variants).

    Args:
        aerial: trainable backbone mapping (B, 3, H, W) to (B, aerial.num_features), or None.
        ground_dim: width of the pooled ground features, or None for aerial only.
        hidden: width of the penultimate layer (the paper's FC(100)).
    """

    def __init__(self, aerial: nn.Module | None, ground_dim: int | None, hidden: int = 100) -> None:
        super().__init__()
        if aerial is None and ground_dim is None:
            raise ValueError("FusionRegressor needs an aerial backbone, ground features, or both")
        self.aerial = aerial
        width = aerial.num_features if aerial is not None else ground_dim
        self.width = width
        self.ground = None
        if ground_dim is not None:
            # The paper adds two 2048-d ResNet-50 vectors directly; other widths need a projection.
            self.ground = nn.Identity() if ground_dim == width else nn.Linear(ground_dim, width)
            self.missing = nn.Parameter(torch.zeros(width))
        self.norm = nn.BatchNorm1d(width)
        self.fc = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, 1)

    def embed(
        self,
        aerial: torch.Tensor | None,
        ground: torch.Tensor | None,
        has_ground: torch.Tensor | None,
    ) -> torch.Tensor:
        """The fused penultimate vector (B, hidden)."""
        parts = []
        if self.aerial is not None:
            parts.append(self.aerial(aerial))
        if self.ground is not None:
            projected = self.ground(ground)
            parts.append(
                torch.where(has_ground[:, None], projected, self.missing.expand_as(projected))
            )
        fused = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        return torch.relu(self.fc(self.norm(fused)))

    def forward(
        self,
        aerial: torch.Tensor | None,
        ground: torch.Tensor | None = None,
        has_ground: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted (standardised) score, shape (B,)."""
        return self.out(self.embed(aerial, ground, has_ground)).squeeze(1)


def restore(run: Run, device: str | torch.device = "cpu") -> tuple[FusionRegressor, FusionConfig]:
    """The trained model of a fusion run (weights from its safetensors) and its config."""
    config = FusionConfig.from_dict(run.config)
    state = {k: torch.from_numpy(v) for k, v in run.state_dict().items()}
    ground_dim = None
    if config.ground:
        ground_dim = (
            state["ground.weight"].shape[1]
            if "ground.weight" in state
            else state["missing"].shape[0]
        )
    backbone = create_backbone(config.aerial_backbone) if config.aerial else None
    model = FusionRegressor(backbone, ground_dim)
    model.load_state_dict(state)
    return model.to(resolve_device(device)).eval(), config
