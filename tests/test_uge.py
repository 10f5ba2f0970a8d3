"""UGE end to end on the tiny demo city: UGData, both training stages, restore, UGBench, CLI."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from core.configs import UGEConfig
from core.dataroot import DataRoot
from core.downstream import candidate_sets, paired_difference, ranking_metrics
from core.models.uge_graph import fused_embeddings, graph_records, graph_tensors, node_vectors
from core.models.uge_run import PRETRAINING_MARKER, embed_queries, restore
from core.runs import load_run
from core.ugdata import PAIR_GRAPH, TRAIN_FILE, read_ugdata
from train.cli import main
from train.uge import STAGE2_INPUTS, train_uge
from train.uge_bench import BenchResult, run_bench, stage_gains, write_report
from train.uge_pretrain import PRETRAINING_STAGE


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_demo):
    root = tmp_path_factory.mktemp("uge") / "city"
    shutil.copytree(tiny_demo, root, ignore=shutil.ignore_patterns("runs", "cache"))
    assert (
        main(["ugdata", "--data", str(root), "--max-images", "300", "--holdout-district", "Oost"])
        == 0
    )
    config = UGEConfig(
        data=str(root),
        tiny_pretrain_steps=3,
        stage1_steps=4,
        stage2_steps=10,
        stage2_questions=20,
        batch_size=8,
        device="cpu",
    )
    progress = []
    run_id = train_uge(config, log=lambda _: None, progress=progress.append)
    PROGRESS[run_id] = progress
    return root, config, run_id


#: What each run of the module told its job's progress, in order.
PROGRESS: dict[str, list[dict]] = {}


def test_a_run_saves_adapters_graph_model_and_cell_embeddings(trained):
    root, config, run_id = trained
    run = load_run(DataRoot(root).runs / run_id)
    assert (run.path / "adapters" / "adapter_model.safetensors").is_file()
    assert run.model_metadata()["kind"] == "uge-graph"
    ids, matrix = run.embeddings()
    data = read_ugdata(config.ugdata_folder)
    cells = {
        int(s.meta["cell_id"]) for f in data.files.values() for s in f if s.pair_type == PAIR_GRAPH
    }
    assert set(ids) == cells
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, rtol=1e-5)
    assert set(run.predictions()["split"]) == {"train", "heldout"}
    assert run.epochs["stage"].tolist() == [1] * 4 + [2] * 10
    # stage 2 trains on place captions and on walks through the start node's graph, in turn
    assert set(run.epochs.loc[run.epochs["stage"] == 2, "pair_type"]) == {
        "stage2_image_graph",
        "stage1_spatial_reasoning",
    }
    # the backbone is the tiny model after its captioning pretraining, cached for later runs
    backbone = DataRoot(root).cache / "vlm"
    pretrained = [p for p in backbone.iterdir() if (p / PRETRAINING_MARKER).is_file()]
    assert [p.name for p in pretrained] == [
        f"tiny-qwen2vl-captions-3-{p.name.rsplit('-', 1)[1]}" for p in pretrained
    ]
    assert run.config["vlm_resolved"] == str(pretrained[0])
    # a job's progress (the sidebar) follows the pretraining, then the stages' steps
    reported = [(p.get("stage"), p.get("epoch")) for p in PROGRESS[run_id]]
    assert reported[:3] == [(PRETRAINING_STAGE, 1), (PRETRAINING_STAGE, 2), (PRETRAINING_STAGE, 3)]
    stages = [r for r in reported[3:] if r[0] != STAGE2_INPUTS]
    assert stages == sorted(set(stages)) and stages[-1] == (2, 10)
    between = reported.index((STAGE2_INPUTS, 0))
    assert reported[between - 1] == (1, 4) and reported[between + 1][0] == 2


def test_restored_stage_2_reproduces_the_run_embeddings(trained):
    root, config, run_id = trained
    run = load_run(DataRoot(root).runs / run_id)
    data = read_ugdata(config.ugdata_folder)
    samples = [s for s in data.files[TRAIN_FILE] if s.pair_type == PAIR_GRAPH]
    cell = int(samples[0].meta["cell_id"])
    mine = [
        s
        for f in data.files.values()
        for s in f
        if s.pair_type == PAIR_GRAPH and int(s.meta["cell_id"]) == cell
    ]
    embedder, model = restore(run, config, stage=2)
    records = graph_records(data, mine)
    graphs = graph_tensors(records, node_vectors(embedder, records))
    fused = fused_embeddings(model, embed_queries(embedder, data, mine, config.image_px), graphs)
    expected = torch.nn.functional.normalize(fused.mean(0), dim=0).numpy()
    ids, matrix = run.embeddings()
    np.testing.assert_allclose(matrix[list(ids).index(cell)], expected, atol=1e-4)
    stage0, _ = restore(run, config, stage=0)
    assert not stage0.adapter_parameters()


def test_restore_needs_the_cached_backbone_it_cannot_pretrain(trained):
    # core restores without the trainer: a missing pretrained backbone is an error, not a
    # captioning pretraining started from the dashboard
    root, config, run_id = trained
    run = load_run(DataRoot(root).runs / run_id)
    with pytest.raises(FileNotFoundError, match="pretrained tiny VLM is missing"):
        restore(run, replace(config, tiny_pretrain_steps=config.tiny_pretrain_steps + 1), stage=1)


def test_ugbench_reports_every_task_for_each_stage_and_split(trained, tmp_path):
    root, _, run_id = trained
    result = run_bench(DataRoot(root), run_id, candidates=5, max_queries=40)
    results = result.summary
    assert sorted(set(zip(results["stage"], results["split"], strict=True))) == [
        (s, p) for s in (0, 1, 2) for p in ("heldout", "train")
    ]
    for task in ("geolocation", "retrieval", "grounding"):
        assert results[f"{task}_mrr"].between(0.2, 1.0).all(), task
        assert (results[f"{task}_candidates"] == 5).all()
        # the per-query ranks are the ones the metrics summarise
        for (stage, split), part in result.query_ranks.query("task == @task").groupby(
            ["stage", "split"]
        ):
            row = results[(results["stage"] == stage) & (results["split"] == split)]
            assert (1 / part["rank"]).mean() == pytest.approx(row[f"{task}_mrr"].item())
    csv, md = write_report(result, tmp_path, f"UGBench of {run_id}")
    assert "| 2 | heldout |" in md.read_text() and "one run" in md.read_text()
    assert "| grounding | heldout | 2 vs 1 |" in md.read_text()
    # seeds: mean ± std per stage and split
    other = results.assign(**{"geolocation_hit@1": results["geolocation_hit@1"] + 0.2})
    both = pd.concat([results.assign(run="a", seed=0), other.assign(run="b", seed=1)])
    _, md = write_report(BenchResult(both, result.query_ranks), tmp_path / "seeds", "seeds")
    row = next(line for line in md.read_text().splitlines() if line.startswith("| 1 | train |"))
    mean, std = (
        results.loc[
            (results["stage"] == 1) & (results["split"] == "train"), "geolocation_hit@1"
        ].item()
        + 0.1,
        0.2 / 2**0.5,
    )
    assert row.split(" | ")[2] == f"{mean:.3f} ± {std:.3f}"
    assert "mean ± std over 2 runs (seeds 0, 1)" in md.read_text()
    out = tmp_path / "cli"
    assert (
        main(
            [
                "uge-bench",
                run_id,
                "--data",
                str(root),
                "--candidates",
                "3",
                "--max-queries",
                "10",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "ugbench.md").read_text().startswith(f"# UGBench of {run_id}")


def test_stage_gains_pair_queries_across_stages():
    # query 0 moves from rank 2 to rank 1 at stage 1; query 1 stays at rank 1; stage 2 loses both
    ranks = pd.DataFrame(
        {
            "stage": [0, 0, 1, 1, 2, 2],
            "split": "heldout",
            "task": "geolocation",
            "query": [0, 1] * 3,
            "rank": [2, 1, 1, 1, 4, 2],
        }
    )
    gains = stage_gains(ranks).set_index("comparison")
    assert gains.loc["1 vs 0", "delta_mrr"] == pytest.approx(0.25)
    assert gains.loc["1 vs 0", "delta_hit@1"] == pytest.approx(0.5)
    assert gains.loc["2 vs 1", "delta_mrr"] == pytest.approx(((0.25 - 1) + (0.5 - 1)) / 2)
    low, high = gains.loc["2 vs 1", ["delta_mrr_low", "delta_mrr_high"]]
    assert -0.75 <= low <= high <= -0.5
    mean, low, high = paired_difference(np.zeros(200), np.full(200, 0.1))
    assert mean == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1)


def test_ranking_metrics_on_a_constructed_case():
    similarity = np.array([[0.9, 0.1, 0.2], [0.1, 0.5, 0.3], [0.2, 0.3, 0.1]])
    result = ranking_metrics(similarity, ks=(1, 2, 3))
    assert result["hit@1"] == pytest.approx(1 / 3) and result["hit@2"] == pytest.approx(2 / 3)
    assert result["hit@3"] == 1.0 and result["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)


def test_candidates_avoid_the_querys_own_group():
    groups = ["a", "a", "b", "c", "d", "d"]
    sets = candidate_sets(groups, k=3, seed=0)
    assert sets[:, 0].tolist() == list(range(6))
    for i, row in enumerate(sets):
        assert all(groups[j] != groups[i] for j in row[1:])
        assert len(set(row)) == 3


def test_the_neighbour_page_ranks_cells_by_a_text_query(trained, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from core.neighbours import EmbeddingIndex
    from dashboard.text_query import text_vector
    from tests.test_dashboard import APP

    root, _, run_id = trained
    monkeypatch.setenv("STADSBEELD_DATA", str(root))
    monkeypatch.setenv("STADSBEELD_START_WORKER", "0")
    st.cache_data.clear()
    st.cache_resource.clear()
    app = AppTest.from_file(APP, default_timeout=120).run()
    app.switch_page("views/neighbours.py").run()
    assert app.selectbox(key="nb_kind").value == "uge"
    app.slider(key="nb_k").set_value(5).run()
    app.text_input(key="nb_text").input("green street near water in Oost").run()
    assert not app.exception
    table = app.dataframe[0].value
    run = load_run(DataRoot(root).runs / run_id)
    expected = EmbeddingIndex(*run.embeddings()).search(
        text_vector(str(run.path), "green street near water in Oost"), 5
    )
    assert table["cell_id"].tolist() == expected["cell_id"].tolist()
    assert any("best match" in m.value for m in app.markdown)
