"""``python -m train <command>``: build data, train and evaluate."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from core.dataroot import DataRoot

DEFAULT_DATA = str(DataRoot.from_env().root)
#: train.contrastive.OBJECTIVES, spelt out so that --help needs no torch import.
OBJECTIVES = ("temporal", "spatial", "global", "unified")
#: train.fetch.SOURCES, ENDPOINTS and POLITENESS names, spelt out so that --help needs no geo imports.
FETCH_SOURCES = ("lbm", "aerial", "osm", "flickr", "gsv")
FETCH_ENDPOINTS = ("pdok", "lbm", "wmts", "overpass", "flickr", "gsv")
FETCH_RATES = ("pdok", "lbm", "wmts", "overpass", "flickr", "flickr-images", "gsv")


def _demo(args: argparse.Namespace) -> int:
    from core.demo import MANIFEST, DemoConfig, build_demo
    from core.summary import summarize

    out = Path(args.out)
    if (out / MANIFEST).exists() and args.if_missing:
        built = json.loads((out / MANIFEST).read_text())["config"]
        wanted = {"seed": args.seed, "extent": args.extent, "flickr_photos": args.flickr_photos}
        differs = {k: built.get(k) for k, v in wanted.items() if built.get(k) != v}
        if differs:
            print(
                f"error: {out} holds another demo city ({differs}); use --force to rebuild it "
                "or choose another --out",
                file=sys.stderr,
            )
            return 2
        print(f"demo city already built in {out} (remove it to rebuild)")
        return 0
    if out.exists() and not args.force:
        print(
            f"error: {out} already exists; use --force to rebuild it or --if-missing to keep it",
            file=sys.stderr,
        )
        return 2
    config = DemoConfig(
        seed=args.seed, extent=args.extent, flickr_photos=args.flickr_photos, workers=args.workers
    )
    if out.exists():  # --force: build beside it, then swap, so a failed build keeps the old one
        staged = out.with_name(f"{out.name}.new")
        manifest = build_demo(staged, config, progress=not args.quiet)
        old = out.with_name(f"{out.name}.old")
        out.rename(old)
        staged.rename(out)
        shutil.rmtree(old)
    else:
        manifest = build_demo(out, config, progress=not args.quiet)
    print(f"built {out} in {manifest['elapsed_s']} s")
    print(summarize(out))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    import logging

    from core.sources.http import FetchError
    from train.fetch import config_from_args, run_fetch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("core.sources").setLevel(logging.INFO)
    try:
        return run_fetch(config_from_args(args))
    except (ValueError, FileNotFoundError, FetchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _summary(args: argparse.Namespace) -> int:
    from core.summary import summarize

    print(summarize(args.data))
    return 0


def _scene_filter(args: argparse.Namespace) -> int:
    from core.configs import SceneTrainConfig
    from core.scenes import SceneFilterConfig
    from train.scene import train_scene_filter

    scene_filter = SceneFilterConfig(
        building_scenes=tuple(args.building_scenes.split(",")),
        indoor_scenes=tuple(args.indoor_scenes.split(",")),
        threshold=args.threshold,
    )
    train_scene_filter(
        SceneTrainConfig(
            data=args.data,
            backbone=args.backbone,
            px=args.px,
            epochs=args.epochs,
            seed=args.seed,
            device=args.device,
            checkpoint=args.checkpoint,
            scene_names=args.scene_names,
            filter=scene_filter,
        )
    )
    return 0


def _perception(args: argparse.Namespace) -> int:
    from core.configs import PerceptionConfig
    from train.perception import train_perception

    run_id = train_perception(
        PerceptionConfig(
            data=args.data,
            backbone=args.backbone,
            px=args.px,
            epochs=args.epochs,
            seed=args.seed,
            device=args.device,
        )
    )
    print(
        f"perception run {run_id}: ground weights at {Path(args.data) / 'runs' / run_id / 'backbone.safetensors'}"
    )
    return 0


def _fusion_config(args: argparse.Namespace):
    from core.configs import FusionConfig, paper_schedule
    from core.demo import MANIFEST
    from train.common import resolve_weights

    runs = DataRoot(Path(args.data)).runs
    values = {
        "data": args.data,
        "year": args.year,
        "target": args.target,
        "aerial": not args.no_aerial,
        "ground": None if args.ground == "none" else args.ground,
        "flickr_subset": args.flickr_subset,
        "scene_run": args.scene_run,
        "scene_threshold": args.scene_threshold,
        "ground_weights": resolve_weights(runs, args.ground_weights),
        "aerial_weights": resolve_weights(runs, args.aerial_weights),
        "seed": args.seed,
        "split_seed": args.split_seed,
        "block_size": args.block_size,
        "device": args.device,
        "name": args.name,
    }
    optional = {
        "aerial_backbone": args.aerial_backbone,
        "ground_backbone": args.ground_backbone,
        "aerial_px": args.aerial_px,
        "ground_px": args.ground_px,
        "epochs": args.epochs,
        "warmup_epochs": args.warmup_epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
    }
    values |= {k: v for k, v in optional.items() if v is not None}
    schedule = args.schedule
    if schedule == "auto":  # the paper's schedule for real data, the short one for the demo city
        schedule = "demo" if (Path(args.data) / MANIFEST).exists() else "paper"
    return paper_schedule(**values) if schedule == "paper" else FusionConfig(**values)


def _fusion(args: argparse.Namespace) -> int:
    from train.fusion import train_fusion

    train_fusion(_fusion_config(args))
    return 0


def _fusion_matrix(args: argparse.Namespace) -> int:
    from core.demo import MANIFEST
    from train.common import resolve_weights
    from train.demo_runs import ensure_encoders
    from train.matrix import matrix_configs, merge_results, run_matrix, write_report

    root = DataRoot(Path(args.data))
    base = _fusion_config(args)
    weights: dict[str, str | None] = {"given": base.ground_weights} if base.ground_weights else {}
    scene_run = args.scene_run
    if (root.root / MANIFEST).exists():  # the demo's own stand-ins for Place Pulse 2 and Places365
        encoders = ensure_encoders(root, device=args.device)
        weights |= {"pp2-like": encoders.perception_weights, "places-like": encoders.scene_weights}
        scene_run = scene_run or encoders.scene_run
    for item in args.compare_weights:
        name, _, value = item.partition("=")
        weights[name] = resolve_weights(root.runs, value)
    weights.setdefault("random", None)
    if not scene_run:
        print(
            "error: --scene-run is needed for the outdoor and building Flickr subsets",
            file=sys.stderr,
        )
        return 2
    configs = matrix_configs(base, scene_run, weights)
    if args.only:
        unknown = sorted(set(args.only) - {c.label for c in configs})
        if unknown:
            print(
                f"error: --only {unknown}: the configurations are {[c.label for c in configs]}",
                file=sys.stderr,
            )
            return 2
        configs = [c for c in configs if c.label in args.only]
    out = Path(args.out) if args.out else root.reports
    results = (
        merge_results(out / "fusion_matrix.csv", run_matrix(configs, args.seeds))
        if args.only
        else run_matrix(configs, args.seeds)
    )
    schedule = "paper schedule" if base.aerial_backbone == "resnet50" else "demo schedule"
    csv, md = write_report(results, out, schedule)
    print(md.read_text())
    print(f"written {csv} and {md}")
    return 0


def _demo_runs(args: argparse.Namespace) -> int:
    from train.demo_runs import ensure_default_runs

    ensure_default_runs(DataRoot(Path(args.data)), device=args.device)
    return 0


def _contrastive_config(args: argparse.Namespace):
    from core.configs import ContrastiveConfig

    pairs = {
        "temporal_max_distance_m": args.max_distance,
        "temporal_max_heading_deg": args.max_heading,
        "temporal_min_gap_months": args.min_gap_months,
        "spatial_min_distance_m": args.spatial_min,
        "spatial_buffer_m": args.buffer,
    }
    weights = dict(zip(("temporal", "spatial", "global"), args.loss_weights, strict=True))
    return ContrastiveConfig(
        data=args.data,
        backbone=args.backbone,
        px=args.px,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
        objective=getattr(args, "objective", "temporal"),
        source=args.source,
        loss_weights=weights,
        pairs={k: v for k, v in pairs.items() if v is not None},
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        temperature=args.temperature,
        dim=args.dim,
        mlp_dim=args.mlp_dim,
        resume=getattr(args, "resume", None),
    )


def _contrastive(args: argparse.Namespace) -> int:
    from core.pairs import NoTemporalPairs
    from train.contrastive import train_contrastive

    try:
        run_id = train_contrastive(_contrastive_config(args))
    except (NoTemporalPairs, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"contrastive run {run_id}: ground weights {DataRoot(Path(args.data)).runs / run_id / 'backbone.safetensors'}"
    )
    return 0


def _baselines(root: DataRoot, compare: list[str]) -> dict[str, str | None]:
    """Baseline encoders: random, the demo's stand-ins when present, and NAME=weights pairs."""
    from core.runs import list_runs
    from train.common import resolve_weights

    baselines: dict[str, str | None] = {"random": None}
    for kind, name in (("perception", "pp2-like"), ("scene", "places-like")):
        runs = list_runs(root.runs, kind=kind)
        if len(runs) and (runs["path"].iloc[0] / "backbone.safetensors").is_file():
            baselines[name] = str(runs["path"].iloc[0] / "backbone.safetensors")
    for item in compare:
        name, _, value = item.partition("=")
        baselines[name] = resolve_weights(root.runs, value)
    return baselines


