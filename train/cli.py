"""``stadsbeeld <command>`` (or ``python -m train <command>``): build data, train, evaluate, serve.

The command line is declared, not hand-written: jsonargparse builds each command's options from
the typed signature and Google-style docstring of its function below, and from the config
dataclass the function takes (:mod:`core.configs`: every field an option, its attribute
docstring the help). Every command takes ``--config FILE.yaml`` (option values; a run's own
``config.yaml`` repeats the run) and ``--print_config`` (the resolved options as YAML). Later
options override earlier ones, so ``--config`` first and single options after it.

Option names are jsonargparse's (``--aerial_backbone``). The spellings of the argparse command
line this replaced keep working (:func:`normalise`): dashes (``--aerial-backbone``), ``--no-X``
and bare ``--X`` for booleans, space- or comma-separated lists (``--seeds 0 1 2``), ``NAME=VALUE``
items for mappings (``--endpoint wmts=URL``), ``none`` for an empty optional value, and the
renamed options of :data:`ALIASES`.

Commands import their heavy modules (torch, the geo stack) only when they run, so ``--help``
is fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import typing
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentParser, Namespace, set_parsing_settings

from core.configs import (
    DERIVED_KEYS,
    OBJECTIVES,
    RULES,
    ChangeValidationConfig,
    ContrastiveConfig,
    FusionConfig,
    PerceptionConfig,
    PredictConfig,
    SceneTrainConfig,
    UGEConfig,
    schedule_file,
)
from core.dataroot import DataRoot
from core.demo.build import DemoConfig
from core.ingest.config import FetchConfig

set_parsing_settings(docstring_parse_attribute_docstrings=True)

PROG = "stadsbeeld"
#: Options renamed when the command line became declarative: old name -> option.
ALIASES = {
    "max_distance": "pairs.temporal_max_distance_m",
    "max_heading": "pairs.temporal_max_heading_deg",
    "min_gap_months": "pairs.temporal_min_gap_months",
    "spatial_min": "pairs.spatial_min_distance_m",
    "buffer": "pairs.spatial_buffer_m",
    "building_scenes": "filter.building_scenes",
    "indoor_scenes": "filter.indoor_scenes",
    "threshold": "filter.threshold",
}
#: Mapping options that also take bare values in this key order (``--loss-weights 1 0.5 1``).
ORDERED_KEYS = {"loss_weights": RULES}
Schedule = Literal["auto", "demo", "paper"]


def _default_data() -> str:
    return str(DataRoot.from_env().root)


# --- the commands ----------------------------------------------------------------------------


def demo(
    config: DemoConfig,
    out: str | None = None,
    if_missing: bool = False,
    force: bool = False,
    quiet: bool = False,
    force_delete_runs: bool = False,
) -> int:
    """Build the synthetic Amsterdam demo city (real file formats) and print its summary.

    Args:
        config: what to build.
        out: Output folder (default: ``STADSBEELD_DATA``, else data/demo).
        if_missing: Do nothing if the output is already built.
        force: Rebuild the output if it exists, keeping its trained runs and job database
            (runs/, moved into the new city).
        quiet: No progress bars.
        force_delete_runs: Rebuild the output if it exists and delete its runs/ (every trained
            run and the job database).
    """
    from core.demo import GENERATOR_VERSION, MANIFEST, build_demo
    from core.summary import summarize

    target = Path(out or _default_data())
    if (target / MANIFEST).exists() and if_missing:
        manifest = json.loads((target / MANIFEST).read_text())
        built = manifest["config"]
        wanted = {k: getattr(config, k) for k in ("seed", "extent", "flickr_photos")}
        differs = {k: built.get(k) for k, v in wanted.items() if built.get(k) != v}
        if differs:
            raise ValueError(
                f"{target} holds another demo city ({differs}); use --force to rebuild it or "
                "choose another --out"
            )
        print(f"demo city already built in {target} (remove it to rebuild)")
        if manifest.get("generator_version", 1) < GENERATOR_VERSION:
            print(
                f"note: {target} was built by demo generator {manifest.get('generator_version', 1)}; "
                f"generator {GENERATOR_VERSION} adds imagery for every year 2016..2024 and the 2022 "
                f"release (the Monitor page needs them): rebuild with `stadsbeeld demo --out "
                f"{target} --force` (runs trained on the old city stay, but describe it)"
            )
        return 0
    replace = force or force_delete_runs
    if target.exists() and not replace:
        raise FileExistsError(
            f"{target} already exists; use --force to rebuild it or --if-missing to keep it"
        )
    runs = DataRoot(target).runs
    count = sum(1 for p in runs.iterdir() if not p.name.startswith(".")) if runs.is_dir() else 0
    keep = () if force_delete_runs else (runs.name,)
    # --force: the new city replaces the old one only once complete (a failed build keeps it),
    # and takes over its runs/ unless --force_delete_runs
    manifest = build_demo(target, config, show_progress=not quiet, replace=replace, keep=keep)
    if runs.is_dir() and keep:
        print(f"kept {runs} ({count} entries; --force_delete_runs deletes them)")
    elif count:
        print(f"deleted {count} entries of {runs} (--force_delete_runs)", file=sys.stderr)
    print(f"built {target} in {manifest['elapsed_s']} s")
    print(summarize(target))
    return 0


def fetch(config: FetchConfig) -> int:
    """Build a real data root for a Dutch municipality from the public services.

    Fetches the outline (PDOK), prints a plan (requests, size, time, cost, licences), then the
    Leefbaarometer labels, grid, aerial mosaic, OSM streets, water and parks, Flickr photos and
    Street View views. Several municipalities (amsterdam,amstelveen,diemen), or all of a
    province (all --province Noord-Holland), make one root over their union. Resumable: rerun
    to continue. Keys come from FLICKR_API_KEY and GOOGLE_MAPS_API_KEY (+
    GOOGLE_MAPS_SIGNING_SECRET).

    Args:
        config: what to fetch.
    """
    import logging

    from core.ingest import run_fetch
    from core.sources.http import FetchError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("core.sources").setLevel(logging.INFO)
    try:
        return run_fetch(config)
    except FetchError as exc:  # the outline could not be fetched; the message is redacted
        print(f"error: {exc}", file=sys.stderr)
        return 2


def summary(data: str | None = None) -> int:
    """Summarise a data root: cells, images per source, coverage per district, scores.

    Args:
        data: Data root (default: ``STADSBEELD_DATA``, else data/demo).
    """
    from core.summary import summarize

    print(summarize(data or _default_data()))
    return 0


def import_photos(folder: str, data: str | None = None) -> int:
    """Add a folder of your own geotagged photos to the data root's street-level catalog.

    Reads each JPEG's EXIF GPS position, direction and capture time, copies the photo into
    DATA/street/photos/ and adds it to the catalog as source "other". Photos without a GPS
    position (or unreadable, or outside the Netherlands) are listed, not placed. Importing a
    folder again replaces its rows.

    Args:
        folder: Folder of photos (.jpg, .jpeg), searched recursively.
        data: Data root (default: ``STADSBEELD_DATA``, else data/demo).
    """
    from core.sources.photos import import_photos as run_import

    try:
        done = run_import(folder, data or _default_data())
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in done.problems.itertuples():
        print(f"left out {problem.file}: {problem.problem}")
    target = DataRoot(Path(data or _default_data())).catalog
    print(f"{len(done.images)} photos added to {target}, {len(done.problems)} left out")
    return 0 if len(done.images) or not len(done.problems) else 1


def scene_filter(config: SceneTrainConfig) -> int:
    """Train the Places365-style scene classifier on the root's scene labels.

    Scores every Flickr photo (cached beside the catalog) and saves the backbone as ground
    weights.

    Args:
        config: the scene classifier's training.
    """
    from train.scene import train_scene_filter

    train_scene_filter(config)
    return 0


def perception(config: PerceptionConfig) -> int:
    """Train a Place Pulse 2 style perception encoder on pairwise votes (RankNet loss).

    Args:
        config: the perception encoder's training.
    """
    from train.perception import train_perception

    train_perception(config)  # rank 0 prints the run id and where its weights are
    return 0


def _resolved_weights(config: FusionConfig) -> FusionConfig:
    """``config`` with run ids among its weights replaced by the runs' weight files."""
    from train.common import resolve_weights

    runs = DataRoot(Path(config.data)).runs
    return dataclasses.replace(
        config,
        ground_weights=resolve_weights(runs, config.ground_weights),
        aerial_weights=resolve_weights(runs, config.aerial_weights),
    )


