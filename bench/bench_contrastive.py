"""Contrastive pretraining throughput: a full MoCo v3 step vs the bare backbone on the same images.

A pretraining step augments two views of a batch, runs the momentum encoder on both (no grad),
the base encoder and predictor on both, the symmetric InfoNCE, backward and the optimiser. The
reference is the bare backbone's forward + backward + optimiser step on the same number of
images (2 x batch), already normalised: what training the encoder could cost at the least.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import register
from core.models.backbones import create_backbone
from core.models.contrastive import MoCoV3
from core.models.device import resolve_device
from train.contrastive import augment

SETTINGS = {"convnet_small@32": ("convnet_small", 32, 256), "resnet18@64": ("resnet18", 64, 64)}


def _rate(step, images: int, repeat: int, device: torch.device) -> float:
    """Images per second of ``step``, best of ``repeat`` timed runs after two warm-up steps."""
    for _ in range(2):
        step()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return images / best


def _one(name: str, px: int, batch: int, repeat: int, device: torch.device) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, 3, px, px), dtype=torch.uint8, generator=generator).to(
        device
    )
    model = (
        MoCoV3(create_backbone(name, seed=0), dim=128, mlp_dim=512)
        .to(device)
        .to(memory_format=torch.channels_last)
    )
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def pretraining_step() -> None:
        views = [augment(pixels, generator, 0.35) for _ in range(2)]
        with autocast:
            loss = model(*views, 0.99)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    bare = create_backbone(name, seed=0).to(device).to(memory_format=torch.channels_last)
    bare_optimiser = torch.optim.AdamW(bare.parameters(), lr=1e-3)
    inputs = torch.cat([augment(pixels, generator, 0.35) for _ in range(2)])

    def bare_step() -> None:
        with autocast:
            loss = bare(inputs).float().square().mean()
        bare_optimiser.zero_grad(set_to_none=True)
        loss.backward()
        bare_optimiser.step()

    def augment_only() -> None:
        for _ in range(2):
            augment(pixels, generator, 0.35)

    images = 2 * batch
    pretraining = _rate(pretraining_step, images, repeat, device)
    reference = _rate(bare_step, images, repeat, device)
    return {
        "batch": batch,
        "pretraining_images_per_s": pretraining,
        "bare_fwd_bwd_images_per_s": reference,
        "ratio": pretraining / reference,
        "augment_images_per_s": _rate(augment_only, images, repeat, device),
    }


@register("contrastive_throughput", repeat=5, device="auto")
def bench_contrastive_throughput(repeat: int, device: str) -> dict[str, Any]:
    """Pretraining images/s vs the bare backbone's forward+backward on the same images."""
    resolved = resolve_device(device)
    torch.manual_seed(0)
    results = {label: _one(*setting, repeat, resolved) for label, setting in SETTINGS.items()}
    return {
        "device": str(resolved),
        "threads": torch.get_num_threads(),
        **results,
        "target_ratio_min": 0.8,
    }
