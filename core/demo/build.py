"""Build the synthetic Amsterdam on disk, in the real formats, atomically.

Layout of a demo data root (every file in the format a real source would give):

- ``grid.parquet``: the extent's 100 m cells (GeoParquet) with buurt and district;
- ``labels/lbm_scores.csv`` + ``labels/lbm_grid.gpkg``: Leefbaarometer 3.0 release format,
  the release years 2016, 2018, 2020 and 2022;
- ``aerial/aerial.tif`` + ``aerial/<year>.tif``: tiled, compressed GeoTIFF mosaics, EPSG:28992,
  4 m/pixel, one per imagery year 2016..2024 (``aerial.tif`` is 2022's, the reference year);
- ``street/catalog.parquet`` + ``street/images/<source>/<block>/<id>.jpg``: the
  street-level catalog and its JPEG files, of the sources :data:`STREET_SOURCES`;
- ``street/flickr_scene_labels.csv``: the true scene of each Flickr photo (to train and
  evaluate the scene filter);
- ``graph/streets.gpkg``: street graph, layers ``nodes`` and ``edges`` as osmnx writes them;
- ``perception/votes.csv``: Place Pulse 2 style pairwise votes on GSV images;
- ``socioeconomic/buurt_targets.csv``: per-buurt targets keyed by ``cbsCode``;
- ``context/water.gpkg``: water polygons for the map (a real root takes them from OSM or BGT);
- ``context/parks.gpkg``: parks and woods without their water, same format (for the spatial
  context captions of the VLM dataset; a real root takes them from OSM or BGT);
- ``truth/cells.parquet``: the latent fields (for analysis only; no model reads them);
  ``truth/years.parquet``: the latents that change, per imagery year, with the change site
  that moves them; ``truth/scores.parquet``: the scores of every imagery year;
- ``demo.json``: seed, extent, sizes, the aerial mosaic's year and timings; written last.

The whole tree is built under a temporary name beside ``out`` and renamed when complete.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from PIL import Image
from tqdm import tqdm

from core.demo import city, street
from core.demo.aerial import street_areas, write_aerial_years
from core.grid import CELL_SIZE, RD_NEW, cell_index, cell_polygons, to_geodataframe, write_grid
from core.io import building, utc_now
from core.progress import Progress
from core.sources.catalog import write_catalog
from core.sources.lbm import write_lbm

GENERATOR_VERSION = 3
#: The demo's street-level sources, in catalog order.
STREET_SOURCES = ("gsv", "flickr", "amsterdam_panorama", "mapillary")
#: JPEG quality per source: survey cameras are stored best, crowd-sourced phone images worst.
JPEG_QUALITY = {"gsv": 90, "flickr": 82, "amsterdam_panorama": 90, "mapillary": 70}
LICENCES = {
    "gsv": "synthetic",
    "flickr": "CC BY 2.0 (synthetic)",
    "amsterdam_panorama": "Gemeente Amsterdam open data (synthetic)",
    "mapillary": "CC BY-SA 4.0 (synthetic)",
}
T = TypeVar("T")
MANIFEST = "demo.json"
_CHUNK = 2000


@dataclass
class DemoConfig:
    """What to build. Sizes are for the whole city; an extent keeps its share."""

    seed: int = 7
    """Seed of everything the city is drawn from."""
    extent: str = "city"
    """city, a district (centrum, west, nieuw-west, zuid, oost, noord, zuidoost, westpoort,
    weesp) or bbox:minx,miny,maxx,maxy in RD metres."""
    flickr_photos: int = 30_000
    """Flickr photos for the whole city (an extent keeps its share)."""
    gsv_locations_per_cell: int = 2
    """Street View panorama locations per street cell."""
    aerial_margin_m: float = 300.0
    """Aerial mosaic beyond the extent's cells, in metres."""
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    """Processes rendering the street images and drawing the aerial mosaics."""


