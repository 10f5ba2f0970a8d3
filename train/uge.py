"""``python -m train uge``: spatially grounded VLM embeddings (UrbanGraphEmbeddings), two stages.

Stage 1 trains LoRA adapters of a Qwen2-VL backbone with instruction-guided image-text InfoNCE
on UGData's caption and reasoning pairs (temperature 0.01, in-batch negatives; images of one
anchor node are not each other's negatives). Stage 2 freezes the embedder and trains a GATv2
graph encoder over each image's street subgraph, fused with the image embedding, against the
spatial captions. The run saves the adapters, the graph model, and per-cell embeddings (mean of
the fused embeddings of a cell's images) for the dashboard.

The backbone is a local checkpoint folder (``--vlm``, a real Qwen2-VL / Qwen2.5-VL on a GPU in
bf16); without one, a tiny Qwen2-VL is built once under ``DATA/cache/vlm/`` for CPU runs.

The graph model, its batching and the embedding of samples live in :mod:`core.models.uge_graph`
and :mod:`core.models.uge_run` (which also restores a run from its folder); here are the
training stages, the run writing and :func:`train_uge`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from core.configs import UGEConfig
from core.dataroot import DataRoot
from core.models.uge import IMAGE_TASK, QUESTION_TASK, TEXT_TASK, UGEEmbedder, info_nce
from core.models.uge_graph import (
    GraphModel,
    fused_embeddings,
    graph_file,
    graph_records,
    graph_tensors,
    node_vectors,
)
from core.models.uge_run import (
    ADAPTERS_DIR,
    backbone_folder,
    embed_positives,
    embed_queries,
    load_images,
    settings,
)
from core.runs import EPOCHS_FILE, RunWriter
from core.ugdata import (
    HELDOUT_FILE,
    PAIR_CAPTION,
    PAIR_GRAPH,
    PAIR_REASONING,
    TRAIN_FILE,
    UGData,
    UGSample,
    read_ugdata,
)
from train.common import seed_everything
from train.uge_pretrain import pretrain_captioning


def vlm_folder(
    config: UGEConfig, log: Callable[[str], None] = print, data: UGData | None = None
) -> Path:
    """The backbone folder (:func:`~core.models.uge_run.backbone_folder`): ``config.vlm``, else
    the tiny Qwen2-VL after its captioning pretraining on this UGData (``data`` if already read;
    both made on first use and cached under ``DATA/cache/vlm/``)."""

    def pretrain(base: Path, folder: Path) -> None:
        log(
            f"pretraining the tiny VLM on captions ({config.tiny_pretrain_steps} steps, cached in {folder})"
        )
        pretrain_captioning(
            base,
            folder,
            data or read_ugdata(config.ugdata_folder, check_images=True),
            config.tiny_pretrain_steps,
            load_images,
            image_px=config.image_px,
            log=log,
        )

    return backbone_folder(config, pretrain)


def group_ids(keys: Iterable[Any]) -> torch.Tensor:
    """Integer ids of ``keys``: pairs sharing a key are not each other's negatives in InfoNCE."""
    return torch.from_numpy(pd.factorize(pd.Series(list(keys), dtype=str))[0])


def node_groups(samples: Sequence[UGSample]) -> torch.Tensor:
    """Group by anchor node: images of one place share its captions."""
    return group_ids([s.meta.get("node_id", i) for i, s in enumerate(samples)])


