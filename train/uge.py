"""``python -m train uge``: spatially grounded VLM embeddings (UrbanGraphEmbeddings), two stages.

Stage 1 trains LoRA adapters of a Qwen2-VL backbone with instruction-guided image-text InfoNCE
on UGData's caption and reasoning pairs (temperature 0.01, in-batch negatives; images of one
anchor node are not each other's negatives). Stage 2 freezes the embedder and trains a GATv2
graph encoder over each image's street subgraph, fused with the image embedding, against the
spatial captions. The run saves the adapters, the graph model, and per-cell embeddings (mean of
the fused embeddings of a cell's images) for the dashboard.

The backbone is a local checkpoint folder (``--vlm``, a real Qwen2-VL / Qwen2.5-VL on a GPU in
bf16); without one, a tiny Qwen2-VL is built once under ``DATA/cache/vlm/`` for CPU runs.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from safetensors.torch import load_file

from core.configs import UGEConfig
from core.dataroot import DataRoot
from core.models.graph_encoder import GraphEncoder, SpatialFusion
from core.models.uge import LoraSettings, UGEEmbedder, UGESettings, info_nce, make_tiny_qwen2vl
from core.runs import Run, RunWriter
from core.ugdata import (
    GRAPH_DIR,
    HELDOUT_FILE,
    PAIR_CAPTION,
    PAIR_GRAPH,
    PAIR_REASONING,
    TRAIN_FILE,
    GraphRecord,
    UGData,
    UGSample,
    graph_file_name,
    read_graph,
    read_ugdata,
)
from train.common import seed_everything
from train.uge_pretrain import MARKER as PRETRAINING_MARKER
from train.uge_pretrain import pretrain_captioning

IMAGE_TASK, TEXT_TASK, QUESTION_TASK, NODE_TASK = "location", "caption", "grounding", "node"
ADAPTERS_DIR = "adapters"
STRUCTURE_FEATURES = 2  # degree / 4 and hop / 2; the node text's embedding follows them
EDGE_FEATURES = 5  # length / 100 m, sin and cos of the bearing, dx and dy / 100 m


def vlm_folder(
    config: UGEConfig, log: Callable[[str], None] = print, data: UGData | None = None
) -> Path:
    """The backbone folder: ``config.vlm``, else the tiny Qwen2-VL after its captioning
    pretraining on this UGData (``data`` if already read; both made on first use and cached
    under ``DATA/cache/vlm/``)."""
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
        log(
            f"pretraining the tiny VLM on captions ({config.tiny_pretrain_steps} steps, cached in {folder})"
        )
        pretrain_captioning(
            base,
            folder,
            data or read_ugdata(config.ugdata_folder),
            config.tiny_pretrain_steps,
            load_images,
            image_px=config.image_px,
            log=log,
        )
    return folder


def settings(config: UGEConfig, lora: bool = True) -> UGESettings:
    """The embedder settings of a run (stage 0 has no adapters)."""
    pixels = config.image_px * config.image_px
    return UGESettings(
        pooling=config.pooling,
        dim=config.dim,
        image_min_pixels=pixels,
        image_max_pixels=pixels,
        lora=LoraSettings(r=config.lora_r, alpha=2 * config.lora_r) if lora else None,
    )


def load_images(data: UGData, samples: Sequence[UGSample], px: int) -> list[Image.Image]:
    """Each sample's first image as RGB at ``px`` x ``px``."""
    return [Image.open(data.image_path(s)).convert("RGB").resize((px, px)) for s in samples]


def graph_batch(
    records: Sequence[GraphRecord], node_vectors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Padded tensors of subgraphs for :class:`GraphEncoder` (both edge directions).

    A node's features are its degree and hop, then the embedding of its text (``node_vectors``,
    keyed by node id: the paper's nodes carry their category, neighbourhood and coordinates as
    text, so names in a caption can meet the same names on the graph).
    """
    n = max(len(r.nodes) for r in records)
    e = max(2 * len(r.edges) for r in records) or 1
    width = STRUCTURE_FEATURES + next(iter(node_vectors.values())).shape[0]
    batch = {
        "nodes": torch.zeros(len(records), n, width),
        "node_mask": torch.zeros(len(records), n, dtype=torch.bool),
        "xy": torch.zeros(len(records), n, 2),
        "edges": torch.zeros(len(records), e, 2, dtype=torch.long),
        "edge_mask": torch.zeros(len(records), e, dtype=torch.bool),
        "edge_attr": torch.zeros(len(records), e, EDGE_FEATURES),
        "centre": torch.zeros(len(records), dtype=torch.long),
    }
    for b, record in enumerate(records):
        index = {node["node_id"]: i for i, node in enumerate(record.nodes)}
        for i, node in enumerate(record.nodes):
            batch["nodes"][b, i, :STRUCTURE_FEATURES] = torch.tensor(
                [node.get("degree", 0) / 4, node.get("hop", 0) / 2]
            )
            batch["nodes"][b, i, STRUCTURE_FEATURES:] = node_vectors[node["node_id"]]
            batch["xy"][b, i] = torch.tensor(node["xy"], dtype=torch.float32)
        batch["node_mask"][b, : len(record.nodes)] = True
        batch["centre"][b] = index[record.center_node]
        for j, edge in enumerate(record.edges):
            bearing = np.radians(edge["bearing_deg"])
            forward = [
                edge["length_m"] / 100,
                np.sin(bearing),
                np.cos(bearing),
                edge["dx_m"] / 100,
                edge["dy_m"] / 100,
            ]
            backward = [forward[0], -forward[1], -forward[2], -forward[3], -forward[4]]
            for k, (pair, attr) in enumerate(
                (
                    ((edge["source"], edge["target"]), forward),
                    ((edge["target"], edge["source"]), backward),
                )
            ):
                batch["edges"][b, 2 * j + k] = torch.tensor([index[pair[0]], index[pair[1]]])
                batch["edge_attr"][b, 2 * j + k] = torch.tensor(attr, dtype=torch.float32)
                batch["edge_mask"][b, 2 * j + k] = True
    return batch


class GraphModel(torch.nn.Module):
    """Stage 2: the graph encoder and its fusion with the (frozen) image embedding."""

    def __init__(self, image_dim: int, graph_dim: int, place_dim: int = 0) -> None:
        super().__init__()
        self.encoder = GraphEncoder(
            STRUCTURE_FEATURES + image_dim,
            EDGE_FEATURES,
            hidden=graph_dim,
            out_dim=graph_dim,
            place_dim=place_dim,
        )
        self.fusion = SpatialFusion(image_dim, graph_dim)

    def forward(self, image: torch.Tensor, graphs: dict[str, torch.Tensor]) -> torch.Tensor:
        graph = self.encoder(
            graphs["nodes"],
            graphs["node_mask"],
            graphs["edges"],
            graphs["edge_mask"],
            graphs["edge_attr"],
            graphs["centre"],
            graphs["xy"],
        )
        return self.fusion(image, graph)


def group_ids(keys: Iterable[Any]) -> torch.Tensor:
    """Integer ids of ``keys``: pairs sharing a key are not each other's negatives in InfoNCE."""
    return torch.from_numpy(pd.factorize(pd.Series(list(keys), dtype=str))[0])


