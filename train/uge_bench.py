"""``python -m train uge-bench RUN``: UGBench on a UGE run, before training and after each stage.

Tasks (each on the training samples and on the held-out district, the paper's held-out cities):

- geolocation: an image ranks K candidate location captions (its own and K - 1 of other places);
- retrieval: a caption ranks K candidate images;
- grounding: an image with a spatial question (nearest landmark, distance and direction of a
  walk, the buurt at its end) ranks K candidate answers;
- perception: a linear probe (ridge, 5-fold) from the cell's mean embedding to its
  Leefbaarometer score; R² and Kendall's tau.

Hit@1/3/5/10 and MRR for the ranking tasks. Stage 0 is the backbone without adapters, stage 1
adds the LoRA adapters, stage 2 fuses the street subgraph into the image side (for grounding, the
subgraph around the walk's start).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from core.configs import UGEConfig
from core.dataroot import DataRoot
from core.downstream import candidate_sets, paired_difference, ranking_metrics, ranks
from core.io import write_atomic
from core.metrics import kendall_tau_b, r2
from core.models.uge_graph import fused_embeddings, graph_records, graph_tensors, node_vectors
from core.models.uge_run import embed_positives, embed_queries, restore
from core.runs import load_run, run_path
from core.sources.lbm import read_lbm
from core.ugdata import HELDOUT_FILE, PAIR_GRAPH, TRAIN_FILE, read_ugdata
from train.uge import subset, vlm_folder, walks_with_graphs

STAGES = (0, 1, 2)


def _similarity(queries: torch.Tensor, answers: torch.Tensor, groups: list, k: int) -> np.ndarray:
    """(n, k) cosine similarities to each query's candidates, its right answer first; the
    candidates depend only on ``groups``, so every stage ranks the same sets."""
    candidates = candidate_sets(groups, k)
    return np.einsum("nd,nkd->nk", queries.numpy(), answers.numpy()[candidates])


@dataclass
class BenchResult:
    """UGBench of one or more runs: metrics per (stage, split) and each query's rank per task."""

    summary: pd.DataFrame
    query_ranks: pd.DataFrame


def _perception(root: DataRoot, cells: np.ndarray, embeddings: np.ndarray) -> dict[str, float]:
    labels = read_lbm(root.scores, root.lbm_grid)
    latest = labels[labels["jaar"] == labels["jaar"].max()].set_index("cell_id")["lbm"].dropna()
    frame = pd.DataFrame(embeddings).groupby(cells).mean()
    frame = frame[frame.index.isin(latest.index)]
    if len(frame) < 20:
        return {
            "perception_r2": float("nan"),
            "perception_tau": float("nan"),
            "perception_cells": len(frame),
        }
    target = latest.reindex(frame.index).to_numpy()
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    predicted = cross_val_predict(
        model, frame.to_numpy(), target, cv=KFold(5, shuffle=True, random_state=0)
    )
    return {
        "perception_r2": r2(predicted, target),
        "perception_tau": kendall_tau_b(predicted, target),
        "perception_cells": int(len(frame)),
    }


def run_bench(
    root: DataRoot, run_id: str, candidates: int = 10, max_queries: int = 3000
) -> BenchResult:
    """Every task's metrics per (stage, split), and each query's rank (the same queries and
    candidates at every stage, so stages compare query by query)."""
    run = load_run(run_path(root.runs, run_id))
    config = UGEConfig.from_dict(run.config)
    data = read_ugdata(config.ugdata_folder, check_images=True)
    rows, query_ranks = [], []
    vlm = vlm_folder(config, data=data)  # pretrained again if its cached folder is gone
    for stage in STAGES:
        embedder, model = restore(run, config, stage=stage, vlm=vlm)
        for split, name in (("train", TRAIN_FILE), ("heldout", HELDOUT_FILE)):
            samples = data.files.get(name, [])
            places = subset([s for s in samples if s.pair_type == PAIR_GRAPH], max_queries, 0)
            questions = subset(walks_with_graphs(data, samples), max_queries, 1)
            if len(places) < 2:
                continue
            images = embed_queries(embedder, data, places, config.image_px)
            asked = (
                embed_queries(embedder, data, questions, config.image_px)
                if len(questions) >= 2
                else None
            )
            if model is not None:
                records = graph_records(data, places + questions)
                vectors = node_vectors(embedder, records)
                images = fused_embeddings(
                    model, images, graph_tensors(records[: len(places)], vectors)
                )
                if asked is not None:  # a walk's question meets the street graph where it starts
                    asked = fused_embeddings(
                        model, asked, graph_tensors(records[len(places) :], vectors)
                    )
            captions = embed_positives(embedder, places)
            groups = [s.meta.get("node_id") for s in places]
            similarities = {
                "geolocation": _similarity(images, captions, groups, candidates),
                "retrieval": _similarity(captions, images, groups, candidates),
            }
            if asked is not None:
                answers = embed_positives(embedder, questions)
                answer_groups = [
                    s.positive for s in questions
                ]  # the same answer twice is no negative
                similarities["grounding"] = _similarity(asked, answers, answer_groups, candidates)
            row = {"stage": stage, "split": split}
            for task, similarity in similarities.items():
                row |= {f"{task}_{k}": v for k, v in ranking_metrics(similarity).items()}
                rank = ranks(similarity)
                query_ranks.append(
                    pd.DataFrame(
                        {
                            "stage": stage,
                            "split": split,
                            "task": task,
                            "query": np.arange(len(rank)),
                            "rank": rank,
                        }
                    )
                )
            cells = np.array([int(s.meta["cell_id"]) for s in places])
            row |= _perception(root, cells, images.numpy())
            rows.append(row)
    return BenchResult(pd.DataFrame(rows), pd.concat(query_ranks, ignore_index=True))


