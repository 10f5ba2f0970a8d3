"""Captioning pretraining of the tiny Qwen2-VL, standing in for a real checkpoint's pretraining.

UGE's stage 1 adapts a *pretrained* VLM with LoRA. A randomly initialised tiny model is no such
thing: every prompt ends in the same hidden state (cosine ~0.99 between any two embeddings),
and low-rank adapters on frozen random weights cannot pull them apart (the stage-1 loss stays
at ln(batch)). So before stage 1 the tiny model gets what a real VLM had: full-parameter
next-token training on image -> caption, here on the training split's spatial captions. The
embedder is never trained in this step and the held-out district is never seen.

The result is a checkpoint folder like any other (``save_pretrained``), cached per data root
and step count, so stage 0 of UGBench is this pretrained backbone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.distributed import Ranks
from core.io import building
from core.models.uge import load_vlm
from core.models.uge_run import PRETRAINING_MARKER
from core.ugdata import PAIR_CAPTION, TRAIN_FILE, UGData, UGSample

#: The stage a job's progress names during the captioning pretraining.
PRETRAINING_STAGE = "pretraining the tiny VLM"

PROMPT = "Describe where this street-level image was taken."


def caption_batch(
    processor, images: Sequence, captions: Sequence[str], image_px: int, max_caption_tokens: int
) -> dict[str, torch.Tensor]:
    """Model inputs for image -> caption, with ``labels`` on the caption tokens only."""
    tokenizer = processor.tokenizer
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
        for _ in captions
    ]
    prompts = processor.apply_chat_template(
        conversations, tokenize=False, add_generation_prompt=True
    )
    answers = [
        tokenizer.decode(tokenizer(c, add_special_tokens=False)["input_ids"][:max_caption_tokens])
        + "<|im_end|>"
        for c in captions
    ]
    size = {
        "images_kwargs": {
            "size": {"shortest_edge": image_px * image_px, "longest_edge": image_px * image_px}
        }
    }
    prompt_lengths = processor(
        text=prompts,
        images=list(images),
        padding=True,
        padding_side="right",
        return_tensors="pt",
        **size,
    )["attention_mask"].sum(1)
    batch = processor(
        text=[p + a for p, a in zip(prompts, answers, strict=True)],
        images=list(images),
        padding=True,
        padding_side="right",
        return_tensors="pt",
        **size,
    )
    labels = batch["input_ids"].clone()
    positions = torch.arange(labels.shape[1])
    labels[positions[None, :] < prompt_lengths[:, None]] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    return dict(batch)


def caption_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over the labelled tokens (fp32), and their number."""
    targets = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets,
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((targets != -100).sum())


def pretrain_captioning(
    base: str | Path,
    out: str | Path,
    data: UGData,
    steps: int,
    load_images: Callable[[UGData, Sequence[UGSample], int], list],
    batch_size: int = 16,
    lr: float = 1e-3,
    image_px: int = 112,
    max_caption_tokens: int = 200,
    seed: int = 0,
    log: Callable[[str], None] = print,
    ranks: Ranks | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Train every weight of the VLM in ``base`` on image -> caption; save it to ``out``.

    On several ranks (:class:`~core.distributed.Ranks`) every rank draws the same batches and
    takes its shard of each; the loss is the global batch's mean over its caption tokens, as in
    one process, and rank 0 writes ``out`` while the others wait for it.

    Args:
        base: the randomly initialised tiny checkpoint folder.
        out: destination folder (written beside, then renamed: never half-written).
        data: UGData; only the training file's caption pairs are used.
        steps: optimiser steps.
        load_images: ``(data, samples, px) -> PIL images`` (the trainer's own loader).
        batch_size, lr, image_px, max_caption_tokens, seed: the schedule (global batch size).
        log: progress lines.
        ranks: the ranks of the run (default: this process alone, on the automatic device).
        progress: called with the stage, step, steps and loss 20 times in the pretraining (a
            job's progress: the sidebar shows it, and a cancel takes effect there).

    Returns:
        ``out``.
    """
    ranks = ranks or Ranks()
    samples = [s for s in data.files[TRAIN_FILE] if s.pair_type == PAIR_CAPTION]
    if len(samples) < batch_size:
        raise ValueError(
            f"{data.root}: {len(samples)} caption pairs, fewer than a batch of {batch_size}"
        )
    if batch_size < ranks.world:
        raise ValueError(f"a batch of {batch_size} cannot be shared by {ranks.world} processes")
    model, processor = load_vlm(base, dtype="float32", device=ranks.device)
    model.train()
    for param in model.parameters():
        param.requires_grad_(True)
    net = ranks.ddp(model, trainable_only=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    started, recent = time.perf_counter(), []
    for step in range(1, steps + 1):
        rows = torch.randperm(len(samples), generator=generator)[:batch_size]
        batch = [samples[i] for i in ranks.shard(rows).tolist()]
        inputs = caption_batch(
            processor,
            load_images(data, batch, image_px),
            [s.positive for s in batch],
            image_px,
            max_caption_tokens,
        )
        labels = inputs.pop("labels").to(ranks.device)
        logits = net(**{k: v.to(ranks.device) for k, v in inputs.items()}, use_cache=False).logits
        total, count = caption_loss_sum(logits, labels)
        tokens = ranks.sum(count)  # the global batch's caption tokens
        # the global mean once DDP averages the ranks' gradients
        loss = total * (ranks.world / tokens)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        recent = (recent + [ranks.sum(float(total.detach())) / tokens])[-50:]
        if progress is not None and (step % max(1, steps // 20) == 0 or step == steps):
            loss_now = sum(recent) / len(recent)
            progress({"stage": PRETRAINING_STAGE, "epoch": step, "epochs": steps, "loss": loss_now})
        if step % max(1, steps // 10) == 0 or step == steps:
            log(
                f"tiny VLM captioning pretraining step {step}/{steps}: loss {sum(recent) / len(recent):.3f} "
                f"({time.perf_counter() - started:.0f} s)"
            )
    out = Path(out)
    if ranks.is_main:
        with building(out, replace=True) as staged:
            model.eval().save_pretrained(staged)
            processor.save_pretrained(staged)
            (staged / PRETRAINING_MARKER).write_text(
                json.dumps(
                    {
                        "base": str(base),
                        "ugdata": str(data.root),
                        "steps": steps,
                        "batch_size": batch_size,
                        "lr": lr,
                        "image_px": image_px,
                        "seed": seed,
                        "processes": ranks.world,
                        "final_loss": sum(recent) / len(recent),
                    },
                    indent=2,
                )
                + "\n"
            )
    ranks.barrier()  # the others read the folder once rank 0 has renamed it into place
    return out
