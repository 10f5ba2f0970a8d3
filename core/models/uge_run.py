"""A UGE run's models: the backbone folder, the embedder settings, :func:`restore` from a run
folder, and the embedding of UGData samples with them (images, questions, captions).

Torch code without the trainer: the dashboard's text queries and UGBench restore runs through
here, and ``python -m train uge`` writes the folders it reads (``adapters/``, the graph model,
the backbone cached under ``DATA/cache/vlm/``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file

from core.configs import UGEConfig
from core.dataroot import DataRoot
from core.models.uge import (
    IMAGE_TASK,
    QUESTION_TASK,
    TEXT_TASK,
    LoraSettings,
    UGEEmbedder,
    UGESettings,
    make_tiny_qwen2vl,
)
from core.models.uge_graph import GraphModel
from core.runs import MODEL_FILE, Run
from core.ugdata import PAIR_REASONING, UGData, UGSample

ADAPTERS_DIR = "adapters"
#: Written last into a pretrained tiny backbone's folder: the pretraining finished.
PRETRAINING_MARKER = "pretraining.json"


def backbone_folder(config: UGEConfig, pretrain: Callable[[Path, Path], Any] | None = None) -> Path:
    """The backbone folder of a run: ``config.vlm``, else the tiny Qwen2-VL cached under
    ``DATA/cache/vlm/`` (made here on first use), after its captioning pretraining on this
    UGData when ``config.tiny_pretrain_steps`` > 0 (one folder per step count and UGData folder).

    Args:
        config: the run's configuration.
        pretrain: ``(base, folder)``: makes the pretrained folder from the tiny base when it is
            missing (the trainer passes its captioning pretraining); without it a missing
            pretrained folder is an error.

    Raises:
        FileNotFoundError: the pretrained folder is missing and there is no ``pretrain``.
    """
    if config.vlm:
        return Path(config.vlm)
    cache = DataRoot(config.data).cache / "vlm"
    base = cache / "tiny-qwen2vl"
    if not (base / "config.json").is_file():
        make_tiny_qwen2vl(base)
    if config.tiny_pretrain_steps <= 0:
        return base
    source = hashlib.sha1(str(config.ugdata_folder.resolve()).encode()).hexdigest()[:8]
    folder = cache / f"tiny-qwen2vl-captions-{config.tiny_pretrain_steps}-{source}"
    if not (folder / PRETRAINING_MARKER).is_file():
        if pretrain is None:
            raise FileNotFoundError(
                f"{folder}: the run's pretrained tiny VLM is missing (python -m train uge "
                "with the run's configuration pretrains it)"
            )
        pretrain(base, folder)
    return folder


def settings(config: UGEConfig, lora: bool = True) -> UGESettings:
    """The embedder settings of a run (stage 0 has no adapters)."""
    pixels = config.image_px * config.image_px
    return UGESettings(
        pooling=config.pooling,
        dim=config.dim,
        image_min_pixels=pixels,
        image_max_pixels=pixels,
        lora=LoraSettings(r=config.lora_r, alpha=2 * config.lora_r, dropout=config.lora_dropout)
        if lora
        else None,
    )


def load_images(data: UGData, samples: Sequence[UGSample], px: int) -> list[Image.Image]:
    """Each sample's first image as RGB at ``px`` x ``px``."""
    return [Image.open(data.image_path(s)).convert("RGB").resize((px, px)) for s in samples]


def embed_queries(
    embedder: UGEEmbedder, data: UGData, samples: Sequence[UGSample], px: int, batch_size: int = 32
) -> torch.Tensor:
    """Image-side embeddings: caption/graph samples by image, reasoning samples by image + question."""
    out = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            part = samples[start : start + batch_size]
            images = load_images(data, part, px)
            reasoning = [s.pair_type == PAIR_REASONING for s in part]
            if all(reasoning):
                questions = [s.query.replace("<image>", "").strip() for s in part]
                out.append(embedder.embed_images(images, QUESTION_TASK, questions).float().cpu())
            else:
                out.append(embedder.embed_images(images, IMAGE_TASK).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, embedder.dim)


def embed_positives(
    embedder: UGEEmbedder, samples: Sequence[UGSample], batch_size: int = 64
) -> torch.Tensor:
    """Text-side embeddings of the samples' positives (captions or answers)."""
    with torch.no_grad():
        parts = [
            embedder.embed_texts([s.positive for s in samples[i : i + batch_size]], TEXT_TASK)
            .float()
            .cpu()
            for i in range(0, len(samples), batch_size)
        ]
    return torch.cat(parts) if parts else torch.zeros(0, embedder.dim)


def restore(
    run: Run, config: UGEConfig | None = None, stage: int = 2, vlm: str | Path | None = None
) -> tuple[UGEEmbedder, GraphModel | None]:
    """A UGE run's embedder (stage 0: the backbone without adapters) and graph model (stage 2).

    ``vlm`` is the backbone folder; by default :func:`backbone_folder` of the run's config,
    which must then exist (the trainer makes and caches it).
    """
    config = config or UGEConfig.from_dict(run.config)
    vlm = backbone_folder(config) if vlm is None else Path(vlm)
    if stage == 0:
        return UGEEmbedder.from_folder(
            vlm, settings(config, lora=False), device=config.device
        ), None
    embedder = UGEEmbedder.from_adapters(run.path / ADAPTERS_DIR, vlm, device=config.device)
    if stage == 1:
        return embedder, None
    metadata = run.model_metadata()
    model = GraphModel(
        int(metadata["image_dim"]), int(metadata["graph_dim"]), int(metadata["place_dim"])
    )
    model.load_state_dict(load_file(run.path / MODEL_FILE))
    return embedder, model.eval()