def extent_cells(fields: city.CityFields, extent: str) -> np.ndarray:
    """Cell ids of an extent: ``city``, a district name (``centrum``, ``nieuw-west``, ...) or
    ``bbox:minx,miny,maxx,maxy`` in RD metres."""
    cells = fields.cells
    key = extent.strip().lower()
    if key == "city":
        return cells.index.to_numpy()
    if key.startswith("bbox:"):
        try:
            minx, miny, maxx, maxy = (float(v) for v in key[5:].split(","))
        except ValueError as exc:
            raise ValueError(
                f"extent {extent!r}: expected bbox:minx,miny,maxx,maxy in RD metres"
            ) from exc
        inside = cells["x"].between(minx, maxx) & cells["y"].between(miny, maxy)
        if not inside.any():
            raise ValueError(
                f"extent {extent!r}: no cell of Amsterdam lies in this box (RD New metres)"
            )
        return cells.index.to_numpy()[inside.to_numpy()]
    names = {d.lower().replace("-", ""): d for d in cells["district"].unique() if d}
    district = names.get(key.replace("-", "").replace(" ", ""))
    if district is None:
        raise ValueError(
            f"unknown extent {extent!r}: use 'city', 'bbox:minx,miny,maxx,maxy' or one of "
            f"{sorted(d.lower() for d in names.values())}"
        )
    return cells.index.to_numpy()[(cells["district"] == district).to_numpy()]


def build_demo(
    out: str | os.PathLike,
    config: DemoConfig | None = None,
    show_progress: bool = True,
    *,
    progress: Progress | None = None,
    replace: bool = False,
    keep: Sequence[str] = (),
) -> dict:
    """Generate the demo city into ``out`` and return its manifest.

    The tree is built beside ``out`` and renamed into place when complete (:func:`building`).

    Args:
        out: the data root to create.
        config: what to build (default :class:`DemoConfig`).
        show_progress: show progress bars on the terminal.
        progress: called with ``stage`` as each stage starts, and with ``stage``, ``done`` and
            ``total`` as the street images and the aerial rows are written.
        replace: replace an existing ``out``, once the new city is complete.
        keep: entries of the old ``out`` the new city takes over (e.g. ``("runs",)``: the
            trained runs and the job database), moved in just before the swap.

    Raises:
        FileExistsError: if ``out`` already exists and ``replace`` is false (the caller
            decides whether to keep it).
    """
    config = config or DemoConfig()
    out = Path(out)
    if out.exists() and not replace:
        raise FileExistsError(f"{out}: already exists; remove it or choose another --out")
    timings: dict[str, float] = {}
    with building(out, replace=replace, keep=keep) as tmp:
        manifest = _build_into(tmp, config, show_progress, progress, timings)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


class _Stages:
    """Times each stage and reports it to the progress callback."""

    def __init__(self, timings: dict[str, float], progress: Progress | None) -> None:
        self.timings, self.progress = timings, progress

    def run(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.progress is not None:
            self.progress({"stage": name})
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - start, 3)
        return result