def fusion(config: FusionConfig, schedule: Schedule = "auto") -> int:
    """Train the cross-modal housing-quality model (aerial + street level) and write a run.

    Args:
        config: the run.
        schedule: Defaults of a shipped schedule (assets/configs/fusion-*.yaml): demo (small
            CNNs at 64/32 px, 12 epochs, CPU), paper (ResNet-50 at 224 px, 25 epochs with 5
            warm-up epochs, GPU), or auto: demo on a demo city, paper otherwise. --config and
            single options override it.
    """
    from train.fusion import train_fusion

    train_fusion(_resolved_weights(config))
    return 0


def fusion_matrix(
    config: FusionConfig,
    schedule: Schedule = "auto",
    seeds: list[int] = [0, 1, 2],  # noqa: B006 (read only; jsonargparse shows it as the default)
    out: str | None = None,
    compare_weights: dict[str, str] = {},  # noqa: B006
    only: list[str] | None = None,
) -> int:
    """The paper's experiment matrix over several seeds; writes fusion_matrix.csv and .md.

    aerial, GSV, aerial+GSV, aerial+Flickr (all/outdoor/building), the open sources the catalog
    holds (aerial+amsterdam_panorama, aerial+mapillary, both pooled) and ground-weight variants.

    Args:
        config: the options every configuration shares.
        schedule: Defaults of a shipped schedule: demo, paper or auto (see fusion).
        seeds: Seeds to train every configuration with.
        out: Report folder (default: DATA/reports).
        compare_weights: More ground weights to compare on aerial+gsv, NAME=FILE_OR_RUN (e.g.
            imagenet=resnet50_a1_in1k.safetensors).
        only: Train only these configurations (e.g. 'aerial+gsv [contrastive weights]') and
            merge them into the existing report, replacing their earlier rows.
    """
    from core.demo import MANIFEST
    from train.common import resolve_weights
    from train.demo_runs import ensure_encoders
    from train.matrix import matrix_configs, merge_results, run_matrix, write_report

    root = DataRoot(Path(config.data))
    base = _resolved_weights(config)
    weights: dict[str, str | None] = {"given": base.ground_weights} if base.ground_weights else {}
    scene_run = base.scene_run
    if (root.root / MANIFEST).exists():  # the demo's own stand-ins for Place Pulse 2, Places365
        encoders = ensure_encoders(root, device=base.device)
        weights |= {"pp2-like": encoders.perception_weights, "places-like": encoders.scene_weights}
        scene_run = scene_run or encoders.scene_run
    for name, value in compare_weights.items():
        weights[name] = resolve_weights(root.runs, value)
    weights.setdefault("random", None)
    if not scene_run:
        raise ValueError("--scene-run is needed for the outdoor and building Flickr subsets")
    from core.sources.catalog import read_catalog

    sources = read_catalog(root.catalog, check_files=False).images["source"].unique()
    configs = matrix_configs(base, scene_run, weights, sources)
    if only:
        unknown = sorted(set(only) - {c.label for c in configs})
        if unknown:
            raise ValueError(
                f"--only {unknown}: the configurations are {[c.label for c in configs]}"
            )
        configs = [c for c in configs if c.label in only]
    folder = Path(out) if out else root.reports
    results = run_matrix(configs, seeds)
    if only:
        results = merge_results(folder / "fusion_matrix.csv", results)
    schedule_name = "paper schedule" if base.aerial_backbone == "resnet50" else "demo schedule"
    csv, md = write_report(results, folder, schedule_name)
    print(md.read_text())
    print(f"written {csv} and {md}")
    return 0