def _stage1(
    embedder: UGEEmbedder,
    data: UGData,
    samples: list[UGSample],
    config: UGEConfig,
    generator: torch.Generator,
    run: RunWriter,
    log: Callable[[str], None],
) -> None:
    optimiser = torch.optim.AdamW(
        embedder.adapter_parameters().values(), lr=config.lr, weight_decay=0.0
    )
    by_type = {t: [s for s in samples if s.pair_type == t] for t in (PAIR_CAPTION, PAIR_REASONING)}
    kinds = [t for t, s in by_type.items() if len(s) >= 2]
    embedder.train()
    for step in range(1, config.stage1_steps + 1):
        kind = kinds[step % len(kinds)]  # one modality per batch: captions, then reasoning
        pool = by_type[kind]
        rows = torch.randperm(len(pool), generator=generator)[: config.batch_size].tolist()
        batch = [pool[i] for i in rows]
        images = load_images(data, batch, config.image_px)
        if kind == PAIR_REASONING:
            query = embedder.embed_images(
                images, QUESTION_TASK, [s.query.replace("<image>", "").strip() for s in batch]
            )
        else:
            query = embedder.embed_images(images, IMAGE_TASK)
        loss = info_nce(
            query,
            embedder.embed_texts([s.positive for s in batch], TEXT_TASK),
            config.temperature,
            node_groups(batch).to(query.device),
        )
        _step(
            optimiser, loss, run, log, stage=1, step=step, steps=config.stage1_steps, pair_type=kind
        )
    embedder.eval()


def _step(
    optimiser: torch.optim.Optimizer,
    loss: torch.Tensor,
    run: RunWriter,
    log: Callable[[str], None],
    stage: int,
    step: int,
    steps: int,
    pair_type: str,
) -> None:
    """One optimiser step; the loss goes to metrics.csv, and to progress and the log 20 times a stage."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    value = float(loss.detach())
    run.log_epoch(stage=stage, step=step, pair_type=pair_type, loss=value)
    if step % max(1, steps // 20) == 0 or step == steps:
        run.progress(stage=stage, epoch=step, epochs=steps, loss=value)
        log(f"uge stage {stage} step {step}/{steps}: {pair_type} loss {value:.3f}")


def _stage2(
    model: GraphModel,
    pools: Sequence[PairPool],
    config: UGEConfig,
    generator: torch.Generator,
    run: RunWriter,
    log: Callable[[str], None],
) -> None:
    """Graph encoder + fusion against captions (place pairs) and answers (walks), in turn."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.graph_lr)
    pools = [p for p in pools if len(p.queries) >= 2]
    model.train()
    for step in range(1, config.stage2_steps + 1):
        pool = pools[step % len(pools)]
        rows = torch.randperm(len(pool.queries), generator=generator)[: config.batch_size]
        part = {k: v[rows] for k, v in pool.graphs.items()}
        loss = info_nce(
            model(pool.queries[rows], part),
            pool.answers[rows],
            config.temperature,
            pool.groups[rows],
        )
        _step(
            optimiser,
            loss,
            run,
            log,
            stage=2,
            step=step,
            steps=config.stage2_steps,
            pair_type=pool.kind,
        )
    model.eval()


def walks_with_graphs(data: UGData, samples: Sequence[UGSample]) -> list[UGSample]:
    """The reasoning samples whose start node has a graph file (a graph that reaches into the
    held-out district is not written for the training split)."""
    return [
        s
        for s in samples
        if s.pair_type == PAIR_REASONING and (data.root / graph_file(s)).is_file()
    ]


def subset(samples: list[UGSample], n: int, seed: int) -> list[UGSample]:
    """At most ``n`` of ``samples``, drawn without replacement, in their order."""
    if len(samples) <= n:
        return samples
    keep = np.sort(np.random.default_rng(seed).choice(len(samples), n, replace=False))
    return [samples[i] for i in keep]


@dataclass
class PairPool:
    """Frozen stage-1 embeddings of one kind of stage-2 pair, with their subgraphs."""

    kind: str
    queries: torch.Tensor
    answers: torch.Tensor
    graphs: dict[str, torch.Tensor]
    groups: torch.Tensor