def bench_runs(
    root: DataRoot, run_ids: list[str], candidates: int = 10, max_queries: int = 3000
) -> BenchResult:
    """:func:`run_bench` of each run, with ``run`` and ``seed`` columns."""
    summaries, query_ranks = [], []
    for run_id in run_ids:
        seed = load_run(run_path(root.runs, run_id)).config.get("seed")
        result = run_bench(root, run_id, candidates, max_queries)
        summaries.append(result.summary.assign(run=run_id, seed=seed))
        query_ranks.append(result.query_ranks.assign(run=run_id, seed=seed))
    return BenchResult(
        pd.concat(summaries, ignore_index=True), pd.concat(query_ranks, ignore_index=True)
    )


def stage_gains(query_ranks: pd.DataFrame) -> pd.DataFrame:
    """Per task and split, each stage against the one before: the mean change in reciprocal rank
    and in Hit@1 over the same queries (averaged over runs first), with 95% bootstrap intervals
    over queries."""
    frame = query_ranks.assign(
        rr=1.0 / query_ranks["rank"], hit1=(query_ranks["rank"] == 1).astype(float)
    )
    if "run" not in frame:
        frame = frame.assign(run="")
    rows = []
    for (task, split), part in frame.groupby(["task", "split"], sort=False):
        table = part.pivot_table(index=["run", "query"], columns="stage", values=["rr", "hit1"])
        per_query = table.groupby(level="query").mean()  # one paired value per query, over runs
        for before, after in zip(STAGES[:-1], STAGES[1:], strict=True):
            if ("rr", before) not in per_query or ("rr", after) not in per_query:
                continue
            row = {
                "task": task,
                "split": split,
                "comparison": f"{after} vs {before}",
                "queries": len(per_query),
            }
            for metric, name in (("rr", "mrr"), ("hit1", "hit@1")):
                mean, low, high = paired_difference(
                    per_query[(metric, before)], per_query[(metric, after)]
                )
                row |= {f"delta_{name}": mean, f"delta_{name}_low": low, f"delta_{name}_high": high}
            rows.append(row)
    return pd.DataFrame(rows)


def write_report(result: BenchResult, out: Path, title: str) -> tuple[Path, Path]:
    """``ugbench.csv`` (every run), ``ugbench_gains.csv`` and ``ugbench.md``: each task's headline
    metrics per stage and split (mean ± std over the runs, the seeds named), then each stage's
    paired gain over the one before."""
    results = result.summary
    csv = write_atomic(out / "ugbench.csv", lambda tmp: results.to_csv(tmp, index=False))
    columns = [
        c
        for c in (
            "geolocation_hit@1",
            "geolocation_mrr",
            "retrieval_hit@1",
            "retrieval_mrr",
            "grounding_hit@1",
            "grounding_mrr",
            "perception_r2",
            "perception_tau",
        )
        if c in results
    ]
    runs = results["run"].nunique() if "run" in results else 1
    seeds = sorted(results["seed"].unique().tolist()) if "seed" in results else []
    spread = (
        f"mean ± std over {runs} runs (seeds {', '.join(map(str, seeds))})"
        if runs > 1
        else "one run"
    )
    lines = [
        f"# {title}",
        "",
        "Stage 0: backbone without adapters; 1: LoRA stage; 2: with the street graph. "
        f"Ranking among the candidates in `candidates` columns of the CSV; {spread}.",
        "",
        "| stage | split | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for (stage, split), group in results.groupby(["stage", "split"], sort=False):
        cells = [
            f"{group[c].mean():.3f}" + (f" ± {group[c].std():.3f}" if len(group) > 1 else "")
            for c in columns
        ]
        lines.append(f"| {stage} | {split} | " + " | ".join(cells) + " |")
    gains = stage_gains(result.query_ranks)
    write_atomic(out / "ugbench_gains.csv", lambda tmp: gains.to_csv(tmp, index=False))
    lines += [
        "",
        "Paired gains: the same queries and candidates at both stages, reciprocal rank and Hit@1 "
        "averaged over the runs per query; 95% bootstrap intervals over queries.",
        "",
        "| task | split | stages | Δ MRR [95% CI] | Δ Hit@1 [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for row in gains.to_dict(orient="records"):
        lines.append(
            f"| {row['task']} | {row['split']} | {row['comparison']} | "
            + " | ".join(
                f"{row[f'delta_{m}']:+.3f} [{row[f'delta_{m}_low']:+.3f}, {row[f'delta_{m}_high']:+.3f}]"
                for m in ("mrr", "hit@1")
            )
            + " |"
        )
    md = write_atomic(out / "ugbench.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return csv, md