def predict(config: PredictConfig) -> int:
    """Apply fusion runs (one, or an ensemble) to every grid cell of a data root for one year.

    Uses that year's aerial mosaic and the street images captured within --window-years of
    it; the root may be another one than the runs were trained on. Writes a prediction folder
    (kind prediction) to DATA/runs: predictions.parquet (cell, year, predicted, uncertainty,
    image counts), config.yaml and metrics.json (the calibration of the ensemble's intervals).

    Args:
        config: what to predict with, where and when.
    """
    from train.predict import predict as run_predict

    run_predict(config)
    return 0


def validate_change(config: ChangeValidationConfig) -> int:
    """Held-out-year validation of predicted change: does the Monitor page's change hold?

    Trains the fusion model (aerial+GSV) and an aerial-only model on the earlier release
    (one run per seed, one shared spatial split), predicts the earlier and the last release
    from each year's imagery, and compares the predicted change with the labels' change on the
    test cells: Kendall's tau, sign agreement on large changes, the error against carrying the
    previous release forward, the calibration of the ensemble's intervals, per district.
    Writes DATA/reports/change_validation.{json,csv,md}; the predictions stay in DATA/runs.

    Args:
        config: the root, years, seeds and schedule.
    """
    from train.change_validation import validate_change as run_validation

    run_validation(config)
    return 0


def runs(data: str | None = None, kind: str | None = None) -> int:
    """List the complete runs of a data root, newest first (training runs and predictions).

    Args:
        data: Data root (default: ``STADSBEELD_DATA``, else data/demo).
        kind: Only runs of this kind (fusion, prediction, contrastive, ...).
    """
    from core.runs import list_runs

    found = list_runs(DataRoot(Path(data or _default_data())).runs, kind=kind)
    columns = [
        c
        for c in ("run_id", "kind", "config.label", "config.target", "metrics.test_kendall_tau")
        if c in found
    ]
    if found.empty:
        print("no complete runs")
    else:
        print(found[columns].to_string(index=False))
    return 0


