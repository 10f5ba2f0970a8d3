"""The runs a fresh data root needs before the dashboard has predictions to show.

``make demo`` calls ``python -m train demo-runs``: it trains the scene filter and the perception
encoder (the demo's stand-ins for Places365 and Place Pulse 2 weights), then the default fusion
configurations, each only when no complete run of it exists yet.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from core.configs import FusionConfig, PerceptionConfig, SceneTrainConfig
from core.dataroot import DataRoot
from core.runs import BACKBONE_FILE, list_runs
from train.fusion import train_fusion
from train.perception import train_perception
from train.scene import train_scene_filter

DEFAULT_CONFIGURATIONS = (
    {"name": "aerial", "ground": None},
    {"name": "aerial+gsv", "ground": "gsv"},
    {"name": "aerial+flickr(building)", "ground": "flickr", "flickr_subset": "building"},
)


@dataclass
class Encoders:
    """The trained ground encoders of a data root."""

    scene_run: str
    perception_run: str
    scene_weights: str
    perception_weights: str


def _latest(root: DataRoot, kind: str, **config) -> str | None:
    runs = list_runs(root.runs, kind=kind)
    for key, value in config.items():
        column = f"config.{key}"
        if column not in runs:
            return None
        runs = runs[runs[column].isna() if value is None else runs[column] == value]
    return None if runs.empty else str(runs["run_id"].iloc[0])


def ensure_encoders(root: DataRoot, device: str = "auto", log=print) -> Encoders:
    """The latest scene filter and perception runs, training each one that is missing."""
    scene = _latest(root, "scene") or train_scene_filter(
        SceneTrainConfig(data=str(root.root), device=device), log
    )
    perception = _latest(root, "perception") or train_perception(
        PerceptionConfig(data=str(root.root), device=device), log
    )
    return Encoders(
        scene,
        perception,
        str(root.runs / scene / BACKBONE_FILE),
        str(root.runs / perception / BACKBONE_FILE),
    )


def ensure_default_runs(root: DataRoot, device: str = "auto", log=print) -> list[str]:
    """Run ids of the default fusion configurations, training the missing ones."""
    encoders = ensure_encoders(root, device, log)
    base = FusionConfig(
        data=str(root.root),
        device=device,
        scene_run=encoders.scene_run,
        ground_weights=encoders.perception_weights,
    )
    run_ids = []
    for changes in DEFAULT_CONFIGURATIONS:
        config = replace(base, **changes)
        existing = _latest(
            root,
            "fusion",
            label=config.label,
            target=config.target,
            epochs=config.epochs,
            seed=config.seed,
            scene_run=config.scene_run,
            ground_weights=config.ground_weights,
        )
        if existing:
            log(f"{config.label}: run {existing} exists")
            run_ids.append(existing)
        else:
            run_ids.append(train_fusion(config, log))
    return run_ids
