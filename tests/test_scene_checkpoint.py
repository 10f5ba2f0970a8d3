"""Scoring with a user's scene classifier checkpoint (Places365 layout), no training."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from core.configs import SceneTrainConfig
from core.dataroot import DataRoot
from core.models.backbones import create_backbone
from core.models.scene_filter import load_scene_classifier, read_scene_names
from core.runs import load_run
from core.scenes import SceneFilterConfig, filter_config, scores_path
from train.scene import train_scene_filter


@pytest.fixture
def places_like(tmp_path):
    """A checkpoint in the Places365 release layout: torchvision keys under module., an fc head."""
    backbone = create_backbone("convnet_small", seed=4)
    head = torch.nn.Linear(backbone.num_features, 3)
    state = {f"module.{k}": v for k, v in backbone.state_dict().items()}
    state |= {"module.fc.weight": head.weight.detach(), "module.fc.bias": head.bias.detach()}
    path = tmp_path / "places.pth.tar"
    torch.save({"epoch": 90, "state_dict": state}, path)
    names = tmp_path / "categories.txt"
    names.write_text("/a/apartment_building/outdoor 0\n/b/beach 1\n/k/kitchen 2\n")
    return path, names, backbone, head


def test_places_layout_loads_into_a_scene_classifier(places_like):
    path, names, backbone, head = places_like
    scenes = read_scene_names(names)
    assert scenes == ("apartment_building/outdoor", "beach", "kitchen")
    model = load_scene_classifier(path, "convnet_small", scenes).eval()
    x = torch.randn(2, 3, 32, 32)
    backbone.eval()
    torch.testing.assert_close(model(x), head(backbone(x)))


def test_head_with_the_wrong_number_of_scenes_is_a_clear_error(places_like):
    path, *_ = places_like
    with pytest.raises(
        ValueError, match=r"places.pth.tar: .*head.weight: expected \(4, 128\), found \(3, 128\)"
    ):
        load_scene_classifier(path, "convnet_small", ("a", "b", "c", "d"))


def test_scoring_run_with_a_checkpoint(tiny_demo, places_like, tmp_path):
    path, names, *_ = places_like
    root = DataRoot(tiny_demo)
    config = SceneTrainConfig(
        data=str(tiny_demo),
        checkpoint=str(path),
        scene_names=str(names),
        filter=SceneFilterConfig(
            building_scenes=("apartment_building/outdoor",), indoor_scenes=("kitchen",)
        ),
    )
    with pytest.raises(
        ValueError, match="flickr_scene_labels.csv: scenes .* are not among the classifier's scenes"
    ):
        train_scene_filter(config, log=lambda _: None)  # the demo's labels use other names
    labels = root.scene_labels
    moved = tmp_path / "labels.csv"
    labels.rename(moved)
    try:
        run_id = train_scene_filter(config, log=lambda _: None)
    finally:
        moved.rename(labels)
    scores = pd.read_parquet(scores_path(root, run_id))
    assert list(scores.columns) == ["id", "p_apartment_building/outdoor", "p_beach", "p_kitchen"]
    assert load_run(root.runs / run_id).metrics == {"photos": len(scores)}
    assert filter_config(root, run_id).building_scenes == ("apartment_building/outdoor",)