def demo_runs(data: str | None = None, device: str = "auto", queue_embeddings: bool = False) -> int:
    """Train the dashboard's default runs where missing.

    The scene filter, the perception encoder, and the fusion runs aerial, aerial+gsv and
    aerial+flickr(building), each only if missing.

    Args:
        data: Data root (default: ``STADSBEELD_DATA``, else data/demo).
        device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N.
        queue_embeddings: Also queue a default contrastive and UGE run for the job worker
            (started if none is alive) unless the root has them (make demo does).
    """
    from train.demo_runs import ensure_default_runs, queue_embedding_runs

    root = DataRoot(Path(data or _default_data()))
    ensure_default_runs(root, device=device)
    if queue_embeddings:
        queue_embedding_runs(root)
    return 0


def contrastive(config: ContrastiveConfig, schedule: Literal["demo", "paper"] = "demo") -> int:
    """Spatiotemporal contrastive pretraining of a street-view encoder (MoCo v3, UrbanSTCL).

    Temporal, spatial or global positive pairs, or a weighted sum of the three (unified).
    Writes a run with backbone.safetensors (usable as --ground-weights) and per-cell
    embeddings.

    Args:
        config: the run.
        schedule: Defaults of a shipped schedule (assets/configs/contrastive-*.yaml): demo (a
            small CNN at 32 px, CPU) or paper (ViT-B/16 at 224 px, batch 1,024, GPU).
    """
    from core.runs import BACKBONE_FILE, run_path
    from train.contrastive import train_contrastive

    run_id = train_contrastive(config)
    weights = run_path(DataRoot(Path(config.data)).runs, run_id) / BACKBONE_FILE
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        print(f"contrastive run {run_id}: ground weights {weights}")
    return 0


def _baselines(root: DataRoot, compare: dict[str, str]) -> dict[str, str | None]:
    """Baseline encoders: random, the demo's stand-ins when present, and NAME=weights pairs."""
    from core.runs import BACKBONE_FILE, list_runs
    from train.common import resolve_weights

    baselines: dict[str, str | None] = {"random": None}
    for kind, name in (("perception", "pp2-like"), ("scene", "places-like")):
        runs = list_runs(root.runs, kind=kind)
        if len(runs) and (runs["path"].iloc[0] / BACKBONE_FILE).is_file():
            baselines[name] = str(runs["path"].iloc[0] / BACKBONE_FILE)
    for name, value in compare.items():
        baselines[name] = resolve_weights(root.runs, value)
    return baselines


def _report_evaluation(
    root: DataRoot,
    run_ids: list[str],
    compare_weights: dict[str, str],
    device: str,
    out: str | None,
    title: str,
) -> int:
    from train.contrastive_eval import evaluate, write_report

    results = evaluate(root, run_ids, _baselines(root, compare_weights), device=device)
    csv, md = write_report(results, Path(out) if out else root.reports, title)
    print(md.read_text())
    print(f"written {csv} and {md}")
    return 0


def contrastive_eval(
    runs: list[str],
    data: str | None = None,
    device: str = "auto",
    compare_weights: dict[str, str] = {},  # noqa: B006
    out: str | None = None,
) -> int:
    """Place recognition, socioeconomic R2 and perception of contrastive runs.

    Evaluates them against baseline encoders (random, the demo's perception and scene encoders
    when present, and --compare-weights) on the same images.

    Args:
        runs: Contrastive run ids.
        data: Data root (default: ``STADSBEELD_DATA``, else data/demo).
        device: auto (CUDA when present, else CPU), cpu, cuda or cuda:N.
        compare_weights: Other baseline encoders, NAME=WEIGHTS: a weights file (e.g. ImageNet)
            or a run id.
        out: Report folder (default: DATA/reports).
    """
    root = DataRoot(Path(data or _default_data()))
    title = "Contrastive encoders: downstream evaluation"
    return _report_evaluation(root, runs, compare_weights, device, out, title)


def contrastive_matrix(
    config: ContrastiveConfig,
    objectives: list[Literal["temporal", "spatial", "global", "unified"]] = list(OBJECTIVES),  # noqa: B006,B008
    seeds: list[int] = [0, 1, 2],  # noqa: B006
    compare_weights: dict[str, str] = {},  # noqa: B006
    out: str | None = None,
) -> int:
    """Train every objective over several seeds, then evaluate them all.

    The paper's comparison: temporal, spatial, global and unified objectives, each seed on the
    same held-out blocks, evaluated with the baselines; report in DATA/reports.

    Args:
        config: the options every run shares (objective and seed are set per run).
        objectives: Objectives to train.
        seeds: Seeds to train each objective with.
        compare_weights: Other baseline encoders, NAME=WEIGHTS (a weights file or a run id).
        out: Report folder (default: DATA/reports).
    """
    from train.contrastive_eval import run_matrix

    root = DataRoot(Path(config.data))
    run_ids = run_matrix(config, objectives, seeds)
    title = (
        f"Contrastive objectives on {root.root} ({config.backbone} @ {config.px} px, "
        f"{config.epochs} epochs x {config.steps_per_epoch} steps x {config.batch_size})"
    )
    return _report_evaluation(root, run_ids, compare_weights, config.device, out, title)


