"""The runs a fresh data root needs before the dashboard has predictions to show.

``make demo`` calls ``python -m train demo-runs --queue-embeddings true``: it trains the scene
filter and the perception encoder (the demo's stand-ins for Places365 and Place Pulse 2
weights), then the default fusion configurations, each only when no complete run of it exists
yet; then it queues a default contrastive and a default UGE run for the job worker (started if
none is alive), so the dashboard comes up at once and the neighbours page offers all three
methods when they finish.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from core.configs import FusionConfig, PerceptionConfig, SceneTrainConfig
from core.dataroot import DataRoot
from core.jobs import JobStore, start_worker, worker_alive
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


#: The embedding runs ``make demo`` queues: each kind with its default (CPU demo) schedule.
QUEUED_KINDS = ("contrastive", "uge")


def queue_embedding_runs(root: DataRoot, log=print) -> list[int]:
    """Queue a default run of each of :data:`QUEUED_KINDS` for the job worker, unless the root
    has a complete run or an active (queued or running) job of that kind, and start a worker
    when jobs were queued and none is alive. Returns the ids of the jobs queued."""
    store = JobStore.for_runs(root.runs)
    active = {job.kind for job in store.jobs(["queued", "running"])}
    queued = []
    for kind in QUEUED_KINDS:
        if kind in active or not list_runs(root.runs, kind=kind).empty:
            continue
        queued.append(store.enqueue(kind, {}))
        log(f"queued a default {kind} run as job #{queued[-1]} for the worker")
    if queued and not worker_alive(root.runs):
        start_worker(root.root)
        log(f"started a worker; its log: {root.runs / '.jobs' / 'worker.log'}")
    return queued
