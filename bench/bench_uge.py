"""UGE embedding throughput: the tiny Qwen2-VL on this machine (a real checkpoint on a GPU)."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.common import register
from core.models.uge import IMAGE_TASK, TEXT_TASK, UGEEmbedder, UGESettings, make_tiny_qwen2vl

#: A local Qwen2-VL / Qwen2.5-VL folder to measure instead of the tiny model (on a GPU, bf16).
VLM_ENV = "STADSBEELD_BENCH_VLM"


@register("uge_throughput", repeat=3, images=256, batch=32, px=112)
def bench_uge_throughput(repeat: int, images: int, batch: int, px: int) -> dict[str, Any]:
    """Image and text embeddings per second (inference, batched), best of ``repeat`` passes."""
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)) for _ in range(images)
    ]
    texts = [
        f"A street in buurt {i} of Amsterdam, {i % 7 * 100} m from the Dam." for i in range(images)
    ]
    with tempfile.TemporaryDirectory() as folder:
        vlm = os.environ.get(VLM_ENV) or str(make_tiny_qwen2vl(f"{folder}/tiny"))
        embedder = UGEEmbedder.from_folder(
            vlm, UGESettings(image_min_pixels=px * px, image_max_pixels=px * px, lora=None)
        )

        def rate(embed) -> float:
            best = float("inf")
            for _ in range(repeat + 1):  # the first pass warms up
                start = time.perf_counter()
                with torch.no_grad():
                    for i in range(0, images, batch):
                        embed(i)
                if embedder.device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            return images / best

        image_rate = rate(lambda i: embedder.embed_images(pictures[i : i + batch], IMAGE_TASK))
        text_rate = rate(lambda i: embedder.embed_texts(texts[i : i + batch], TEXT_TASK))
        return {
            "model": "tiny qwen2-vl" if not os.environ.get(VLM_ENV) else vlm,
            "device": str(embedder.device),
            "dtype": str(next(embedder.parameters()).dtype),
            "image_embeddings_per_s": image_rate,
            "text_embeddings_per_s": text_rate,
        }