def ugdata(
    data: str | None = None,
    out: str | None = None,
    seed: int = 0,
    max_images: int | None = None,
    hops: int = 2,
    holdout_district: str | None = None,
    sources: list[str] | None = None,
) -> int:
    """Build UGData: images anchored to the street graph, spatial captions and paths.

    Writes the UrbanGraphEmbeddings training data (the paper's JSONL + graph JSON layout) for a
    data root, with one district optionally held out.

    Args:
        data: Data root (default: ``STADSBEELD_DATA``, else data/demo).
        out: Output folder (default: DATA/ugdata; must not exist).
        seed: Seed of the image subset and the sampled paths.
        max_images: A seeded random subset of the images.
        hops: Hops of each image's street subgraph.
        holdout_district: A district kept out of training (heldout.jsonl).
        sources: Anchor only the images of these catalog sources (e.g.
            amsterdam_panorama,mapillary; default every source).
    """
    from core.ugdata import build_ugdata

    root = data or _default_data()
    folder = out or str(DataRoot(Path(root)).root / "ugdata")
    manifest = build_ugdata(
        root,
        folder,
        seed=seed,
        max_images=max_images,
        hops=hops,
        holdout_district=holdout_district,
        sources=sources,
    )
    print(json.dumps({k: manifest[k] for k in ("counts", "timings_s") if k in manifest}, indent=2))
    print(f"UGData written to {folder}")
    return 0


def uge(config: UGEConfig, schedule: Literal["demo", "paper"] = "demo") -> int:
    """Train spatially grounded VLM embeddings (LoRA stage 1, graph stage 2).

    Stage 1: LoRA on a Qwen2-VL backbone, image-text InfoNCE on UGData; stage 2: a GATv2 graph
    encoder fused with the image embedding. Without --vlm a tiny Qwen2-VL is built locally.

    Args:
        config: the run.
        schedule: Defaults of a shipped schedule (assets/configs/uge-*.yaml): demo (the tiny
            model on CPU) or paper (a local pretrained Qwen2-VL given with --vlm, GPU).
    """
    from train.uge import train_uge

    train_uge(config)  # rank 0 logs the run id
    return 0


def uge_bench(
    run_ids: list[str],
    data: str | None = None,
    candidates: int = 10,
    max_queries: int = 3000,
    out: str | None = None,
) -> int:
    """UGBench: geolocation, retrieval, perception and grounding at stages 0, 1 and 2.

    Evaluates uge runs on their UGData (training and held-out samples) with the backbone before
    training (stage 0), after stage 1 and after stage 2.

    Args:
        run_ids: Uge run ids (several: one per seed, reported as mean and std).
        data: Data root (default: ``STADSBEELD_DATA``, else data/demo).
        candidates: Candidates per ranking query.
        max_queries: Queries per task and split (the default covers the demo's whole held-out
            district).
        out: Report folder (default: DATA/reports).
    """
    from train.uge_bench import bench_runs, write_report

    root = DataRoot(Path(data or _default_data()))
    results = bench_runs(root, run_ids, candidates=candidates, max_queries=max_queries)
    csv, md = write_report(
        results, Path(out) if out else root.reports, f"UGBench of {', '.join(run_ids)}"
    )
    print(md.read_text())
    print(f"written {csv} and {md}")
    return 0


def worker(
    data: str | None = None,
    exit_when_idle: float | None = None,
    poll: float = 1.0,
    stale_after: float = 30.0,
    once: bool = False,
    processes: int = 1,
) -> int:
    """Run the dashboard's queued training jobs, one at a time.

    Runs the jobs queued in DATA/runs/jobs.sqlite (one worker per data root; a second one exits
    at once). SIGTERM stops the current job as failed and exits.

    Args:
        data: Data root (default: ``STADSBEELD_DATA``, else data/demo).
        exit_when_idle: Exit after this many seconds with nothing queued (default: never).
        poll: Seconds between looks at an empty queue.
        stale_after: Fail a running job whose heartbeat is this many seconds old: its worker
            died.
        once: Run at most one job, then exit.
        processes: Training processes per job: above 1, each job runs under torchrun with this
            many ranks (gloo on CPU, NCCL with one GPU per rank).
    """
    from train.worker import Worker

    return Worker(data or _default_data(), processes=processes).loop(
        exit_when_idle=exit_when_idle, poll=poll, stale_after=stale_after, once=once
    )


