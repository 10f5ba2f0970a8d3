"""core.configs: the trainers' configs, the shipped schedules, reading a run's config back."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict

import pytest
import yaml

from core.configs import (
    ContrastiveConfig,
    FusionConfig,
    SceneTrainConfig,
    UGEConfig,
    schedule_file,
)
from core.pairs import PairConfig
from core.scenes import SceneFilterConfig

CONFIGS = {"fusion": FusionConfig, "contrastive": ContrastiveConfig, "uge": UGEConfig}


@pytest.mark.parametrize("command", list(CONFIGS))
def test_the_defaults_are_the_shipped_demo_schedule(command):
    demo = yaml.safe_load(schedule_file(command, "demo").read_text())
    defaults = asdict(CONFIGS[command]())
    assert demo and {k: defaults[k] for k in demo} == demo


@pytest.mark.parametrize("command", list(CONFIGS))
def test_the_paper_schedule_is_a_valid_config_that_differs(command):
    paper = yaml.safe_load(schedule_file(command, "paper").read_text())
    config = CONFIGS[command](**paper)
    assert {k: getattr(config, k) for k in paper} == paper
    assert paper != yaml.safe_load(schedule_file(command, "demo").read_text())


def test_an_unknown_schedule_names_the_shipped_ones():
    with pytest.raises(
        FileNotFoundError,
        match=r"no schedule 'nope'; the schedules are \['fusion-demo', 'fusion-paper'\]",
    ):
        schedule_file("fusion", "nope")


def test_a_run_config_reads_back_without_its_derived_values():
    saved = asdict(ContrastiveConfig(objective="unified", seed=4)) | {"label": "x"}
    config = ContrastiveConfig.from_dict(yaml.safe_load(yaml.safe_dump(saved)))
    assert config == ContrastiveConfig(objective="unified", seed=4)
    assert isinstance(config.pairs, PairConfig)
    scene = SceneTrainConfig.from_dict(asdict(SceneTrainConfig(px=48)))
    assert isinstance(scene.filter, SceneFilterConfig) and scene.px == 48
    with pytest.raises(ValueError, match="needs --scene-run"):
        FusionConfig.from_dict({"ground": "flickr", "flickr_subset": "building"})


def test_the_configs_import_neither_torch_nor_the_geo_stack():
    code = (
        "import sys, core.configs, core.ingest.config; "
        "print(sorted(m for m in ('torch', 'geopandas', 'rasterio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
