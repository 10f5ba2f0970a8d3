"""``python -m train uge``: spatially grounded VLM embeddings (UrbanGraphEmbeddings), two stages.

Stage 1 trains LoRA adapters of a Qwen2-VL backbone with instruction-guided image-text InfoNCE
on UGData's caption and reasoning pairs (temperature 0.01, in-batch negatives; images of one
anchor node are not each other's negatives). Stage 2 freezes the embedder and trains a GATv2
graph encoder over each image's street subgraph, fused with the image embedding, against the
spatial captions. The run saves the adapters, the graph model, and per-cell embeddings (mean of
the fused embeddings of a cell's images) for the dashboard.

The backbone is a local checkpoint folder (``--vlm``, a real Qwen2-VL / Qwen2.5-VL on a GPU in
bf16); without one, a tiny Qwen2-VL is built once under ``DATA/cache/vlm/`` for CPU runs.

Under ``torchrun --nproc-per-node N`` (:mod:`core.distributed`) every rank draws the same
global batches and embeds its shard of each; the InfoNCE is taken over the whole batch gathered
from the ranks, DDP averages the gradients of the trainable parameters only (the captioning
pretraining's whole tiny model, then the LoRA adapters, then the graph model), the whole-set
embeddings of stage 2 and of the run are shared out and gathered in order, and rank 0 alone
logs and writes the run folder.

The graph model, its batching and the embedding of samples live in :mod:`core.models.uge_graph`
and :mod:`core.models.uge_run` (which also restores a run from its folder); here are the
training stages, the run writing and :func:`train_uge`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn
from typing_extensions import override

from core.configs import UGEConfig
from core.dataroot import DataRoot
from core.distributed import Ranks
from core.models.uge import IMAGE_TASK, QUESTION_TASK, TEXT_TASK, UGEEmbedder, info_nce
from core.models.uge_graph import (
    GraphModel,
    embed_node_texts,
    fused_embeddings,
    graph_file,
    graph_records,
    graph_tensors,
    node_texts,
)
from core.models.uge_run import (
    ADAPTERS_DIR,
    backbone_folder,
    embed_positives,
    embed_queries,
    load_images,
    settings,
)
from core.runs import RunWriter
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

T = TypeVar("T")

#: The stage a job's progress names while stage 2's graphs and images are embedded.
STAGE2_INPUTS = "embedding stage 2's graph nodes and images"


def vlm_folder(
    config: UGEConfig,
    log: Callable[[str], None] = print,
    data: UGData | None = None,
    ranks: Ranks | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """The backbone folder (:func:`~core.models.uge_run.backbone_folder`): ``config.vlm``, else
    the tiny Qwen2-VL after its captioning pretraining on this UGData (``data`` if already read;
    both made on first use and cached under ``DATA/cache/vlm/``). On several ranks rank 0 makes
    the tiny model and decides whether the pretraining is needed; then every rank takes part."""
    ranks = ranks or Ranks(config.device)
    missing: list[str] = []
    with ranks.main_first():  # rank 0 makes the tiny base model; the others then find it
        folder = backbone_folder(config, lambda base, _: missing.append(str(base)))
    missing = ranks.broadcast(missing)
    if missing:
        log(
            f"pretraining the tiny VLM on captions ({config.tiny_pretrain_steps} steps, cached in {folder})"
        )
        pretrain_captioning(
            missing[0],
            folder,
            data or read_ugdata(config.ugdata_folder, check_images=True),
            config.tiny_pretrain_steps,
            load_images,
            image_px=config.image_px,
            log=log,
            ranks=ranks,
            progress=progress,
        )
    return folder


def group_ids(keys: Iterable[Any]) -> torch.Tensor:
    """Integer ids of ``keys``: pairs sharing a key are not each other's negatives in InfoNCE."""
    return torch.from_numpy(pd.factorize(pd.Series(list(keys), dtype=str))[0])


def node_groups(samples: Sequence[UGSample]) -> torch.Tensor:
    """Group by anchor node: images of one place share its captions."""
    return group_ids([s.meta.get("node_id", i) for i, s in enumerate(samples)])