def _report_evaluation(
    root: DataRoot, run_ids: list[str], args: argparse.Namespace, title: str
) -> int:
    from train.contrastive_eval import evaluate, write_report

    results = evaluate(root, run_ids, _baselines(root, args.compare_weights), device=args.device)
    csv, md = write_report(results, Path(args.out) if args.out else root.reports, title)
    print(md.read_text())
    print(f"written {csv} and {md}")
    return 0


def _contrastive_eval(args: argparse.Namespace) -> int:
    root = DataRoot(Path(args.data))
    return _report_evaluation(root, args.runs, args, "Contrastive encoders: downstream evaluation")


def _contrastive_matrix(args: argparse.Namespace) -> int:
    from train.contrastive_eval import run_matrix

    root = DataRoot(Path(args.data))
    run_ids = run_matrix(_contrastive_config(args), args.objectives, args.seeds)
    title = (
        f"Contrastive objectives on {root.root} ({args.backbone} @ {args.px} px, {args.epochs} epochs x "
        f"{args.steps_per_epoch} steps x {args.batch_size})"
    )
    return _report_evaluation(root, run_ids, args, title)


def _ugdata(args: argparse.Namespace) -> int:
    from train.ugdata_cli import build_ugdata

    out = args.out or str(DataRoot(Path(args.data)).root / "ugdata")
    try:
        manifest = build_ugdata(
            args.data,
            out,
            seed=args.seed,
            max_images=args.max_images,
            hops=args.hops,
            holdout_district=args.holdout_district,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("counts", "timings_s") if k in manifest}, indent=2))
    print(f"UGData written to {out}")
    return 0