def _build_into(
    root: Path,
    config: DemoConfig,
    show_progress: bool,
    progress: Progress | None,
    timings: dict[str, float],
) -> dict:
    started = time.perf_counter()
    stages = _Stages(timings, progress)
    fields = stages.run("latent fields", city.build_fields, config.seed)
    ids = extent_cells(fields, config.extent)
    cells = fields.lookup(ids)

    grid = to_geodataframe(
        ids,
        **{
            c: cells[c].to_numpy()
            for c in ("buurt_code", "buurt_naam", "cbs_code", "district", "labelled")
        },
    )
    write_grid(grid, root / "grid.parquet")
    labels = pd.concat([city.scores(fields, year) for year in city.LABEL_YEARS], ignore_index=True)
    labels = labels[labels["grid_id"].isin(ids)]
    labels = gpd.GeoDataFrame(
        labels, geometry=cell_polygons(labels["grid_id"].to_numpy()), crs=RD_NEW
    )
    stages.run(
        "labels",
        write_lbm,
        labels,
        root / "labels" / "lbm_scores.csv",
        root / "labels" / "lbm_grid.gpkg",
    )

    graph = stages.run("street graph", street.build_street_graph, fields, ids, config.seed)
    _write_graph(graph, root / "graph" / "streets.gpkg")
    gsv = stages.run(
        "sample gsv",
        street.sample_gsv,
        fields,
        graph,
        ids,
        config.seed,
        config.gsv_locations_per_cell,
    )
    flickr = stages.run(
        "sample flickr", street.sample_flickr, fields, ids, config.seed, config.flickr_photos
    )
    flickr = flickr[flickr["cell_id"].isin(ids)].reset_index(drop=True)
    panorama = stages.run(
        "sample amsterdam_panorama", street.sample_panorama, fields, graph, ids, config.seed
    )
    mapillary = stages.run(
        "sample mapillary", street.sample_mapillary, fields, graph, ids, config.seed
    )
    # GSV and Flickr render in the chunks (and seeds) they always had; each newer source in
    # its own, so adding a source leaves the others' pixels as they were
    groups = [pd.concat([gsv, flickr], ignore_index=True), panorama, mapillary]
    for group in groups:
        group["path"] = [
            f"images/{s}/{_block(c)}/{i}.jpg"
            for s, c, i in zip(group["source"], group["cell_id"], group["id"], strict=True)
        ]
    images = pd.concat(groups, ignore_index=True)

    bar = tqdm(total=len(images), unit="img", desc="street images", disable=not show_progress)
    start = time.perf_counter()
    done = 0
    if progress is not None:
        progress({"stage": "street images"})
    for count in _render_all(groups, root / "street", config):
        bar.update(count)
        done += count
        if progress is not None:
            progress({"stage": "street images", "done": done, "total": len(images)})
    bar.close()
    timings["street images"] = round(time.perf_counter() - start, 3)
    _write_catalog(images, root / "street")

    x0, y0 = cells["x"].min() - CELL_SIZE / 2, cells["y"].min() - CELL_SIZE / 2
    bounds = (
        x0 - config.aerial_margin_m,
        y0 - config.aerial_margin_m,
        cells["x"].max() + CELL_SIZE / 2 + config.aerial_margin_m,
        cells["y"].max() + CELL_SIZE / 2 + config.aerial_margin_m,
    )
    with tqdm(
        total=len(city.IMAGERY_YEARS), unit="year", desc="aerial mosaics", disable=not show_progress
    ) as aerial_bar:

        def aerial_progress(values: dict) -> None:
            aerial_bar.update(values["done"] - aerial_bar.n)
            if progress is not None:
                progress({"stage": "aerial mosaic", **values})

        stages.run(
            "aerial mosaic",
            write_aerial_years,
            fields.yearly,
            city.REFERENCE_YEAR,
            bounds,
            street_areas(graph.edges["geometry"].to_numpy()),
            root / "aerial",
            config.seed,
            aerial_progress,
            config.workers,
        )

    stages.run(
        "perception votes", _write_votes, gsv, root / "perception" / "votes.csv", config.seed
    )
    stages.run(
        "socioeconomic",
        _write_socioeconomic,
        fields,
        ids,
        root / "socioeconomic" / "buurt_targets.csv",
        config.seed,
    )
    stages.run("context", _write_context, bounds, root / "context")
    truth = root / "truth"
    truth.mkdir()
    cells.drop(columns=["cell_id"]).reset_index().to_parquet(truth / "cells.parquet", index=False)
    stages.run("truth by year", _write_truth_years, fields, ids, truth)

    counts = images["source"].value_counts()
    return {
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
        "cells": int(len(ids)),
        "labelled_cells": int(cells["labelled"].sum()),
        "label_years": list(city.LABEL_YEARS),
        "imagery_years": list(city.IMAGERY_YEARS),
        # aerial.tif is the reference year's; the others are aerial/<year>.tif
        # (core.dataroot.DataRoot.aerial_years)
        "aerial_year": city.REFERENCE_YEAR,
        "change_sites": [asdict(site) for site in city.CHANGE_SITES],
        "images": {s: int(counts.get(s, 0)) for s in STREET_SOURCES},
        "street_nodes": int(len(graph.nodes)),
        "street_edges": int(len(graph.edges)),
        "timings_s": timings,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "created": utc_now(),
    }


def _write_truth_years(fields: city.CityFields, ids: np.ndarray, folder: Path) -> None:
    """What changes, year by year: ``years.parquet`` (the yearly latents of every cell and the
    change site that reaches it) and ``scores.parquet`` (the scores of every imagery year, also
    the years without a release)."""
    cells = fields.lookup(ids)
    site = city.change_site(cells["x"].to_numpy(), cells["y"].to_numpy())
    years = [
        fields.yearly[year]
        .loc[ids]
        .assign(year=year, site=site)
        .rename_axis("cell_id")
        .reset_index()
        for year in city.IMAGERY_YEARS
    ]
    pd.concat(years, ignore_index=True).to_parquet(folder / "years.parquet", index=False)
    scores = pd.concat(
        [city.scores(fields, year) for year in city.IMAGERY_YEARS], ignore_index=True
    )
    scores[scores["grid_id"].isin(ids)].to_parquet(folder / "scores.parquet", index=False)


