"""MoCo v3: Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers".

A base encoder (backbone + projector MLP) followed by a predictor MLP produces queries; a
momentum encoder (an exponential moving average of the base encoder, never trained by gradient)
produces keys. Two views of each image give a symmetric InfoNCE loss; the other keys of the
(global) batch are the negatives. No memory queue.

The paper's recipe: ViT projector 3 layers (ResNet 2), predictor 2 layers, hidden 4096, output
256, temperature 0.2 for ViT (1.0 for ResNet), momentum 0.99 rising to 1 on a cosine schedule
(:func:`cosine_momentum`). Smaller defaults here suit CPU runs.

Distributed training: keys are all-gathered across processes when a process group exists, so
every process contrasts its queries with the whole global batch. All processes must hold the
same number of images (``drop_last=True`` in the sampler). BatchNorm (in the heads, and in CNN
backbones) then normalises with each process's share of the batch; real GPU runs convert the
model with ``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` before wrapping it in DDP, as the
paper's code does. PyTorch's SyncBatchNorm refuses CPU tensors, so CPU (gloo) runs keep
per-process statistics. The ViT trick of a frozen random patch projection belongs to the
backbone, and bf16 autocast and channels-last belong to the caller.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, layers: int, last_bn: bool = True
) -> nn.Sequential:
    """The MoCo v3 projector/predictor: (Linear-BN-ReLU) x (layers - 1), then Linear [-BN].

    Args:
        in_dim: input features.
        hidden_dim: width of the hidden layers.
        out_dim: output features.
        layers: number of Linear layers (>= 1).
        last_bn: end with a BatchNorm without affine parameters (the projector; SimCLR's
            design); the predictor ends with the bare Linear.
    """
    if layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got {layers}")
    blocks: list[nn.Module] = []
    for layer in range(layers):
        last = layer == layers - 1
        dim_in = in_dim if layer == 0 else hidden_dim
        dim_out = out_dim if last else hidden_dim
        # no bias: a BatchNorm follows (and the paper's code drops it on the last one too)
        blocks.append(nn.Linear(dim_in, dim_out, bias=False))
        if not last:
            blocks += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            blocks.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*blocks)


class MoCoV3(nn.Module):
    """Base encoder + predictor (queries) against a momentum encoder (keys).

    Args:
        backbone: maps (B, 3, H, W) to (B, num_features); it needs ``num_features``.
        dim: output dimension of projector and predictor.
        mlp_dim: hidden width of both MLPs.
        temperature: the InfoNCE temperature T.
        projector_layers: Linear layers of the projector (3 for ViT in the paper, 2 for ResNet).
        predictor_layers: Linear layers of the predictor.
    """

    def __init__(
        self,
        backbone: nn.Module,
        dim: int = 256,
        mlp_dim: int = 1024,
        temperature: float = 0.2,
        projector_layers: int = 3,
        predictor_layers: int = 2,
    ) -> None:
        super().__init__()
        features = getattr(backbone, "num_features", None)
        if not isinstance(features, int):
            raise ValueError("the backbone needs an integer `num_features` (see create_backbone)")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.base_encoder = nn.Sequential(
            OrderedDict(backbone=backbone, projector=mlp(features, mlp_dim, dim, projector_layers))
        )
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        self.momentum_encoder.requires_grad_(False)
        self.predictor = mlp(dim, mlp_dim, dim, predictor_layers, last_bn=False)

    @property
    def backbone(self) -> nn.Module:
        """The base encoder's backbone: what downstream tasks and the fusion model use."""
        return self.base_encoder.backbone

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """momentum <- m * momentum + (1 - m) * base, for every parameter (not BN buffers)."""
        momentum = list(self.momentum_encoder.parameters())
        base = [p.detach() for p in self.base_encoder.parameters()]
        # momentum + (1 - m) * (base - momentum) in one foreach pass over each tensor (about 150
        # tensors for ViT-B), without a temporary copy of the base encoder; equal to the average
        # up to rounding, and exact for m = 1 (no change) and m = 0 (a copy)
        torch._foreach_lerp_(momentum, base, 1.0 - m)

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """InfoNCE of this process's queries against the keys of all processes.

        The positive of ``q[i]`` on process ``rank`` is the global key ``rank * N + i``.
        """
        rank = dist.get_rank() if _distributed() else 0
        return info_nce(q, concat_all_gather(k), self.temperature, offset=rank * q.shape[0])

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        """Symmetric loss ctr(q1, k2) + ctr(q2, k1) of two views of one batch of images.

        Args:
            x1: first views (B, 3, H, W).
            x2: second views, ``x2[i]`` a positive of ``x1[i]``.
            m: momentum for the update of the momentum encoder, done first.
        """
        with torch.no_grad():
            self.update_momentum(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, num_features) of the base encoder, without the projector."""
        return self.backbone(x)


def info_nce(
    q: torch.Tensor, k: torch.Tensor, temperature: float, *, offset: int = 0
) -> torch.Tensor:
    """MoCo v3's InfoNCE: cross entropy of cosine similarities / T, times 2T.

    The 2T factor (from the paper's code) makes the gradient with respect to the similarities
    2 * (softmax - onehot), so its scale does not shrink or grow with the temperature.

    Args:
        q: queries (N, D).
        k: keys (M, D), M >= N; not necessarily normalised.
        temperature: T.
        offset: the positive of ``q[i]`` is ``k[offset + i]``.
    """
    # bf16 logits have 8 mantissa bits, too coarse for similarities / 0.2; the N x M matrix is
    # cheap in float32
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        logits = q @ k.T / temperature
        labels = torch.arange(q.shape[0], device=q.device) + offset
        return F.cross_entropy(logits, labels) * (2 * temperature)


def cosine_momentum(step: int, total_steps: int, base: float = 0.99) -> float:
    """Momentum rising from ``base`` at step 0 to 1 at ``total_steps`` on a half cosine."""
    if total_steps <= 0 or not 0 <= step <= total_steps:
        raise ValueError(
            f"need 0 <= step <= total_steps, total_steps > 0; got {step}, {total_steps}"
        )
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The tensors of all processes concatenated in rank order; ``tensor`` itself when alone.

    The result carries no gradient either way (detached when alone), so a caller behaves the
    same on one process and on many.
    """
    if not _distributed() or dist.get_world_size() == 1:
        return tensor.detach()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()
