"""Scene filter subsets, and training the demo's scene classifier and perception encoder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.configs import PerceptionConfig, SceneTrainConfig
from core.dataroot import DataRoot
from core.models.backbones import create_backbone
from core.runs import load_run
from core.scenes import SceneFilterConfig, scores_path, select
from train.perception import read_votes, train_perception
from train.scene import train_scene_filter

SCORES = pd.DataFrame(
    {
        "id": ["facade", "food", "boat", "people-before-facade"],
        "p_building": [0.9, 0.0, 0.1, 0.45],
        "p_street": [0.05, 0.0, 0.1, 0.1],
        "p_water": [0.05, 0.0, 0.8, 0.0],
        "p_park": [0, 0, 0, 0.0],
        "p_people": [0, 0.1, 0, 0.45],
        "p_food": [0, 0.8, 0, 0.0],
        "p_interior": [0, 0.1, 0, 0.0],
    }
)


@pytest.mark.parametrize(
    ("subset", "kept"),
    [
        ("all", [True, True, True, True]),
        ("outdoor", [True, False, True, True]),
        ("building", [True, False, False, False]),
    ],
)
def test_subsets(subset, kept):
    np.testing.assert_array_equal(select(SCORES, subset, SceneFilterConfig()), kept)


def test_threshold_is_config():
    lenient = SceneFilterConfig(threshold=0.4)
    np.testing.assert_array_equal(select(SCORES, "building", lenient), [True, False, False, True])


def test_bad_subset_or_missing_scene_columns():
    with pytest.raises(ValueError, match="unknown Flickr subset 'night'"):
        select(SCORES, "night", SceneFilterConfig())
    with pytest.raises(ValueError, match=r"lack columns \['p_facade'\]"):
        select(SCORES, "building", SceneFilterConfig(building_scenes=("facade",)))


def test_scene_filter_run_scores_every_photo(tiny_demo):
    root = DataRoot(tiny_demo)
    run_id = train_scene_filter(
        SceneTrainConfig(data=str(tiny_demo), epochs=8, lr=5e-3), log=lambda _: None
    )
    run = load_run(root.runs / run_id)
    assert run.metrics["held_out_accuracy"] > 0.35  # chance is 1/7, the largest class about 1/4
    scores = pd.read_parquet(scores_path(root, run_id))
    labels = pd.read_csv(root.scene_labels)
    assert set(scores["id"]) == set(labels["id"])
    probabilities = scores.filter(like="p_").to_numpy()
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=2e-3)
    backbone = create_backbone("convnet_small", weights=run.path / "backbone.safetensors")
    assert backbone.num_features == 128


def test_perception_run_gives_ground_weights(tiny_demo):
    root = DataRoot(tiny_demo)
    run_id = train_perception(PerceptionConfig(data=str(tiny_demo), epochs=1), log=lambda _: None)
    run = load_run(root.runs / run_id)
    assert 0.0 <= run.metrics["pair_accuracy_all"] <= 1.0
    assert {"pair_accuracy_safety", "pair_accuracy_beautiful"} <= set(run.metrics)
    create_backbone("convnet_small", weights=run.path / "backbone.safetensors")


def test_votes_with_unknown_winner_are_rejected(tmp_path):
    path = tmp_path / "votes.csv"
    pd.DataFrame(
        {"left_id": ["a"], "right_id": ["b"], "winner": ["draw"], "category": ["safety"]}
    ).to_csv(path)
    with pytest.raises(
        ValueError, match=r"votes.csv: winner must be one of \['equal', 'left', 'right'\]"
    ):
        read_votes(path, pd.Index(["a", "b"]))
