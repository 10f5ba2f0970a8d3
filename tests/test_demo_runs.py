"""make demo's default runs: trained side by side, each after the encoders it reads, once."""

from __future__ import annotations

import shutil

from core.configs import FusionConfig
from core.dataroot import DataRoot
from core.runs import BACKBONE_FILE, list_runs
from train.demo_runs import DEFAULT_CONFIGURATIONS, ensure_default_runs


def test_default_runs_train_side_by_side_each_after_what_it_reads(tmp_path, tiny_demo):
    root = tmp_path / "city"
    shutil.copytree(tiny_demo, root, ignore=shutil.ignore_patterns("runs", "cache"))
    root = DataRoot(root)
    base = FusionConfig(epochs=2, block_size=300.0, aerial_px=32)  # a schedule the tiny city fits
    lines = []
    fusion_ids = ensure_default_runs(
        root, device="cpu", log=lines.append, processes=2, quiet=True, base=base
    )

    runs = list_runs(root.runs).set_index("run_id")
    assert sorted(runs["kind"]) == ["fusion"] * 3 + ["perception", "scene"]
    (scene,) = runs.index[runs["kind"] == "scene"]
    (perception,) = runs.index[runs["kind"] == "perception"]
    weights = str(root.runs / perception / BACKBONE_FILE)
    fusion = runs.loc[fusion_ids]
    assert fusion["config.label"].tolist() == [c["name"] for c in DEFAULT_CONFIGURATIONS]
    # each configuration names exactly the encoders it reads
    assert fusion["config.scene_run"].fillna("").tolist() == ["", "", scene]
    assert fusion["config.ground_weights"].fillna("").tolist() == ["", weights, weights]
    assert set(fusion["config.epochs"]) == {2}

    # both encoders started at once; each fusion run once the encoders it reads were done
    assert lines.index("scene: training") < lines.index(f"scene: run {scene}")
    assert lines.index("perception: training") < lines.index(f"scene: run {scene}")
    assert lines.index("aerial: training") < lines.index(f"perception: run {perception}")
    for name, needs in [
        ("aerial+gsv", [f"perception: run {perception}"]),
        ("aerial+flickr(building)", [f"scene: run {scene}", f"perception: run {perception}"]),
    ]:
        assert all(lines.index(f"{name}: training") > lines.index(line) for line in needs)

    # a second call finds every run and trains nothing
    again = []
    assert ensure_default_runs(root, "cpu", again.append, quiet=True, base=base) == fusion_ids
    assert all(line.endswith(" exists") for line in again) and len(again) == 5
    assert len(list_runs(root.runs)) == len(runs)