def job(job: int, data: str | None = None) -> int:
    """One rank of a queued job; a worker started with --processes N launches it under torchrun.

    Args:
        job: Id of the job in DATA/runs/jobs.sqlite.
        data: Data root (default: ``STADSBEELD_DATA``, else data/demo).
    """
    from train.worker import run_job_rank

    return run_job_rank(data or _default_data(), job)


def export(
    layer: str,
    out: str | None = None,
    format: Literal["gpkg", "parquet", "csv", "html"] | None = None,
    year: int | None = None,
    year_from: int | None = None,
    run: str | None = None,
    split: Literal["all", "train", "val", "test"] = "all",
    level: Literal["cells", "buurt", "wijk", "stadsdeel"] = "cells",
    basemap: str | None = None,
    attribution: str | None = None,
    data: str | None = None,
) -> int:
    """Write a map layer as GeoPackage (with its QGIS style), GeoParquet, CSV or an HTML map.

    The layer is coloured as the dashboard colours it: the GeoPackage carries those colours
    and classes as the layer's default QGIS style; the HTML map opens in a browser without
    the app (offline unless --basemap is given).

    Args:
        layer: A label score (lbm, afw, fys, onv, soc, vrz, won, lbm_class, change), a run's
            predicted, true, residual or split, or an image count (gsv, flickr).
        out: The file to write (default: the layer's name with the format's ending).
        format: gpkg, parquet, csv or html (default: from the ending of --out, else gpkg).
        year: The labels' year (default: the latest).
        year_from: For change: the earlier year (default: the one before --year).
        run: For a run's layer: the run id (under DATA/runs) or a run folder.
        split: For a run's layer: the cells of one split, or all.
        level: Per 100 m cell, or the mean per buurt, wijk or stadsdeel.
        basemap: For html: the base map drawn below the layer: none, auto (PDOK's grey map if
            reachable), pdok-grey, pdok-colour, pdok-pastel, pdok-water, pdok-aerial, osm, or
            an XYZ tile URL template (default: none).
        attribution: For html: a URL template's attribution (default: its host name).
        data: Data root (default: ``STADSBEELD_DATA``, else data/demo).
    """
    from core.exports import format_of, write_layer
    from core.layers import map_layer

    fmt = format_of(out, format) if out is not None else format_of("", format or "gpkg")
    shown = map_layer(data or _default_data(), layer, year, year_from, run, split, level)
    target = Path(out) if out is not None else Path(f"{shown.slug}.{fmt}")
    written = write_layer(shown, target, fmt, basemap, attribution)
    rows = f"{len(shown.table):,} {'cells' if level == 'cells' else level + ' units'}"
    print(f"{shown.title}: {rows} written to {written}")
    return 0


def dashboard(
    data: str | None = None,
    address: str = "127.0.0.1",
    port: int = 8501,
    retrain: bool | None = None,
) -> int:
    """Serve the Streamlit dashboard for a data root.

    Args:
        data: Data root (default: ``STADSBEELD_DATA``, else data/demo).
        address: Address the server binds to; 0.0.0.0 exposes it to the network.
        port: Port of the server.
        retrain: Turn retraining from the sidebar on or off (default: the data root's
            dashboard.yaml, else off).
    """
    import dashboard as package

    env = dict(os.environ, STADSBEELD_DATA=str(Path(data or _default_data()).resolve()))
    if retrain is not None:
        env["STADSBEELD_RETRAIN"] = "1" if retrain else "0"
    app = Path(package.__file__).resolve().parent / "app.py"
    command = [sys.executable, "-m", "streamlit", "run", str(app)]
    command += ["--server.address", address, "--server.port", str(port)]
    command += ["--server.headless", "true", "--browser.gatherUsageStats", "false"]
    # Served, not developed: no source watcher (it resolved the path of every imported module
    # after each script run, on the server's event loop) and no full garbage collection after
    # every script run (it walked all the cached layers: 0.15 s of each map rerun).
    command += ["--server.fileWatcherType", "none", "--runner.postScriptGC", "false"]
    return subprocess.call(command, env=env)