class _Pairs(nn.Module):
    """Both sides of a stage-1 batch in one forward: DDP expects one forward per step."""

    def __init__(self, embedder: UGEEmbedder) -> None:
        super().__init__()
        self.embedder = embedder

    @override
    def forward(
        self, queries: dict[str, torch.Tensor], texts: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedder(queries), self.embedder(texts)


def _stage1(
    embedder: UGEEmbedder,
    data: UGData,
    samples: list[UGSample],
    config: UGEConfig,
    generator: torch.Generator,
    run: RunWriter,
    log: Callable[[str], None],
    ranks: Ranks,
) -> list[float]:
    """LoRA with image-text InfoNCE over each global batch; the loss of every step."""
    optimiser = torch.optim.AdamW(
        embedder.adapter_parameters().values(), lr=config.lr, weight_decay=0.0
    )
    # the LoRA matrices (and projection) only: the frozen backbone is every rank's own copy
    net = ranks.ddp(_Pairs(embedder), trainable_only=True)
    by_type = {t: [s for s in samples if s.pair_type == t] for t in (PAIR_CAPTION, PAIR_REASONING)}
    kinds = [t for t, s in by_type.items() if len(s) >= max(2, ranks.world)]
    embedder.train()
    losses = []
    for step in range(1, config.stage1_steps + 1):
        kind = kinds[step % len(kinds)]  # one modality per batch: captions, then reasoning
        pool = by_type[kind]
        rows = torch.randperm(len(pool), generator=generator)[: config.batch_size]
        batch = [pool[i] for i in rows.tolist()]
        mine = [batch[i] for i in ranks.shard(torch.arange(len(batch))).tolist()]
        images = load_images(data, mine, config.image_px)
        if kind == PAIR_REASONING:
            questions = [s.query.replace("<image>", "").strip() for s in mine]
            queries = embedder.prepare_images(images, QUESTION_TASK, questions)
        else:
            queries = embedder.prepare_images(images, IMAGE_TASK)
        query, text = net(queries, embedder.prepare_texts([s.positive for s in mine], TEXT_TASK))
        loss = info_nce(
            ranks.gather_batch(query, len(batch)),
            ranks.gather_batch(text, len(batch)),
            config.temperature,
            node_groups(batch).to(query.device),
        )
        losses.append(
            _step(
                optimiser,
                loss,
                ranks.world,
                run,
                log,
                stage=1,
                step=step,
                steps=config.stage1_steps,
                pair_type=kind,
            )
        )
    embedder.eval()
    return losses


def _step(
    optimiser: torch.optim.Optimizer,
    loss: torch.Tensor,
    world: int,
    run: RunWriter,
    log: Callable[[str], None],
    stage: int,
    step: int,
    steps: int,
    pair_type: str,
) -> float:
    """One optimiser step on the global batch's ``loss`` (the same on every rank; times the
    world size, the ranks' averaged gradients are its gradient); the loss goes to metrics.csv,
    and to progress and the log 20 times a stage. Returns the loss."""
    optimiser.zero_grad(set_to_none=True)
    (loss * world).backward()
    optimiser.step()
    value = float(loss.detach())
    run.log_epoch(stage=stage, step=step, pair_type=pair_type, loss=value)
    if step % max(1, steps // 20) == 0 or step == steps:
        run.progress(stage=stage, epoch=step, epochs=steps, loss=value)
        log(f"uge stage {stage} step {step}/{steps}: {pair_type} loss {value:.3f}")
    return value


def _stage2(
    model: GraphModel,
    pools: Sequence[PairPool],
    config: UGEConfig,
    generator: torch.Generator,
    run: RunWriter,
    log: Callable[[str], None],
    ranks: Ranks,
) -> list[float]:
    """Graph encoder + fusion against captions (place pairs) and answers (walks), in turn;
    the loss of every step."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.graph_lr)
    net = ranks.ddp(model)
    pools = [p for p in pools if len(p.queries) >= max(2, ranks.world)]
    device = ranks.device
    model.train()
    losses = []
    for step in range(1, config.stage2_steps + 1):
        pool = pools[step % len(pools)]
        rows = torch.randperm(len(pool.queries), generator=generator)[: config.batch_size]
        mine = ranks.shard(rows)
        fused = net(
            pool.queries[mine].to(device), {k: v[mine].to(device) for k, v in pool.graphs.items()}
        )
        loss = info_nce(
            ranks.gather_batch(fused, len(rows)),
            pool.answers[rows].to(device),
            config.temperature,
            pool.groups[rows].to(device),
        )
        losses.append(
            _step(
                optimiser,
                loss,
                ranks.world,
                run,
                log,
                stage=2,
                step=step,
                steps=config.stage2_steps,
                pair_type=pool.kind,
            )
        )
    model.eval()
    return losses


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


def _embed_all(
    ranks: Ranks, items: Sequence[T], embed: Callable[[list[T]], torch.Tensor]
) -> torch.Tensor:
    """``embed(items)`` in order on every rank, each rank embedding its share."""
    return torch.from_numpy(
        ranks.map_rows(len(items), lambda rows: embed([items[i] for i in rows.tolist()]).numpy())
    )


def train_uge(
    config: UGEConfig,
    log: Callable[[str], None] = print,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Both stages; writes the run folder and returns its id.

    Under ``torchrun`` every rank takes its shard of each global batch, the InfoNCE negatives
    come from the whole batch (:meth:`~core.distributed.Ranks.gather_batch`), DDP averages the
    gradients of the trainable parameters (LoRA, then the graph model), the whole-set
    embeddings are shared out and gathered in order, and rank 0 alone logs and writes the run.
    """
    ranks = Ranks(config.device)
    if not ranks.is_main:
        log = _quiet
    if config.batch_size < ranks.world:
        raise ValueError(
            f"a batch of {config.batch_size} cannot be shared by {ranks.world} processes"
        )
    root = DataRoot(config.data)
    data = read_ugdata(config.ugdata_folder, check_images=True)
    vlm = vlm_folder(config, log, data, ranks, progress)
    generator = seed_everything(config.seed)
    embedder = UGEEmbedder.from_folder(vlm, settings(config), device=ranks.device)
    if ranks.world > 1:  # each rank its own LoRA dropout masks (the adapters start as rank 0's)
        torch.manual_seed(config.seed + ranks.rank)
    train = data.files[TRAIN_FILE]
    stage1 = [s for s in train if s.pair_type in (PAIR_CAPTION, PAIR_REASONING)]
    stage2 = [s for s in train if s.pair_type == PAIR_GRAPH]
    if len(stage1) < 2 or len(stage2) < 2:
        raise ValueError(
            f"{config.ugdata_folder}: too few samples ({len(stage1)} stage-1, {len(stage2)} stage-2)"
        )
    resolved = asdict(config) | {
        "label": "uge",
        "device_resolved": str(ranks.device),
        "processes": ranks.world,
        "vlm_resolved": str(vlm),
        "ugdata_manifest": data.manifest.get("options", {}),
    }
    with ranks.run_writer(lambda: RunWriter(root.runs, "uge", resolved, progress=progress)) as run:
        run.progress(stage=1, epoch=0, epochs=config.stage1_steps)
        run.log(f"uge: device {ranks.device} x {ranks.world} process(es)")
        started = time.perf_counter()
        losses = {1: _stage1(embedder, data, stage1, config, generator, run, log, ranks)}
        run.log(f"stage 1: {config.stage1_steps} steps in {time.perf_counter() - started:.1f} s")
        if ranks.is_main:
            embedder.save_adapters(run.path / ADAPTERS_DIR)

        started = time.perf_counter()
        run.progress(stage=STAGE2_INPUTS, epoch=0, epochs=1)  # minutes on a whole city
        questions = subset(walks_with_graphs(data, train), config.stage2_questions, config.seed)
        heldout = [s for s in data.files.get(HELDOUT_FILE, []) if s.pair_type == PAIR_GRAPH]
        records = graph_records(data, stage2 + questions + heldout)
        texts = node_texts(records)
        vectors = dict(
            zip(
                texts,
                _embed_all(ranks, list(texts.values()), partial(embed_node_texts, embedder)),
                strict=True,
            )
        )

        def queries(samples: list[UGSample]) -> torch.Tensor:
            return _embed_all(
                ranks, samples, lambda part: embed_queries(embedder, data, part, config.image_px)
            )

        def positives(samples: list[UGSample]) -> torch.Tensor:
            return _embed_all(ranks, samples, partial(embed_positives, embedder))

        images = queries(stage2)
        graphs = graph_tensors(records[: len(stage2)], vectors)
        pools = [PairPool(PAIR_GRAPH, images, positives(stage2), graphs, node_groups(stage2))]
        if questions:
            pools.append(
                PairPool(
                    PAIR_REASONING,
                    queries(questions),
                    positives(questions),
                    graph_tensors(records[len(stage2) : len(stage2) + len(questions)], vectors),
                    group_ids(s.positive for s in questions),
                )
            )
        with torch.random.fork_rng(devices=[]):  # the same start in one process and on N ranks
            torch.manual_seed(config.seed)
            model = GraphModel(embedder.dim, config.graph_dim, config.place_dim)
        model = ranks.prepare(model)
        losses[2] = _stage2(model, pools, config, generator, run, log, ranks)
        run.log(
            f"stage 2: {len(stage2)} image-graph pairs, {len(questions)} walks, {len(vectors)} nodes, "
            f"{config.stage2_steps} steps in {time.perf_counter() - started:.1f} s"
        )
        model.cpu()
        run.save_model(
            model.state_dict(),
            {
                "kind": "uge-graph",
                "image_dim": embedder.dim,
                "graph_dim": config.graph_dim,
                "place_dim": config.place_dim,
            },
        )

        samples = stage2 + heldout  # the held-out district too (the dashboard maps every cell)
        if heldout:
            images = torch.cat([images, queries(heldout)])
            graphs = graph_tensors(records[: len(stage2)] + records[-len(heldout) :], vectors)
        fused = _embed_all(
            ranks,
            range(len(samples)),
            lambda rows: fused_embeddings(
                model, images[rows], {k: v[rows] for k, v in graphs.items()}
            ),
        )
        cells = np.array([int(s.meta["cell_id"]) for s in samples], dtype=np.int64)
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
        run.write_metrics(
            {
                "label": "uge",
                "stage1_final_loss": _final(losses[1]),
                "stage2_final_loss": _final(losses[2]),
                "stage1_samples": len(stage1),
                "stage2_samples": len(stage2),
                "cells": len(means),
            }
        )
    log(f"uge: run {run.run_id}")
    return run.run_id


def _quiet(line: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


def _final(losses: Sequence[float]) -> float | None:
    """Mean loss of a stage's last ten steps (as :func:`run_losses` reads it back)."""
    return float(np.mean(losses[-10:])) if losses else None
