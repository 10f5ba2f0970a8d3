"""``python -m train ugdata``: write the UGData dataset of a data root (see :mod:`core.ugdata`)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

from core.ugdata import (
    GRAPH_DIR,
    HELDOUT_FILE,
    LAYOUT_VERSION,
    MANIFEST,
    TRAIN_FILE,
    build_samples,
    graph_file_name,
    load_city,
    split_by_district,
    write_graph,
    write_samples,
)


def build_ugdata(
    data: str,
    out: str,
    seed: int = 0,
    max_images: int | None = None,
    hops: int = 2,
    holdout_district: str | None = None,
    paths_per_node: int = 2,
    max_nodes: int = 64,
) -> dict:
    """Build UGData for the data root ``data`` into the new folder ``out``, atomically.

    The folder is written under a temporary name beside ``out`` and renamed when complete, so a
    failed build leaves nothing that looks like a dataset.

    Args:
        data: the data root (grid, street graph, catalog; water and parks layers if present).
        out: the output folder; must not exist.
        seed: seeds the image subset, caption templates and reasoning walks.
        max_images: use at most this many images (a seeded random subset); all when ``None``.
        hops: hops of each graph record around the image's anchor node.
        holdout_district: a district whose samples go to ``heldout.jsonl`` instead of
            ``train.jsonl`` (samples crossing into it are left out of both).
        paths_per_node: reasoning paths per anchor node.
        max_nodes: node cap of a graph record.

    Returns:
        The manifest: counts per file and pair type, graphs, images, options and timings.

    Raises:
        FileExistsError: if ``out`` exists.
        FileNotFoundError: naming a missing input file.
        ValueError: for a held-out district that occurs in no sample.
    """
    out_path = Path(os.path.abspath(out))
    if out_path.exists():
        raise FileExistsError(f"{out_path}: already exists; remove it or choose another --out")
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 3)
        return now

    context = load_city(data)
    t = lap("load", started)
    built = build_samples(
        context,
        out_path,
        seed=seed,
        max_images=max_images,
        hops=hops,
        max_nodes=max_nodes,
        paths_per_node=paths_per_node,
    )
    t = lap("samples", t)
    files = {TRAIN_FILE: built.samples}
    dropped = 0
    if holdout_district:
        split = split_by_district(built.samples, holdout_district)
        files = {TRAIN_FILE: split.train, HELDOUT_FILE: split.heldout}
        dropped = len(split.dropped)
    used = {g for samples in files.values() for s in samples for g in s.graphs}

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / GRAPH_DIR).mkdir(parents=True)
    try:
        graphs = 0
        for node_id, record in built.graphs.items():
            name = f"{GRAPH_DIR}/{graph_file_name(node_id)}"
            if name in used:
                write_graph(record, tmp / name)
                graphs += 1
        counts = {name: write_samples(samples, tmp / name) for name, samples in files.items()}
        t = lap("write", t)
        manifest = {
            "layout_version": LAYOUT_VERSION,
            "data": str(Path(data).resolve()),
            "options": {
                "seed": seed,
                "max_images": max_images,
                "hops": hops,
                "holdout_district": holdout_district,
                "paths_per_node": paths_per_node,
                "max_nodes": max_nodes,
                "radius_m": context.radius,
            },
            "context_layers": {
                "water": context.water is not None,
                "parks": context.parks is not None,
            },
            "images": built.images,
            "street_nodes": len(context.graph.node_ids),
            "street_edges": len(context.graph.edges),
            "graphs": graphs,
            "files": counts,
            "pair_types": {
                name: dict(Counter(s.pair_type for s in samples)) for name, samples in files.items()
            },
            "dropped_crossing_holdout": dropped,
            "timings_s": timings,
            "elapsed_s": round(time.perf_counter() - started, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        tmp.rename(out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