#: Every command, in the order ``stadsbeeld --help`` lists them.
COMMANDS: dict[str, Callable[..., int]] = {
    "demo": demo,
    "fetch": fetch,
    "summary": summary,
    "import-photos": import_photos,
    "scene-filter": scene_filter,
    "perception": perception,
    "fusion": fusion,
    "fusion-matrix": fusion_matrix,
    "predict": predict,
    "validate-change": validate_change,
    "runs": runs,
    "demo-runs": demo_runs,
    "contrastive": contrastive,
    "contrastive-eval": contrastive_eval,
    "contrastive-matrix": contrastive_matrix,
    "ugdata": ugdata,
    "uge": uge,
    "uge-bench": uge_bench,
    "worker": worker,
    "job": job,
    "export": export,
    "dashboard": dashboard,
}


# --- building the parsers ----------------------------------------------------------------------


def _config_class(command: Callable[..., int]) -> type | None:
    """The config dataclass a command takes as its ``config`` parameter, if any."""
    hint = typing.get_type_hints(command).get("config")
    return hint if dataclasses.is_dataclass(hint) else None


def build_parser(name: str) -> ArgumentParser:
    """The parser of one command: its config's fields and its other parameters as options."""
    command = COMMANDS[name]
    summary_line, _, details = (command.__doc__ or "").partition("\n")
    description = details.split("Args:")[0].strip()
    parser = ArgumentParser(
        prog=f"{PROG} {name}",
        description=f"{summary_line.strip()} {inspect.cleandoc(description)}".strip(),
        exit_on_error=False,
    )
    parser.add_argument(
        "--config",
        action="config",
        help="A YAML file of option values (e.g. a run's config.yaml, or one of "
        "assets/configs/); options after it override its values.",
    )
    config_class = _config_class(command)
    if config_class is not None:
        parser.add_class_arguments(config_class, as_positional=True)
    parser.add_function_arguments(command, skip={"config"}, as_positional=True)
    if any(action.dest == "data" for action in parser._actions):
        parser.set_defaults(data=_default_data())
    return parser


def _option_kinds(parser: ArgumentParser) -> tuple[dict[str, str], dict[str, bool]]:
    """For each option (dest): its kind (bool, list, dict or value), and whether it may be
    null; positional list arguments are keyed ``<positional>``."""
    kinds, optional = {}, {}
    for action in parser._actions:
        hint = getattr(action, "_typehint", None)
        args = typing.get_args(hint)
        nullable = type(None) in args
        if nullable:
            hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint) or hint
        kind = {bool: "bool", list: "list", tuple: "list", dict: "dict"}.get(origin, "value")
        key = action.dest if action.option_strings else "<positional>"
        if key == "<positional>" and kind != "list":
            continue
        kinds[key], optional[key] = kind, nullable
    return kinds, optional


def _schedule_file(name: str, schedule: str, data: str) -> Path:
    if schedule == "auto":  # the paper's schedule for real data, the short one for the demo city
        from core.demo import MANIFEST

        schedule = "demo" if (Path(data) / MANIFEST).exists() else "paper"
    return schedule_file(name.split("-")[0], schedule)


def normalise(parser: ArgumentParser, name: str, argv: list[str]) -> list[str]:
    """``argv`` in jsonargparse's spelling (see the module docstring for what it accepts).

    A command with a ``schedule`` option gets that schedule's YAML as its first ``--config``.
    """
    kinds, nullable = _option_kinds(parser)
    out: list[str] = []
    positional: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token in ("--help", "--print_config"):
            (positional if "<positional>" in kinds and token[0] != "-" else out).append(token)
            continue
        option, has_value, value = token[2:].partition("=")
        key = option.replace("-", "_")
        key = ALIASES.get(key, key) if ALIASES.get(key) in kinds else key
        if key not in kinds and key.startswith("no_") and kinds.get(key[3:]) == "bool":
            out.append(f"--{key[3:]}=false")
            continue
        if key == "config":
            if not has_value and i < len(argv):
                value, i = argv[i], i + 1
            out.append(f"--config={_without_derived(value, kinds)}")
            continue
        kind = kinds.get(key)
        if kind is None:  # not an option: the parser says so
            out.append(token)
            continue
        values = [value] if has_value else []
        if not has_value:
            if kind in ("list", "dict"):
                while i < len(argv) and not argv[i].startswith("--"):
                    values.append(argv[i])
                    i += 1
            elif kind == "bool":
                if i < len(argv) and argv[i].lower() in ("true", "false", "yes", "no"):
                    values.append(argv[i])
                    i += 1
                else:
                    values.append("true")
            elif i < len(argv):
                values.append(argv[i])
                i += 1
        out.extend(_spelt(key, kind, nullable[key], values))
    if positional:  # the values of a positional list argument
        bracketed = len(positional) == 1 and positional[0].startswith("[")
        out.insert(0, positional[0] if bracketed else json.dumps(positional))
    if "schedule" in kinds:
        schedule = _last_value(out, "schedule") or parser.get_defaults().get("schedule")
        data = _last_value(out, "data") or _default_data()
        out.insert(0, f"--config={_schedule_file(name, schedule, data)}")
    return out