def _write_context(bounds: tuple[float, float, float, float], folder: Path) -> None:
    """Water and park polygons of the extent: ``water.gpkg`` and ``parks.gpkg``."""
    _write_water(bounds, folder / "water.gpkg")
    _write_parks(bounds, folder / "parks.gpkg")


def _write_water(bounds: tuple[float, float, float, float], path: Path) -> None:
    """The demo's water (the IJ, the Amstel, canals, lakes) inside the extent, EPSG:28992."""
    _write_polygons(city.water_geometry(), "water", bounds, path)


def _write_parks(bounds: tuple[float, float, float, float], path: Path) -> None:
    """The demo's parks and woods (without their water) inside the extent, EPSG:28992."""
    _write_polygons(city.park_geometry(), "park", bounds, path)


def _write_polygons(
    geometry: shapely.Geometry, kind: str, bounds: tuple[float, float, float, float], path: Path
) -> None:
    clipped = shapely.clip_by_rect(geometry, *bounds)
    parts = [g for g in getattr(clipped, "geoms", [clipped]) if not g.is_empty]
    path.parent.mkdir(parents=True, exist_ok=True)
    gpd.GeoDataFrame({"kind": [kind] * len(parts)}, geometry=parts, crs=RD_NEW).to_file(path)


def _block(cell: int) -> str:
    ix, iy = cell_index(cell)
    return f"{ix // 10}_{iy // 10}"  # 1 km folders keep directory listings small


def _render_all(
    groups: Sequence[pd.DataFrame], street_root: Path, config: DemoConfig
) -> Iterator[int]:
    """Render and encode images in chunks, in parallel; yields the count done per chunk.

    Each group is chunked on its own; the first keeps the seeds ``[seed, row]`` it always had,
    group ``k`` gets ``[seed, k, row]``.
    """
    for folder in {str(Path(p).parent) for group in groups for p in group["path"]}:
        (street_root / folder).mkdir(parents=True, exist_ok=True)
    chunks = [
        (group.iloc[i : i + _CHUNK], street_root, [config.seed, *([k] if k else []), i])
        for k, group in enumerate(groups)
        for i in range(0, len(group), _CHUNK)
    ]
    if config.workers <= 1:
        for chunk in chunks:
            yield _render_chunk(*chunk)
        return
    with ProcessPoolExecutor(config.workers) as pool:
        yield from pool.map(_render_chunk, *zip(*chunks, strict=True))


def _render_chunk(table: pd.DataFrame, street_root: Path, seed: list[int]) -> int:
    pixels = street.render(table, seed=int(np.random.SeedSequence(seed).generate_state(1)[0]))
    quality = table["source"].map(JPEG_QUALITY).to_numpy()
    for image, rel, q in zip(pixels, table["path"], quality, strict=True):
        Image.fromarray(image).resize((street.IMAGE_PX, street.IMAGE_PX), Image.BILINEAR).save(
            street_root / rel, "JPEG", quality=int(q)
        )
    return len(table)


def _write_catalog(images: pd.DataFrame, street_root: Path) -> None:
    catalog = pd.DataFrame(
        {
            "id": images["id"],
            "source": images["source"],
            "path": [os.path.join(street_root, p) for p in images["path"]],
            "x": images["x"].round(2),
            "y": images["y"].round(2),
            "heading": images["heading"],
            "captured_at": images["captured_at"],
            "pano_id": images["pano_id"],
            "title": images.get("title"),
            "tags": images.get("tags"),
            "license": images["source"].map(LICENCES),
            "sequence": images.get("sequence"),
        }
    )
    write_catalog(catalog, street_root / "catalog.parquet")
    flickr = images["source"] == "flickr"
    images.loc[flickr, ["id", "scene"]].to_csv(street_root / "flickr_scene_labels.csv", index=False)