def node_groups(samples: Sequence[UGSample]) -> torch.Tensor:
    """Group by anchor node: images of one place share its captions."""
    return group_ids([s.meta.get("node_id", i) for i, s in enumerate(samples)])


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


def fused_embeddings(
    model: GraphModel, images: torch.Tensor, graphs: dict[str, torch.Tensor], batch_size: int = 256
) -> torch.Tensor:
    """Stage-2 embeddings of images with their subgraphs."""
    with torch.no_grad():
        return (
            torch.cat(
                [
                    model(
                        images[i : i + batch_size],
                        {k: v[i : i + batch_size] for k, v in graphs.items()},
                    )
                    for i in range(0, len(images), batch_size)
                ]
            )
            if len(images)
            else images
        )


def _pad_cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate padded graph batches of different widths."""
    out = {}
    for key in parts[0]:
        width = max(p[key].shape[1] for p in parts) if parts[0][key].ndim > 1 else None
        padded = []
        for p in parts:
            value = p[key]
            if width is not None and value.shape[1] < width:
                pad = torch.zeros(
                    (value.shape[0], width - value.shape[1], *value.shape[2:]), dtype=value.dtype
                )
                value = torch.cat([value, pad], 1)
            padded.append(value)
        out[key] = torch.cat(padded)
    return out


def graph_file(sample: UGSample) -> str:
    """A sample's street subgraph file: its own, else its anchor node's (where a walk starts)."""
    return (
        sample.graphs[0]
        if sample.graphs
        else f"{GRAPH_DIR}/{graph_file_name(str(sample.meta['node_id']))}"
    )


def walks_with_graphs(data: UGData, samples: Sequence[UGSample]) -> list[UGSample]:
    """The reasoning samples whose start node has a graph file (a graph that reaches into the
    held-out district is not written for the training split)."""
    return [
        s
        for s in samples
        if s.pair_type == PAIR_REASONING and (data.root / graph_file(s)).is_file()
    ]


def graph_records(data: UGData, samples: Sequence[UGSample]) -> list[GraphRecord]:
    """Each sample's subgraph; a file shared by several samples (one anchor node) is read once."""
    files: dict[str, GraphRecord] = {}
    for sample in samples:
        name = graph_file(sample)
        if name not in files:
            files[name] = read_graph(data.root / name)
    return [files[graph_file(sample)] for sample in samples]


def node_vectors(
    embedder: UGEEmbedder, records: Sequence[GraphRecord], batch_size: int = 128
) -> dict[str, torch.Tensor]:
    """The embedding of every node text in ``records``, by node id (each node embedded once)."""
    texts: dict[str, str] = {}
    for record in records:
        for node in record.nodes:
            texts.setdefault(node["node_id"], node["node_text"])
    ids = list(texts)
    with torch.no_grad():
        vectors = [
            embedder.embed_texts([texts[i] for i in ids[k : k + batch_size]], NODE_TASK)
            .float()
            .cpu()
            for k in range(0, len(ids), batch_size)
        ]
    return dict(zip(ids, torch.cat(vectors), strict=True)) if ids else {}


def graph_tensors(
    records: Sequence[GraphRecord], vectors: Mapping[str, torch.Tensor], batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Subgraphs as one padded batch (see :func:`graph_batch`)."""
    return _pad_cat(
        [
            graph_batch(records[i : i + batch_size], vectors)
            for i in range(0, len(records), batch_size)
        ]
    )


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
    data = read_ugdata(config.ugdata_folder)
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
    with RunWriter(root.runs, "uge", resolved, on_progress=progress) as run:
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
    epochs = pd.read_csv(path / "metrics.csv")
    return {
        int(stage): float(part["loss"].tail(10).mean()) for stage, part in epochs.groupby("stage")
    }


def restore(
    run: Run, config: UGEConfig | None = None, stage: int = 2
) -> tuple[UGEEmbedder, GraphModel | None]:
    """A UGE run's embedder (stage 0: the backbone without adapters) and graph model (stage 2)."""
    config = config or UGEConfig.from_dict(run.config)
    vlm = vlm_folder(config)
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
    model.load_state_dict(load_file(run.path / "model.safetensors"))
    return embedder, model.eval()
