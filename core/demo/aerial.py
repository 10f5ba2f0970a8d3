"""Render the demo city's aerial mosaic from its latent fields and write it as a GeoTIFF.

What the air shows: water and parks (crisp shapes), streets (the street graph), building cover
(density), roof colour and parcel size (building era), and trees and lawns (greenery). Facade
upkeep, litter and shop fronts leave no trace here: they are the street-only part of the score.
Flight strips differ a little in brightness, as real mosaics do.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import nullcontext
from functools import partial
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import rasterio
import shapely
from rasterio import features
from rasterio.transform import Affine, from_origin
from rasterio.windows import Window
from scipy import ndimage

from core.demo.city import park_geometry, water_geometry
from core.grid import CELL_SIZE, RD_NEW, cell_index
from core.progress import Progress

PIXEL_SIZE = 4.0  # metres; real PDOK imagery is 0.25 m and is cut by metres the same way
_TILE = 256  # px: the GeoTIFF's blocks, and the unit a year's mosaic is redrawn in

# Roof colour by era: canal-house tiles, 19th-c. brick, post-war grey, 1970s beige, new dark.
_ERA_STOPS = np.array([0.0, 0.3, 0.6, 0.75, 1.0])
_ROOF_COLOURS = np.array(
    [[178, 92, 68], [128, 72, 62], [152, 152, 150], [196, 184, 160], [64, 66, 78]], float
)
_WATER = np.array([38, 66, 88], float)
_ASPHALT = np.array([78, 78, 84], float)
_GRASS = np.array([96, 132, 64], float)
_PAVING = np.array([132, 128, 120], float)
_TREE = np.array([46, 86, 42], float)


def roof_colour(era: np.ndarray) -> np.ndarray:
    """RGB roof colour for building eras in [0, 1] (piecewise linear palette)."""
    return np.stack([np.interp(era, _ERA_STOPS, _ROOF_COLOURS[:, c]) for c in range(3)], axis=-1)


def _lattice(latents: pd.DataFrame, column: str) -> tuple[np.ndarray, int, int]:
    """A latent as a 2-D array (row 0 = southernmost cell row) plus the lattice origin."""
    ix, iy = cell_index(latents.index.to_numpy())
    grid = np.zeros((iy.max() - iy.min() + 1, ix.max() - ix.min() + 1))
    grid[iy - iy.min(), ix - ix.min()] = latents[column].to_numpy(dtype=float)
    return grid, int(ix.min()), int(iy.min())


def _blocky_noise(rng: np.random.Generator, shape: tuple[int, int], block: int) -> np.ndarray:
    coarse = rng.random((shape[0] // block + 2, shape[1] // block + 2))
    return np.repeat(np.repeat(coarse, block, 0), block, 1)[: shape[0], : shape[1]]


def write_aerial(
    latents: pd.DataFrame,
    bounds: tuple[float, float, float, float],
    streets: np.ndarray,
    path: Path,
    seed: int,
    *,
    like: Path | None = None,
    changed: np.ndarray | None = None,
    pool: Executor | None = None,
) -> Path:
    """Render the mosaic over ``bounds`` (RD metres) and write a tiled, compressed GeoTIFF.

    The mosaic is drawn tile by tile (the file's 256 px blocks), each tile's textures seeded by
    its position: a tile drawn from the same latents is the same in every year's mosaic, so
    another year's mosaic is ``like`` a drawn one with only the tiles near its ``changed``
    cells drawn again.

    Args:
        latents: ``density``, ``era`` and ``greenery`` of the year, indexed by cell id.
        bounds: (minx, miny, maxx, maxy) of the mosaic; snapped outward to whole pixels.
        streets: street polygons (centre lines buffered to their width, see
            :func:`street_areas`), drawn as asphalt.
        path: output file; written under a temporary name and renamed when complete.
        seed: seeds the textures, per tile, so the output does not depend on tile order.
        like: a mosaic of the same ``bounds`` drawn by this function from other latents.
        changed: with ``like``, the cells whose latents differ from the ones ``like`` was drawn
            from; only the tiles within a cell of them are drawn again.
        pool: processes made by :func:`drawing_pool` for these ``streets``, drawing runs of
            tiles in parallel (the file is written here, in order); None draws here.
    """
    minx, miny = np.floor(np.array(bounds[:2]) / PIXEL_SIZE) * PIXEL_SIZE
    maxx, maxy = np.ceil(np.array(bounds[2:]) / PIXEL_SIZE) * PIXEL_SIZE
    width, height = int((maxx - minx) / PIXEL_SIZE), int((maxy - miny) / PIXEL_SIZE)
    lattices = {name: _lattice(latents, name) for name in ("density", "era", "greenery")}
    phase = np.random.default_rng([seed, 3]).random() * 6  # of the flight strips
    tiles = [(top, left) for top in range(0, height, _TILE) for left in range(0, width, _TILE)]
    if like is not None:
        tiles = _tiles_near(tiles, changed, minx, maxy)
    runs = [
        _Run(
            top,
            lefts,
            min(_TILE, height - top),
            [min(_TILE, width - left) for left in lefts],
            from_origin(
                minx + lefts[0] * PIXEL_SIZE, maxy - top * PIXEL_SIZE, PIXEL_SIZE, PIXEL_SIZE
            ),
        )
        for top, lefts in _runs(tiles)
    ]
    draw = partial(_draw_run, lattices=lattices, seed=seed, phase=phase)
    images = pool.map(draw, runs) if pool is not None else map(draw, runs, repeat(_shapes(streets)))
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    if like is not None:
        shutil.copyfile(like, tmp)
        dst = rasterio.open(tmp, "r+")
    else:
        dst = rasterio.open(
            tmp, "w", **_profile(width, height, from_origin(minx, maxy, PIXEL_SIZE, PIXEL_SIZE))
        )
    with dst:
        if (dst.width, dst.height) != (width, height):
            raise ValueError(
                f"{like}: {dst.width} x {dst.height} px, not the {width} x {height} of these bounds"
            )
        for run, image in zip(runs, images, strict=True):
            window = Window(run.lefts[0], run.top, sum(run.widths), run.rows)
            dst.write(image.transpose(2, 0, 1), window=window)
    tmp.replace(path)
    return path


class _Run(NamedTuple):
    """Neighbouring tiles of one tile row, drawn together."""

    top: int
    lefts: list[int]
    rows: int
    widths: list[int]
    transform: Affine


#: The shapes a drawing process rasterises, set once per process by :func:`drawing_pool`.
_POOL_SHAPES: dict[str, shapely.STRtree] = {}


def _shapes(streets: np.ndarray) -> dict[str, shapely.STRtree]:
    return {
        "water": shapely.STRtree([water_geometry()]),
        "park": shapely.STRtree([park_geometry()]),
        "street": shapely.STRtree(streets),
    }


def _set_pool_shapes(streets: np.ndarray) -> None:
    _POOL_SHAPES.update(_shapes(streets))


def drawing_pool(streets: np.ndarray, workers: int) -> ProcessPoolExecutor:
    """Processes that draw mosaics over ``streets`` (:func:`write_aerial`'s ``pool``)."""
    return ProcessPoolExecutor(workers, initializer=_set_pool_shapes, initargs=(streets,))


def _draw_run(
    run: _Run,
    shapes: dict[str, shapely.STRtree] | None = None,
    *,
    lattices: dict,
    seed: int,
    phase: float,
) -> np.ndarray:
    """The pixels of a run of tiles (rows, width, 3); in a pool, over the pool's shapes."""
    rngs = [np.random.default_rng([seed, 3, run.top, left]) for left in run.lefts]
    textures = _textures(rngs, run.rows, run.widths)
    return _render_window(lattices, shapes or _POOL_SHAPES, run.transform, textures, phase)


def _profile(width: int, height: int, transform: Affine) -> dict:
    return dict(
        driver="GTiff",
        width=width,
        height=height,
        count=3,
        dtype="uint8",
        crs=RD_NEW,
        transform=transform,
        tiled=True,
        blockxsize=_TILE,
        blockysize=_TILE,
        compress="deflate",
        zlevel=1,
        predictor=2,
        photometric="RGB",
    )


def _tiles_near(
    tiles: list[tuple[int, int]], cells: np.ndarray | None, minx: float, maxy: float
) -> list[tuple[int, int]]:
    """The tiles within one cell of ``cells`` (their bilinear lookups reach that far)."""
    if cells is None or len(cells) == 0:
        return []
    ix, iy = cell_index(np.asarray(cells, np.int64))
    reach = 2 * CELL_SIZE  # the cell itself, and its neighbours' influence
    left = ((ix * CELL_SIZE - reach - minx) / PIXEL_SIZE) // _TILE
    right = (((ix + 1) * CELL_SIZE + reach - minx) / PIXEL_SIZE) // _TILE
    top = ((maxy - (iy + 1) * CELL_SIZE - reach) / PIXEL_SIZE) // _TILE
    bottom = ((maxy - iy * CELL_SIZE + reach) / PIXEL_SIZE) // _TILE
    wanted = set()
    for a, b, c, d in zip(left, right, top, bottom, strict=True):
        wanted.update(
            (int(r) * _TILE, int(k) * _TILE)
            for r in range(int(c), int(d) + 1)
            for k in range(int(a), int(b) + 1)
        )
    return [tile for tile in tiles if tile in wanted]


def _runs(tiles: list[tuple[int, int]]) -> list[tuple[int, list[int]]]:
    """The tiles as runs of neighbours in a tile row: ``(top, [left, ...])``, drawn together
    (the water and parks are rasterised once a run, not once a tile)."""
    runs: list[tuple[int, list[int]]] = []
    for top, left in sorted(tiles):
        if runs and runs[-1][0] == top and runs[-1][1][-1] + _TILE == left:
            runs[-1][1].append(left)
        else:
            runs.append((top, [left]))
    return runs


def _textures(
    rngs: list[np.random.Generator], rows: int, widths: list[int]
) -> dict[str, np.ndarray]:
    """The random textures of tiles side by side, each drawn from its own generator in one
    fixed order, so a tile's pixels do not depend on which tiles are drawn with it."""
    drawn = []
    for rng, cols in zip(rngs, widths, strict=True):
        shape = (rows, cols)
        drawn.append(
            {
                "small": _blocky_noise(rng, shape, 3),
                "large": _blocky_noise(rng, shape, 7),
                "trees": rng.random(shape),
                "lawn": _blocky_noise(rng, shape, 2),
                "park": rng.random(shape),
                "water": rng.standard_normal(shape),
                "grain": rng.normal(0, 5, (*shape, 3)),
            }
        )
    return {name: np.concatenate([d[name] for d in drawn], axis=1) for name in drawn[0]}


def _render_window(
    latents: dict, shapes: dict, transform: Affine, textures: dict[str, np.ndarray], phase: float
) -> np.ndarray:
    shape = textures["trees"].shape
    rows, cols = shape
    # Pixel centres in lattice units (cells, from the lattice origin), for bilinear lookups.
    xs = transform.c + (np.arange(cols) + 0.5) * PIXEL_SIZE
    ys = transform.f - (np.arange(rows) + 0.5) * PIXEL_SIZE
    _, ix0, iy0 = latents["density"]
    gx = np.broadcast_to(xs / CELL_SIZE - ix0 - 0.5, shape)
    gy = np.broadcast_to((ys / CELL_SIZE - iy0 - 0.5)[:, None], shape)
    look = {
        name: ndimage.map_coordinates(grid, [gy, gx], order=1, mode="nearest")
        for name, (grid, _, _) in latents.items()
    }
    strip_box = shapely.box(
        transform.c, transform.f - rows * PIXEL_SIZE, transform.c + cols * PIXEL_SIZE, transform.f
    )
    masks = {}
    for name, tree in shapes.items():
        hits = tree.geometries[tree.query(strip_box)]
        masks[name] = (
            np.zeros(shape, bool)
            if len(hits) == 0
            else features.rasterize(
                hits, out_shape=shape, transform=transform, dtype="uint8"
            ).astype(bool)
        )

    # post-war slabs are bigger than canal houses
    parcels = np.where(look["era"] > 0.5, textures["large"], textures["small"])
    building = (
        (parcels < 0.95 * look["density"]) & ~masks["street"] & ~masks["water"] & ~masks["park"]
    )
    trees = textures["trees"] < 0.45 * look["greenery"]
    lawn = textures["lawn"] < look["greenery"]

    # painted in place, layer by layer: each layer computes only the pixels it covers
    image = np.where(lawn[..., None], _GRASS, _PAVING)
    np.copyto(image, _TREE, where=(trees & ~building)[..., None])
    image[building] = roof_colour(look["era"][building]) * (
        1 + 0.12 * (parcels[building][:, None] - 0.5)
    )
    np.copyto(image, _ASPHALT, where=masks["street"][..., None])
    park = masks["park"] & ~masks["street"]
    image[park] = np.where((textures["park"][park] < 0.5)[:, None], _TREE, _GRASS)
    water = masks["water"]
    image[water] = _WATER * (1 + 0.05 * textures["water"][water])[:, None]

    image *= (1 + 0.06 * np.sin(xs / 2000.0 + phase))[None, :, None]  # flight strips
    image += textures["grain"]
    return np.clip(image, 0, 255).astype(np.uint8)


def street_areas(edges: np.ndarray, width: float = 10.0) -> np.ndarray:
    """Street centre lines (array of LineStrings) buffered to a carriageway of ``width`` m."""
    return shapely.buffer(edges, width / 2, cap_style="flat")


def write_aerial_years(
    yearly: dict[int, pd.DataFrame],
    reference_year: int,
    bounds: tuple[float, float, float, float],
    streets: np.ndarray,
    folder: Path,
    seed: int,
    progress: Progress | None = None,
    workers: int = 1,
) -> dict[int, Path]:
    """One mosaic per year: ``aerial.tif`` of ``reference_year``, ``<year>.tif`` of the others.

    The reference mosaic is drawn whole; each other year's is a copy with the tiles near the
    cells whose aerial latents differ redrawn (:func:`write_aerial`), so a year costs what
    changed in it.

    Args:
        yearly: each year's latents (``density``, ``era``, ``greenery``), indexed by cell id.
        reference_year: the year drawn whole, as ``aerial.tif``.
        bounds: (minx, miny, maxx, maxy) of the mosaics, RD metres.
        streets: street polygons (:func:`street_areas`).
        folder: the data root's ``aerial/``.
        seed: seeds the textures (:func:`write_aerial`).
        progress: called with ``done`` and ``total`` mosaics as each is started and at the end.
        workers: processes drawing tiles (:func:`drawing_pool`); 1 draws in this process.
    """
    with drawing_pool(streets, workers) if workers > 1 else nullcontext() as pool:
        reference = yearly[reference_year]
        paths = {reference_year: folder / "aerial.tif"}
        write_aerial(reference, bounds, streets, paths[reference_year], seed, pool=pool)
        columns = ["density", "era", "greenery"]
        for year in sorted(set(yearly) - {reference_year}):
            if progress is not None:
                progress({"done": len(paths), "total": len(yearly)})
            latents = yearly[year]
            differs = (latents[columns] - reference[columns]).abs().max(axis=1) > 1e-9
            paths[year] = write_aerial(
                latents,
                bounds,
                streets,
                folder / f"{year}.tif",
                seed,
                like=paths[reference_year],
                changed=latents.index.to_numpy()[differs.to_numpy()],
                pool=pool,
            )
        if progress is not None:
            progress({"done": len(yearly), "total": len(yearly)})
    return dict(sorted(paths.items()))