def _without_derived(path: str, kinds: dict[str, str]) -> str:
    """A ``--config`` value: the file's path, or, for a run's ``config.yaml``, its option
    values without the values the run derived (:data:`core.configs.DERIVED_KEYS`)."""
    file = Path(path)
    if not file.is_file():
        return path
    try:  # safe_load: a python/object tag is refused, never constructed
        values = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not a valid --config YAML file ({exc})") from exc
    if values is not None and not isinstance(values, dict):
        raise ValueError(
            f"{file}: a --config file holds a mapping of option values, "
            f"not a {type(values).__name__}"
        )
    if not values:
        return path
    derived = [k for k in values if k in DERIVED_KEYS and k not in kinds]
    if not derived:
        return path
    return json.dumps({k: v for k, v in values.items() if k not in derived})


def _blamed_config(argv: list[str], message: str) -> str:
    """`` (in --config FILE)`` for the config files of ``argv`` that set the option a parser
    error ``message`` names (``Parser key "epochs": ...``), else nothing."""
    key = message.partition('Parser key "')[2].partition('"')[0].split(".")[0]
    files = [a.partition("=")[2] for a in argv if a.startswith("--config=")]
    files += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    blamed = []
    for file in files:
        try:
            values = yaml.safe_load(Path(file).read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if key and isinstance(values, dict) and key in values:
            blamed.append(file)
    return f" (in --config {', '.join(blamed)})" if blamed else ""


def _last_value(argv: list[str], key: str) -> str | None:
    """The value of the last ``--key=value`` in normalised ``argv``."""
    found = [a.partition("=")[2] for a in argv if a.startswith(f"--{key}=")]
    return found[-1] if found else None


def _spelt(key: str, kind: str, nullable: bool, values: list[str]) -> list[str]:
    """The normalised tokens of one option and its values."""
    if nullable and len(values) == 1 and values[0].lower() == "none":
        return [f"--{key}=null"]
    if kind == "list" and not (len(values) == 1 and values[0].startswith("[")):
        items = [item for value in values for item in value.split(",") if item]
        return [f"--{key}={json.dumps(items)}"]
    if kind == "dict" and not (len(values) == 1 and values[0].startswith("{")):
        if values and all("=" in v for v in values):
            return [f"--{key}.{k}={v}" for k, _, v in (value.partition("=") for value in values)]
        if key in ORDERED_KEYS:
            return [f"--{key}={json.dumps(dict(zip(ORDERED_KEYS[key], values, strict=True)))}"]
        raise ValueError(f"--{key} {' '.join(values)}: expected NAME=VALUE items")
    return [f"--{key}={values[0]}"] if values else [f"--{key}"]


def _call(name: str, namespace: Namespace) -> int:
    """Run a command with its parsed options."""
    command = COMMANDS[name]
    values = namespace.as_dict()
    values.pop("config", None)
    values.pop("__path__", None)
    config_class = _config_class(command)
    kwargs: dict[str, Any] = {}
    if config_class is not None:
        names = {f.name for f in dataclasses.fields(config_class)}
        kwargs["config"] = config_class(**{k: values.pop(k) for k in list(values) if k in names})
    parameters = inspect.signature(command).parameters
    return command(**kwargs, **{k: v for k, v in values.items() if k in parameters})


def usage() -> str:
    """The command list of ``stadsbeeld --help``."""
    lines = [
        f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help for a command's options)",
        "",
        "Learn urban quality on the 100 m Leefbaarometer grid from aerial and street-level "
        "imagery.",
        "",
        "commands:",
    ]
    for name, command in COMMANDS.items():
        lines.append(f"  {name:<20}{(command.__doc__ or '').splitlines()[0]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``stadsbeeld`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Bad input is one ``error:`` line and exit code 2 (``STADSBEELD_TRACEBACK=1`` re-raises).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"error: unknown command {name!r}; the commands are {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    try:
        parser = build_parser(name)
        namespace = parser.parse_args(normalise(parser, name, rest))
        return _call(name, namespace)
    except (FileNotFoundError, FileExistsError, ValueError, yaml.YAMLError) as exc:
        # bad input: the message names the file and the problem; a traceback adds nothing
        if os.environ.get("STADSBEELD_TRACEBACK"):
            raise
        print(f"error: {str(exc).strip()}", file=sys.stderr)
        return 2
    except ArgumentError as exc:
        print(
            f"error: {exc}{_blamed_config(rest, str(exc))}\n(see {PROG} {name} --help)",
            file=sys.stderr,
        )
        return 2
    except SystemExit as exc:  # --help, --print_config
        return exc.code if isinstance(exc.code, int) else 0