def train_uge(
    config: UGEConfig,
    log: Callable[[str], None] = print,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Both stages; writes the run folder and returns its id."""
    root = DataRoot(config.data)
    data = read_ugdata(config.ugdata_folder, check_images=True)
    vlm = vlm_folder(config, log, data)
    generator = seed_everything(config.seed)
    embedder = UGEEmbedder.from_folder(vlm, settings(config), device=config.device)
    train = data.files[TRAIN_FILE]
    stage1 = [s for s in train if s.pair_type in (PAIR_CAPTION, PAIR_REASONING)]
    stage2 = [s for s in train if s.pair_type == PAIR_GRAPH]
    if len(stage1) < 2 or len(stage2) < 2:
        raise ValueError(
            f"{config.ugdata_folder}: too few samples ({len(stage1)} stage-1, {len(stage2)} stage-2)"
        )
    resolved = asdict(config) | {
        "label": "uge",
        "vlm_resolved": str(vlm),
        "ugdata_manifest": data.manifest.get("options", {}),
    }
    with RunWriter(root.runs, "uge", resolved, progress=progress) as run:
        run.progress(stage=1, epoch=0, epochs=config.stage1_steps)
        started = time.perf_counter()
        _stage1(embedder, data, stage1, config, generator, run, log)
        run.log(f"stage 1: {config.stage1_steps} steps in {time.perf_counter() - started:.1f} s")
        embedder.save_adapters(run.path / ADAPTERS_DIR)

        started = time.perf_counter()
        questions = subset(walks_with_graphs(data, train), config.stage2_questions, config.seed)
        heldout = [s for s in data.files.get(HELDOUT_FILE, []) if s.pair_type == PAIR_GRAPH]
        records = graph_records(data, stage2 + questions + heldout)
        vectors = node_vectors(embedder, records)
        images = embed_queries(embedder, data, stage2, config.image_px)
        graphs = graph_tensors(records[: len(stage2)], vectors)
        pools = [
            PairPool(
                PAIR_GRAPH, images, embed_positives(embedder, stage2), graphs, node_groups(stage2)
            )
        ]
        if questions:
            pools.append(
                PairPool(
                    PAIR_REASONING,
                    embed_queries(embedder, data, questions, config.image_px),
                    embed_positives(embedder, questions),
                    graph_tensors(records[len(stage2) : len(stage2) + len(questions)], vectors),
                    group_ids(s.positive for s in questions),
                )
            )
        model = GraphModel(embedder.dim, config.graph_dim, config.place_dim)
        _stage2(model, pools, config, generator, run, log)
        run.log(
            f"stage 2: {len(stage2)} image-graph pairs, {len(questions)} walks, {len(vectors)} nodes, "
            f"{config.stage2_steps} steps in {time.perf_counter() - started:.1f} s"
        )
        run.save_model(
            model.state_dict(),
            {
                "kind": "uge-graph",
                "image_dim": embedder.dim,
                "graph_dim": config.graph_dim,
                "place_dim": config.place_dim,
            },
        )

        fused = fused_embeddings(model, images, graphs)
        if heldout:  # the held-out district gets embeddings too (the dashboard maps every cell)
            fused = torch.cat(
                [
                    fused,
                    fused_embeddings(
                        model,
                        embed_queries(embedder, data, heldout, config.image_px),
                        graph_tensors(records[len(stage2) + len(questions) :], vectors),
                    ),
                ]
            )
        cells = np.array([int(s.meta["cell_id"]) for s in stage2 + heldout], dtype=np.int64)
        means = pd.DataFrame(fused.numpy()).groupby(cells).mean()
        matrix = means.to_numpy(np.float32, copy=True)
        matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        run.write_embeddings(means.index.to_numpy(np.int64), matrix)
        split = (
            pd.Series(["train"] * len(stage2) + ["heldout"] * len(heldout)).groupby(cells).first()
        )
        run.write_predictions(
            pd.DataFrame(
                {
                    "cell_id": means.index.to_numpy(np.int64),
                    "split": split.reindex(means.index).to_numpy(),
                    "true": np.nan,
                    "predicted": np.nan,
                }
            )
        )
        losses = run_losses(run.path)
        run.write_metrics(
            {
                "label": "uge",
                "stage1_final_loss": losses.get(1),
                "stage2_final_loss": losses.get(2),
                "stage1_samples": len(stage1),
                "stage2_samples": len(stage2),
                "cells": len(means),
            }
        )
    log(f"uge: run {run.run_id}")
    return run.run_id


def run_losses(path: Path) -> dict[int, float]:
    """Mean loss of each stage's last ten steps."""
    epochs = pd.read_csv(path / EPOCHS_FILE)
    return {
        int(stage): float(part["loss"].tail(10).mean()) for stage, part in epochs.groupby("stage")
    }
