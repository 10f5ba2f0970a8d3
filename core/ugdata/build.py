"""Building UGData: the graph records and samples of a city, the held-out district split,
and :func:`build_ugdata`, which writes a whole folder atomically."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.dataroot import DataRoot
from core.grid import cell_id
from core.io import building
from core.ugdata.captions import Captioner, TemplateCaptioner
from core.ugdata.context import CityContext, PlaceFacts, load_city
from core.ugdata.geometry import KeyedRng
from core.ugdata.io import write_graph, write_samples
from core.ugdata.paths import reasoning_path
from core.ugdata.records import (
    GRAPH_DIR,
    HELDOUT_FILE,
    INSTRUCTIONS,
    LAYOUT_VERSION,
    MANIFEST,
    PAIR_CAPTION,
    PAIR_GRAPH,
    PAIR_REASONING,
    TRAIN_FILE,
    GraphRecord,
    UGSample,
    graph_file_name,
)


def graph_record(
    context: CityContext, center: int, hops: int = 2, max_nodes: int = 64
) -> GraphRecord:
    """The ``hops``-hop subgraph of node ``center`` with coordinates and node texts."""
    sub = context.graph.subgraph(center, hops, max_nodes)
    nodes = [
        {**context.node_json(i), "hop": h}
        for i, h in zip(sub.nodes.tolist(), sub.hops.tolist(), strict=True)
    ]
    edges = [context.edge_json(e) for e in sub.edges.tolist()]
    return GraphRecord(center_node=str(context.graph.node_ids[center]), nodes=nodes, edges=edges)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@dataclass
class UGBuild:
    """What :func:`build_samples` makes: the samples and the graphs they reference."""

    samples: list[UGSample]
    graphs: dict[str, GraphRecord]
    images: int
    per_source: dict[str, int]


def select_images(
    context: CityContext,
    max_images: int | None,
    seed: int,
    sources: Sequence[str] | None = None,
) -> np.ndarray:
    """Row indices of the images to anchor: all (or those of ``sources``), or a seeded random
    subset of them, in catalog order.

    Raises:
        ValueError: when none of the catalog's images is of ``sources``, naming the sources it
            has.
    """
    rows = np.arange(len(context.images))
    if sources is not None:
        rows = rows[context.images["source"].isin(list(sources)).to_numpy()]
        if not len(rows):
            present = sorted(context.images["source"].unique())
            raise ValueError(
                f"no usable images of the sources {list(sources)} to anchor; the catalog has "
                f"{present}"
            )
    if max_images is None or max_images >= len(rows):
        return rows
    return np.sort(np.random.default_rng([seed, 61]).choice(rows, max_images, replace=False))


def build_samples(
    context: CityContext,
    out: str | PathLike,
    seed: int = 0,
    max_images: int | None = None,
    hops: int = 2,
    max_nodes: int = 64,
    paths_per_node: int = 2,
    captioner: Captioner | None = None,
    sources: Sequence[str] | None = None,
) -> UGBuild:
    """Caption, graph-caption and reasoning samples for the images of a city.

    Every selected image gives a ``stage1_image_only`` and a ``stage2_image_graph`` sample;
    every anchor node gives up to ``paths_per_node`` ``stage1_spatial_reasoning`` samples
    (on images anchored there), so paths do not repeat per capture of the same spot.

    Args:
        context: from :func:`load_city`.
        out: the output folder the paths in the samples are made relative to.
        seed: seeds image selection, templates and walks.
        max_images: use at most this many images (a seeded random subset).
        hops: hops of the graph records around each anchor node.
        max_nodes: node cap of a graph record.
        paths_per_node: reasoning paths per anchor node.
        captioner: the captioner (default :class:`TemplateCaptioner` with ``seed``).
        sources: anchor only the images of these catalog sources (default: every source);
            the others still count in the captions' context (e.g. photos nearby).
    """
    captioner = captioner or TemplateCaptioner(seed, context.radius)
    out = Path(os.path.abspath(out))
    rows = select_images(context, max_images, seed, sources)
    images = context.images.iloc[rows].reset_index(drop=True)
    nodes = images["node"].to_numpy(np.int64)
    xy = images[["x", "y"]].to_numpy(float)
    facts = context.facts(images["id"].astype(str).tolist(), xy, nodes, images)
    rel = _relative(images["path"].astype(str).tolist(), out)
    cells = cell_id(xy[:, 0], xy[:, 1]) if len(xy) else np.zeros(0, np.int64)
    graph = context.graph
    graphs: dict[str, GraphRecord] = {}
    for node in np.unique(nodes).tolist():
        graphs[str(graph.node_ids[node])] = graph_record(context, node, hops, max_nodes)

    districts = {node_id: record.districts for node_id, record in graphs.items()}
    records = images[["id", "source", "path"]].astype(str).to_dict("records")
    samples: list[UGSample] = []
    for i, f in enumerate(facts):
        node_id = str(graph.node_ids[nodes[i]])
        meta = _image_meta(records[i], f, node_id, int(cells[i]))
        caption = captioner.caption(f, records[i]["path"])
        samples.append(
            UGSample(
                _user(INSTRUCTIONS[PAIR_CAPTION]),
                [_user(caption)],
                [rel[i]],
                [],
                PAIR_CAPTION,
                1,
                {**meta, "sample_id": f"caption:{f.key}"},
            )
        )
        samples.append(
            UGSample(
                _user(INSTRUCTIONS[PAIR_GRAPH]),
                [_user(caption)],
                [rel[i]],
                [f"{GRAPH_DIR}/{graph_file_name(node_id)}"],
                PAIR_GRAPH,
                1,
                {
                    **meta,
                    "sample_id": f"graph:{f.key}",
                    "districts": sorted(set(meta["districts"]) | districts[node_id]),
                },
            )
        )

    by_node = pd.Series(np.arange(len(images))).groupby(nodes).apply(list)
    for node, members in by_node.items():
        node_id = str(graph.node_ids[node])
        for j in range(paths_per_node):
            rng = KeyedRng(f"{seed}|path|{node_id}|{j}")
            path = reasoning_path(context, int(node), rng)
            if path is None:
                break
            i = members[rng.randrange(len(members))]
            meta = _image_meta(records[i], facts[i], node_id, int(cells[i]))
            path_districts = {str(context.node_district[n]) for n in path.nodes}
            meta.update(
                {
                    "sample_id": f"path:{node_id}:{j}",
                    "task": "reasoning",
                    "districts": sorted((set(meta["districts"]) | path_districts) - {""}),
                    "question_kind": path.kind,
                    "path": [str(graph.node_ids[n]) for n in path.nodes],
                    "steps": list(path.steps),
                    "answer": path.facts,
                }
            )
            samples.append(
                UGSample(
                    _user(INSTRUCTIONS[PAIR_REASONING] + path.question),
                    [_user(path.answer)],
                    [rel[i]],
                    [],
                    PAIR_REASONING,
                    1,
                    meta,
                )
            )
    per_source = {str(k): int(n) for k, n in images["source"].value_counts().sort_index().items()}
    return UGBuild(samples=samples, graphs=graphs, images=len(images), per_source=per_source)


def _image_meta(row: dict[str, str], facts: PlaceFacts, node_id: str, cell: int) -> dict[str, Any]:
    mark = facts.landmarks[0] if facts.landmarks else None
    return {
        "sample_id": "",
        "task": "caption",
        "image_id": str(row["id"]),
        "source": str(row["source"]),
        "cell_id": cell,
        "node_id": node_id,
        "x": round(facts.x, 2),
        "y": round(facts.y, 2),
        "buurt": facts.buurt,
        "district": facts.district,
        "districts": [facts.district] if facts.district else [],
        "landmark": None
        if mark is None
        else {
            "name": mark.name,
            "distance_m": mark.distance_m,
            "bearing_deg": mark.bearing_deg,
            "direction": mark.direction,
        },
    }


def _relative(paths: list[str], out: Path) -> list[str]:
    """Paths relative to ``out``; relpath once per folder (it is slow per file)."""
    folders: dict[str, str] = {}
    result = []
    for p in paths:
        folder, name = os.path.split(os.path.abspath(p))
        if folder not in folders:
            folders[folder] = Path(os.path.relpath(folder, out)).as_posix()
        result.append(f"{folders[folder]}/{name}")
    return result


@dataclass
class DistrictSplit:
    """Samples split by district: ``heldout`` lie in a held-out district, ``train`` touch none,
    ``dropped`` start outside but reach into one (a path or graph crossing the border)."""

    train: list[UGSample]
    heldout: list[UGSample]
    dropped: list[UGSample]


def split_by_district(samples: Iterable[UGSample], holdout: str | Iterable[str]) -> DistrictSplit:
    """Hold out whole districts, the benchmark's analogue of held-out cities.

    Args:
        samples: samples with ``meta["district"]`` and ``meta["districts"]``.
        holdout: one district name or several (case-insensitive).

    Raises:
        ValueError: if a held-out district occurs in no sample (naming the known ones).
    """
    samples = list(samples)
    names = [holdout] if isinstance(holdout, str) else list(holdout)
    wanted = {h.lower() for h in names}
    known = {d for s in samples for d in s.meta.get("districts", [])}
    unknown = [h for h in names if h.lower() not in {d.lower() for d in known}]
    if unknown:
        raise ValueError(
            f"held-out district(s) {unknown} occur in no sample; districts: {sorted(known)}"
        )
    split = DistrictSplit([], [], [])
    for s in samples:
        touched = {d.lower() for d in s.meta.get("districts", [])}
        if str(s.meta.get("district", "")).lower() in wanted:
            split.heldout.append(s)
        elif touched & wanted:
            split.dropped.append(s)
        else:
            split.train.append(s)
    return split


def build_ugdata(
    data: str,
    out: str,
    seed: int = 0,
    max_images: int | None = None,
    hops: int = 2,
    holdout_district: str | None = None,
    paths_per_node: int = 2,
    max_nodes: int = 64,
    sources: Sequence[str] | None = None,
) -> dict:
    """Build UGData for the data root ``data`` into the new folder ``out``, atomically.

    The folder is written under a temporary name beside ``out`` and renamed when complete, so a
    failed build leaves nothing that looks like a dataset. Catalog images that UGE training
    could not decode (missing, corrupt, truncated, outside the catalog's folder) are left out
    with one warning naming them (:func:`~core.ugdata.context.load_city`).

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
        sources: anchor only the images of these catalog sources (e.g. ``["mapillary"]``);
            default every source.

    Returns:
        The manifest: counts per file and pair type, graphs, images, options and timings.

    Raises:
        FileExistsError: if ``out`` exists.
        FileNotFoundError: naming a missing input file.
        ValueError: for a held-out district that occurs in no sample, or naming the catalog
            when none of its images is usable.
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
    if not len(context.images):
        raise ValueError(
            f"{DataRoot(Path(data)).catalog}: no usable images to build UGData from "
            "(rejected rows are named in the catalog warning)"
        )
    t = lap("load", started)
    built = build_samples(
        context,
        out_path,
        seed=seed,
        max_images=max_images,
        hops=hops,
        max_nodes=max_nodes,
        paths_per_node=paths_per_node,
        sources=sources,
    )
    t = lap("samples", t)
    files = {TRAIN_FILE: built.samples}
    dropped = 0
    if holdout_district:
        split = split_by_district(built.samples, holdout_district)
        files = {TRAIN_FILE: split.train, HELDOUT_FILE: split.heldout}
        dropped = len(split.dropped)
    used = {g for samples in files.values() for s in samples for g in s.graphs}

    with building(out_path) as tmp:
        (tmp / GRAPH_DIR).mkdir()
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
                "sources": list(sources) if sources is not None else None,
            },
            "context_layers": {
                "water": context.water is not None,
                "parks": context.parks is not None,
            },
            "images": built.images,
            "images_per_source": built.per_source,
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
    return manifest