def _write_graph(graph: street.StreetGraph, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nodes = gpd.GeoDataFrame(
        graph.nodes, geometry=gpd.points_from_xy(graph.nodes["x"], graph.nodes["y"]), crs=RD_NEW
    )
    degree = pd.concat([graph.edges["u"], graph.edges["v"]]).value_counts()
    nodes["street_count"] = nodes["osmid"].map(degree).fillna(0).astype(int)
    edges = gpd.GeoDataFrame(
        graph.edges.assign(key=0, highway="residential"), geometry="geometry", crs=RD_NEW
    )
    nodes.to_file(path, layer="nodes", driver="GPKG")
    edges.to_file(path, layer="edges", driver="GPKG")


PERCEPTION_CATEGORIES = ("safety", "beautiful", "lively", "wealthy")


def perception_scores(images: pd.DataFrame) -> pd.DataFrame:
    """Latent perception of each image (what a crowd would see), one column per category."""
    upkeep, litter = images["upkeep"].to_numpy(), images["litter"].to_numpy()
    return pd.DataFrame(
        {
            "safety": upkeep - 0.8 * litter + 0.8 * images["daylight"].to_numpy(),
            "beautiful": 1.5 * images["greenery"].to_numpy()
            + 0.5 * upkeep
            + city.era_value(images["era"]) * -0.4
            + images["water_near"].to_numpy(),
            "lively": images["shops"].to_numpy() + 1.5 * images["density"].to_numpy(),
            "wealthy": upkeep - 0.5 * litter - 0.5 * city.era_value(images["era"]),
        },
        index=images.index,
    )


def _write_votes(gsv: pd.DataFrame, path: Path, seed: int, votes_per_category: int = 6000) -> None:
    rng = np.random.default_rng([seed, 8])
    scores = perception_scores(gsv)
    rows = []
    ids = gsv["id"].to_numpy()
    lat_lon = gpd.GeoSeries(gpd.points_from_xy(gsv["x"], gsv["y"]), crs=RD_NEW).to_crs("EPSG:4326")
    for category in PERCEPTION_CATEGORIES:
        s = scores[category].to_numpy()
        s = (s - s.mean()) / s.std()
        left, right = rng.integers(0, len(gsv), (2, votes_per_category))
        diff = s[left] - s[right]
        p_left = 1 / (1 + np.exp(-2.5 * diff))
        draw = rng.random(votes_per_category)
        winner = np.where(np.abs(diff) < 0.08, "equal", np.where(draw < p_left, "left", "right"))
        rows.append(
            pd.DataFrame(
                {
                    "left_id": ids[left],
                    "right_id": ids[right],
                    "winner": winner,
                    "left_lat": lat_lon.y.to_numpy()[left].round(6),
                    "left_long": lat_lon.x.to_numpy()[left].round(6),
                    "right_lat": lat_lon.y.to_numpy()[right].round(6),
                    "right_long": lat_lon.x.to_numpy()[right].round(6),
                    "category": category,
                }
            )
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(rows, ignore_index=True).to_csv(path, index=False)


def _write_socioeconomic(fields: city.CityFields, ids: np.ndarray, path: Path, seed: int) -> None:
    rng = np.random.default_rng([seed, 9])
    cells = fields.lookup(ids)
    cells = cells[cells["labelled"] & (cells["cbs_code"] != "")].assign(
        era_value=lambda c: city.era_value(c["era"])
    )
    per_buurt = cells.groupby(["cbs_code", "buurt_code", "buurt_naam"], as_index=False)[
        ["upkeep", "litter", "era_value", "greenery", "density", "social", "water_near"]
    ].mean()
    n = len(per_buurt)
    b = per_buurt
    targets = pd.DataFrame(
        {
            "cbsCode": b["cbs_code"],
            "code": b["buurt_code"],
            "naam": b["buurt_naam"],
            "income": (
                34
                + 7 * b["upkeep"]
                + 4 * b["era_value"]
                + 5 * b["water_near"]
                + 3 * rng.standard_normal(n)
            ).round(1),
            "social_housing_share": np.clip(
                0.42
                - 0.12 * b["upkeep"]
                - 0.1 * b["era_value"]
                + 0.1 * b["litter"]
                + 0.06 * rng.standard_normal(n),
                0.02,
                0.95,
            ).round(3),
            "woz_value": (
                380
                + 90 * b["upkeep"]
                + 60 * b["era_value"]
                + 80 * b["water_near"]
                + 40 * rng.standard_normal(n)
            ).round(0),
            "unemployment": np.clip(
                0.07 - 0.015 * b["upkeep"] + 0.01 * b["litter"] + 0.01 * rng.standard_normal(n),
                0.01,
                0.3,
            ).round(3),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    targets.to_csv(path, index=False)