def _uge(args: argparse.Namespace) -> int:
    from core.configs import UGEConfig
    from train.uge import train_uge

    run_id = train_uge(
        UGEConfig(
            data=args.data,
            ugdata=args.ugdata or "",
            vlm=args.vlm,
            tiny_pretrain_steps=args.tiny_pretrain_steps,
            stage1_steps=args.stage1_steps,
            stage2_steps=args.stage2_steps,
            stage2_questions=args.stage2_questions,
            place_dim=args.place_dim,
            batch_size=args.batch_size,
            lr=args.lr,
            temperature=args.temperature,
            lora_r=args.lora_r,
            image_px=args.image_px,
            seed=args.seed,
            device=args.device,
        )
    )
    print(f"uge run {run_id}")
    return 0


def _uge_bench(args: argparse.Namespace) -> int:
    from train.uge_bench import bench_runs, write_report

    root = DataRoot(Path(args.data))
    results = bench_runs(
        root, args.run_ids, candidates=args.candidates, max_queries=args.max_queries
    )
    csv, md = write_report(
        results,
        Path(args.out) if args.out else root.reports,
        f"UGBench of {', '.join(args.run_ids)}",
    )
    print(md.read_text())
    print(f"written {csv} and {md}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from train.worker import Worker

    try:
        worker = Worker(args.data)
    except (FileNotFoundError, ValueError) as exc:  # no data root, not a job database
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return worker.loop(
        exit_when_idle=args.exit_when_idle,
        poll=args.poll,
        stale_after=args.stale_after,
        once=args.once,
    )


def _add_fusion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=DEFAULT_DATA, help="data root (default: %(default)s)")
    parser.add_argument(
        "--schedule",
        choices=("auto", "demo", "paper"),
        default="auto",
        help="demo: small CNNs at 64/32 px, 12 epochs (CPU); paper: ResNet-50 at 224 px, 25 epochs "
        "with 5 warm-up epochs (GPU); auto (default): demo on a demo city, paper otherwise",
    )
    parser.add_argument("--year", type=int, help="label year (default: latest)")
    parser.add_argument(
        "--target", default="won", help="lbm, afw, fys, onv, soc, vrz, won or lbm_class"
    )
    parser.add_argument("--no-aerial", action="store_true", help="ground only")
    parser.add_argument("--ground", choices=("gsv", "flickr", "none"), default="gsv")
    parser.add_argument("--flickr-subset", choices=("all", "outdoor", "building"), default="all")
    parser.add_argument("--scene-run", help="scene filter run id (needed for outdoor/building)")
    parser.add_argument("--scene-threshold", type=float, help="override the scene run's threshold")
    parser.add_argument(
        "--ground-weights", help="weights file or run id of the frozen ground encoder"
    )
    parser.add_argument("--aerial-weights", help="weights file or run id for the aerial backbone")
    parser.add_argument("--aerial-backbone")
    parser.add_argument("--ground-backbone")
    parser.add_argument("--aerial-px", type=int)
    parser.add_argument("--ground-px", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--warmup-epochs", type=int, help="epochs with the aerial backbone frozen")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, help="spatial split seed (default: --seed)")
    parser.add_argument(
        "--block-size", type=float, default=1000.0, help="spatial block size in metres"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--name", default="", help="label of the run (default: from its modalities)"
    )


def _add_encoder_options(parser: argparse.ArgumentParser, epochs: int) -> None:
    parser.add_argument("--data", default=DEFAULT_DATA, help="data root (default: %(default)s)")
    parser.add_argument("--backbone", default="convnet_small")
    parser.add_argument("--px", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")


def _add_contrastive_options(parser: argparse.ArgumentParser) -> None:
    _add_encoder_options(parser, epochs=8)
    parser.add_argument(
        "--source", default="gsv", help="catalog source of the images (default: gsv)"
    )
    parser.add_argument("--steps-per-epoch", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per step and rule")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--dim", type=int, default=128, help="projector output size")
    parser.add_argument(
        "--mlp-dim", type=int, default=512, help="projector and predictor hidden size"
    )
    parser.add_argument(
        "--loss-weights",
        type=float,
        nargs=3,
        default=(1.0, 1.0, 1.0),
        metavar=("TEMPORAL", "SPATIAL", "GLOBAL"),
        help="weights of the unified objective",
    )
    parser.add_argument(
        "--max-distance", type=float, help="temporal pairs: same place below this (m, default 5)"
    )
    parser.add_argument(
        "--max-heading", type=float, help="temporal pairs: heading difference (deg, default 30)"
    )
    parser.add_argument(
        "--min-gap-months", type=float, help="temporal pairs: capture gap (default 12)"
    )
    parser.add_argument(
        "--spatial-min", type=float, help="spatial pairs: at least this far apart (m, default 5)"
    )
    parser.add_argument(
        "--buffer", type=float, help="spatial pairs: at most this far apart (m, default 100)"
    )


def _add_evaluation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--compare-weights",
        action="append",
        default=[],
        metavar="NAME=WEIGHTS",
        help="another baseline encoder: a weights file (e.g. ImageNet) or a run id; repeatable",
    )
    parser.add_argument("--out", help="report folder (default: DATA/reports)")


def _add_fetch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "municipality", help='official Dutch name, e.g. amsterdam, utrecht, "\'s-Gravenhage"'
    )
    parser.add_argument("--out", help="data root to fill (default: data/<municipality>)")
    parser.add_argument(
        "--year", type=int, default=2020, help="label and aerial year (default: %(default)s)"
    )
    parser.add_argument(
        "--extra-years",
        type=int,
        nargs="+",
        default=[],
        metavar="YEAR",
        help="more Leefbaarometer editions, e.g. 2018 2016",
    )
    parser.add_argument(
        "--sources",
        help=f"comma-separated subset of {','.join(FETCH_SOURCES)} (default: all; "
        "keyed sources without their key are skipped)",
    )
    parser.add_argument(
        "--province", help="the province, when the municipality's name is ambiguous"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    parser.add_argument(
        "--resolution",
        type=float,
        default=0.25,
        help="aerial metres per pixel; the nearest PDOK level is used (0.25 -> 0.21 m, "
        "0.42, 0.84, ...) (default: %(default)s)",
    )
    parser.add_argument(
        "--flickr-since",
        default="2004-01-01",
        metavar="DATE",
        help="earliest capture date of Flickr photos (default: %(default)s)",
    )
    parser.add_argument(
        "--flickr-licenses",
        default="all",
        metavar="IDS",
        help="Flickr licence ids to keep: comma-separated, 'reusable' (4,5,7,8,9,10: CC BY, "
        "CC BY-SA, no known restrictions, US government, CC0, public domain) or 'all' "
        "(default; each photo's licence is recorded)",
    )
    parser.add_argument(
        "--gsv-headings",
        type=float,
        nargs="+",
        default=[0.0, 90.0, 180.0, 270.0],
        metavar="DEG",
        help="Street View view headings (default: 0 90 180 270)",
    )
    parser.add_argument(
        "--gsv-spacing",
        type=float,
        default=50.0,
        metavar="M",
        help="metres between Street View lookups along the streets (default: %(default)s)",
    )
    parser.add_argument(
        "--gsv-max-requests",
        type=int,
        metavar="N",
        help="stop before any billed request if Street View needs more image requests",
    )
    parser.add_argument(
        "--gsv-panos",
        metavar="CSV",
        help="also fetch these panorama ids (column pano_id): older "
        "captures, which the API finds only by id",
    )
    parser.add_argument(
        "--lbm-release",
        metavar="CSV[,GPKG]",
        help="import a downloaded Leefbaarometer release (scores CSV and grid GeoPackage, "
        "or one zip holding both) instead of the WFS",
    )
    parser.add_argument(
        "--osm-file",
        metavar="FILE",
        help="read streets, water and parks from an OSM XML file "
        "(.osm, .osm.gz, .osm.bz2) or a PBF extract instead "
        "of Overpass",
    )
    parser.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="NAME=URL",
        help=f"another base URL for a service ({', '.join(FETCH_ENDPOINTS)}); repeatable",
    )
    parser.add_argument(
        "--rate",
        action="append",
        default=[],
        metavar="NAME=RPS",
        help=f"requests per second of a client ({', '.join(FETCH_RATES)}, or all); 0 = no "
        "limit; repeatable",
    )
    parser.add_argument(
        "--redo",
        nargs="+",
        default=[],
        choices=("lbm", "grid", *FETCH_SOURCES[1:]),
        metavar="STEP",
        help="run these steps again even if fetch.json records them as done "
        "(lbm, grid, aerial, osm, flickr, gsv)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per task."""
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="build the synthetic Amsterdam demo city",
        description="Build the synthetic Amsterdam (real file formats) and print its summary.",
    )
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument(
        "--extent",
        default="city",
        help="city, a district (centrum, west, nieuw-west, zuid, oost, noord, zuidoost, "
        "westpoort, weesp) or bbox:minx,miny,maxx,maxy in RD metres",
    )
    demo.add_argument("--out", default=DEFAULT_DATA, help="output folder (default: %(default)s)")
    demo.add_argument(
        "--flickr-photos", type=int, default=30_000, help="Flickr photos for the whole city"
    )
    demo.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    demo.add_argument(
        "--if-missing", action="store_true", help="do nothing if --out is already built"
    )
    demo.add_argument("--force", action="store_true", help="rebuild --out if it exists")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)

    fetch = commands.add_parser(
        "fetch",
        help="build a real data root for a municipality (Leefbaarometer, PDOK aerial, OSM, Flickr, GSV)",
        description="Fetch a Dutch municipality's outline (PDOK), print a plan (requests, size, time, cost, "
        "licences), then its Leefbaarometer labels, grid, aerial mosaic, OSM streets, water and "
        "parks, Flickr photos and Street View views into a data root. Resumable: rerun to continue. "
        "Keys come from FLICKR_API_KEY and GOOGLE_MAPS_API_KEY (+ GOOGLE_MAPS_SIGNING_SECRET).",
    )
    _add_fetch_options(fetch)
    fetch.set_defaults(run=_fetch)

    summary = commands.add_parser(
        "summary",
        help="summarise a data root",
        description="Cells, images per source, coverage per district, scores.",
    )
    summary.add_argument("--data", default=DEFAULT_DATA, help="data root (default: %(default)s)")
    summary.set_defaults(run=_summary)

    scene = commands.add_parser(
        "scene-filter",
        help="train the Places365-style scene classifier on scene labels",
        description="Train a scene classifier, score every Flickr photo (cached beside "
        "the catalog) and save its backbone as ground weights.",
    )
    _add_encoder_options(scene, epochs=6)
    scene.add_argument(
        "--checkpoint",
        help="a trained classifier (e.g. Places365 ResNet-50) to score with, "
        "instead of training one",
    )
    scene.add_argument(
        "--scene-names", help="its class names, one per line (categories_places365.txt works)"
    )
    scene.add_argument(
        "--building-scenes",
        default="building,street",
        help="comma-separated building-related scenes (default: %(default)s)",
    )
    scene.add_argument(
        "--indoor-scenes",
        default="food,interior",
        help="comma-separated indoor scenes, for the outdoor subset (default: %(default)s)",
    )
    scene.add_argument(
        "--threshold", type=float, default=0.5, help="probability threshold (default: %(default)s)"
    )
    scene.set_defaults(run=_scene_filter)

    perception = commands.add_parser(
        "perception",
        help="train a Place Pulse 2 style perception encoder",
        description="Train on pairwise votes (perception/votes.csv) with a RankNet "
        "loss and save the backbone as ground weights.",
    )
    _add_encoder_options(perception, epochs=6)
    perception.set_defaults(run=_perception)

    fusion = commands.add_parser(
        "fusion",
        help="train one aerial/ground fusion model",
        description="Train the cross-modal housing-quality model and write a run folder.",
    )
    _add_fusion_options(fusion)
    fusion.set_defaults(run=_fusion)

    matrix = commands.add_parser(
        "fusion-matrix",
        help="the paper's experiment matrix over several seeds",
        description="aerial, GSV, aerial+GSV, aerial+Flickr (all/outdoor/building) and "
        "ground-weight variants; writes fusion_matrix.csv and .md.",
    )
    _add_fusion_options(matrix)
    matrix.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    matrix.add_argument("--out", help="report folder (default: DATA/reports)")
    matrix.add_argument(
        "--compare-weights",
        action="append",
        default=[],
        metavar="NAME=FILE_OR_RUN",
        help="more ground weights to compare on aerial+gsv (repeatable), e.g. "
        "imagenet=resnet50_a1_in1k.safetensors",
    )
    matrix.add_argument(
        "--only",
        nargs="+",
        metavar="CONFIGURATION",
        help="train only these configurations (e.g. 'aerial+gsv [contrastive weights]') and "
        "merge them into the existing report, replacing their earlier rows",
    )
    matrix.set_defaults(run=_fusion_matrix)

    demo_runs = commands.add_parser(
        "demo-runs",
        help="train the dashboard's default runs if missing",
        description="Scene filter, perception encoder, and the fusion runs aerial, "
        "aerial+gsv and aerial+flickr(building), each only if missing.",
    )
    demo_runs.add_argument("--data", default=DEFAULT_DATA, help="data root (default: %(default)s)")
    demo_runs.add_argument("--device", default="auto")
    demo_runs.set_defaults(run=_demo_runs)

    contrastive = commands.add_parser(
        "contrastive",
        help="spatiotemporal contrastive pretraining of a street-view encoder (MoCo v3)",
        description="UrbanSTCL pretraining: temporal, spatial or global positive pairs, or a weighted sum of the "
        "three (unified). Writes a run with backbone.safetensors (usable as --ground-weights) "
        "and per-cell embeddings.",
    )
    _add_contrastive_options(contrastive)
    contrastive.add_argument("--objective", choices=OBJECTIVES, default="temporal")
    contrastive.add_argument(
        "--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint"
    )
    contrastive.set_defaults(run=_contrastive)

    contrastive_eval = commands.add_parser(
        "contrastive-eval",
        help="place recognition, socioeconomic R2 and perception of contrastive runs",
        description="Evaluate contrastive runs against baseline encoders (random, the demo's perception and scene "
        "encoders when present, and --compare-weights) on the same images.",
    )
    contrastive_eval.add_argument("runs", nargs="+", metavar="RUN", help="contrastive run ids")
    contrastive_eval.add_argument(
        "--data", default=DEFAULT_DATA, help="data root (default: %(default)s)"
    )
    contrastive_eval.add_argument("--device", default="auto")
    _add_evaluation_options(contrastive_eval)
    contrastive_eval.set_defaults(run=_contrastive_eval)

    contrastive_matrix = commands.add_parser(
        "contrastive-matrix",
        help="train every objective over several seeds, then evaluate them all",
        description="The paper's comparison: temporal, spatial, global and unified objectives, each seed on the "
        "same held-out blocks, evaluated with the baselines; report in DATA/reports.",
    )
    _add_contrastive_options(contrastive_matrix)
    contrastive_matrix.add_argument(
        "--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES
    )
    contrastive_matrix.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    _add_evaluation_options(contrastive_matrix)
    contrastive_matrix.set_defaults(run=_contrastive_matrix)

    ugdata = commands.add_parser(
        "ugdata",
        help="build UGData: images anchored to the street graph, spatial captions and paths",
        description="Writes the UrbanGraphEmbeddings training data (the paper's JSONL + graph JSON layout) for a "
        "data root, with one district optionally held out.",
    )
    ugdata.add_argument("--data", default=DEFAULT_DATA, help="data root (default: %(default)s)")
    ugdata.add_argument("--out", help="output folder (default: DATA/ugdata; must not exist)")
    ugdata.add_argument("--seed", type=int, default=0)
    ugdata.add_argument("--max-images", type=int, help="a seeded random subset of the images")
    ugdata.add_argument("--hops", type=int, default=2, help="hops of each image's street subgraph")
    ugdata.add_argument(
        "--holdout-district", help="a district kept out of training (heldout.jsonl)"
    )
    ugdata.set_defaults(run=_ugdata)

    uge = commands.add_parser(
        "uge",
        help="train spatially grounded VLM embeddings (LoRA stage 1, graph stage 2)",
        description="Stage 1: LoRA on a Qwen2-VL backbone, image-text InfoNCE on UGData; stage 2: a GATv2 graph "
        "encoder fused with the image embedding. Without --vlm a tiny Qwen2-VL is built locally.",
    )
    uge.add_argument("--data", default=DEFAULT_DATA, help="data root (default: %(default)s)")
    uge.add_argument("--ugdata", help="UGData folder (default: DATA/ugdata)")
    uge.add_argument(
        "--vlm", help="local Qwen2-VL / Qwen2.5-VL checkpoint folder (default: the tiny model)"
    )
    uge.add_argument(
        "--tiny-pretrain-steps",
        type=int,
        default=2000,
        help="captioning pretraining of the tiny model before stage 1, cached per step count "
        "(ignored with --vlm; 0 = a randomly initialised backbone)",
    )
    uge.add_argument("--stage1-steps", type=int, default=600)
    uge.add_argument("--stage2-steps", type=int, default=1000)
    uge.add_argument(
        "--stage2-questions",
        type=int,
        default=4000,
        help="spatial-reasoning walks stage 2 trains on, beside the place captions",
    )
    uge.add_argument(
        "--place-dim",
        type=int,
        default=16,
        help="sinusoidal features of the graph nodes' absolute coordinates (0: relative only)",
    )
    uge.add_argument("--batch-size", type=int, default=16)
    uge.add_argument("--lr", type=float, default=3e-3, help="LoRA learning rate")
    uge.add_argument(
        "--temperature",
        type=float,
        default=0.05,
        help="InfoNCE temperature (the paper: 0.01 with a pretrained VLM; 0.05 for the tiny model)",
    )
    uge.add_argument("--lora-r", type=int, default=8)
    uge.add_argument("--image-px", type=int, default=112, help="images are resized to this square")
    uge.add_argument("--seed", type=int, default=0)
    uge.add_argument("--device", default="auto")
    uge.set_defaults(run=_uge)

    uge_bench = commands.add_parser(
        "uge-bench",
        help="UGBench: geolocation, retrieval, perception and grounding at stages 0, 1 and 2",
        description="Evaluates uge runs on their UGData (training and held-out samples) with the backbone before "
        "training (stage 0), after stage 1 and after stage 2.",
    )
    uge_bench.add_argument(
        "run_ids",
        metavar="RUN",
        nargs="+",
        help="uge run ids (several: one per seed, reported as mean ± std)",
    )
    uge_bench.add_argument("--data", default=DEFAULT_DATA, help="data root (default: %(default)s)")
    uge_bench.add_argument(
        "--candidates", type=int, default=10, help="candidates per ranking query"
    )
    uge_bench.add_argument(
        "--max-queries",
        type=int,
        default=3000,
        help="queries per task and split (the default covers the demo's whole held-out district)",
    )
    uge_bench.add_argument("--out", help="report folder (default: DATA/reports)")
    uge_bench.set_defaults(run=_uge_bench)

    worker = commands.add_parser(
        "worker",
        help="run the dashboard's queued training jobs",
        description="Run the jobs queued in DATA/runs/jobs.sqlite one at a time (one worker per "
        "data root; a second one exits at once). SIGTERM stops the current job as "
        "failed and exits.",
    )
    worker.add_argument("--data", default=DEFAULT_DATA, help="data root (default: %(default)s)")
    worker.add_argument(
        "--exit-when-idle",
        type=float,
        metavar="SECONDS",
        help="exit after this long with nothing queued (default: never)",
    )
    worker.add_argument(
        "--poll",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="time between looks at an empty queue (default: %(default)s)",
    )
    worker.add_argument(
        "--stale-after",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="fail a running job whose heartbeat is this old: its worker died "
        "(default: %(default)s)",
    )
    worker.add_argument("--once", action="store_true", help="run at most one job, then exit")
    worker.set_defaults(run=_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as exc:
        # bad input: the message names the file and the problem; a traceback adds nothing
        if os.environ.get("STADSBEELD_TRACEBACK"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
