"""The runs a fresh data root needs before the dashboard has predictions to show.

``make demo`` calls ``python -m train demo-runs --queue-embeddings true``: it trains the scene
filter and the perception encoder (the demo's stand-ins for Places365 and Place Pulse 2
weights) and the default fusion configurations, each only when no complete run of it exists
yet, two at a time in processes of their own, each as soon as the encoders it reads exist;
then it queues a default contrastive and a default UGE run for the job worker (started if
none is alive), so the dashboard comes up at once and the neighbours page offers all three
methods when they finish.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import (
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import dataclass, replace

from core.configs import FusionConfig, PerceptionConfig, SceneTrainConfig
from core.dataroot import DataRoot
from core.jobs import JobStore, start_worker, worker_alive
from core.runs import BACKBONE_FILE, list_runs
from train.common import quiet as quiet_log
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


#: Each default run, with the runs it needs first: the fusion configurations read the encoders'
#: outputs (aerial reads neither; Flickr's building subset needs the scene filter's scores and
#: every ground branch the perception encoder's weights).
DEFAULT_RUNS: dict[str, tuple[str, ...]] = {
    "scene": (),
    "perception": (),
    "aerial": (),
    "aerial+gsv": ("perception",),
    "aerial+flickr(building)": ("scene", "perception"),
}


def ensure_default_runs(
    root: DataRoot,
    device: str = "auto",
    log=print,
    processes: int = 2,
    quiet: bool = False,
    base: FusionConfig | None = None,
) -> list[str]:
    """Run ids of the default fusion configurations, training the missing ones and the
    encoders they need.

    The missing runs are trained ``processes`` at a time, each as soon as the runs it needs
    exist, in processes of their own that share the cores (``cpu_count // processes``
    threads each): small CPU trainers scale poorly with threads, and on two cores two
    one-thread trainers side by side do about 1.4 times the work of one two-thread trainer.
    ``quiet`` silences the trainers' lines (theirs are printed by their own processes);
    ``base`` is the fusion runs' schedule (default: the demo schedule, ``FusionConfig()``).
    """
    base = base or FusionConfig()
    made: dict[str, str] = {}
    running: dict[Future, str] = {}
    threads = max(1, (os.cpu_count() or 1) // processes)
    with (
        ProcessPoolExecutor(
            processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_torch_threads,
            initargs=(threads,),
        )
        if processes > 1
        else ThreadPoolExecutor(1)
    ) as pool:
        while len(made) < len(DEFAULT_RUNS):
            for name, needs in DEFAULT_RUNS.items():
                if name in made or name in running.values() or not set(needs) <= set(made):
                    continue
                kind, config = _default_config(root, name, device, made, base)
                existing = _latest(root, kind, **_identity(kind, config))
                if existing:
                    log(f"{name}: run {existing} exists")
                    made[name] = existing
                else:
                    log(f"{name}: training")
                    running[pool.submit(_train, kind, config, quiet)] = name
            if running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = running.pop(future)
                    made[name] = future.result()
                    log(f"{name}: run {made[name]}")
    return [made[c["name"]] for c in DEFAULT_CONFIGURATIONS]


def _torch_threads(threads: int) -> None:
    """Give this process ``threads`` intra-op threads (a default run's process)."""
    import torch

    torch.set_num_threads(threads)


def _default_config(
    root: DataRoot, name: str, device: str, made: dict[str, str], base: FusionConfig
) -> tuple[str, SceneTrainConfig | PerceptionConfig | FusionConfig]:
    """The kind and configuration of default run ``name``, given the runs ``made`` so far and
    the fusion runs' ``base`` schedule."""
    if name == "scene":
        return "scene", SceneTrainConfig(data=str(root.root), device=device)
    if name == "perception":
        return "perception", PerceptionConfig(data=str(root.root), device=device)
    changes = next(c for c in DEFAULT_CONFIGURATIONS if c["name"] == name)
    needs = DEFAULT_RUNS[name]
    return "fusion", replace(
        base,
        data=str(root.root),
        device=device,
        scene_run=made["scene"] if "scene" in needs else None,
        ground_weights=(
            str(root.runs / made["perception"] / BACKBONE_FILE) if "perception" in needs else None
        ),
        **changes,
    )


def _identity(kind: str, config) -> dict:
    """The settings a complete run must share with ``config`` to be reused: for fusion, those
    the configuration uses (an aerial run of an older root that recorded encoders is reused)."""
    if kind != "fusion":
        return {}
    identity = {
        "label": config.label,
        "target": config.target,
        "epochs": config.epochs,
        "seed": config.seed,
    }
    if config.scene_run:
        identity["scene_run"] = config.scene_run
    if config.ground_weights:
        identity["ground_weights"] = config.ground_weights
    return identity


def _train(kind: str, config, quiet: bool) -> str:
    """Train one default run (in a process of :func:`ensure_default_runs`); its run id."""
    trainer = {"scene": train_scene_filter, "perception": train_perception, "fusion": train_fusion}
    return trainer[kind](config, quiet_log if quiet else print)


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
