"""Render the demo city's aerial mosaic from its latent fields and write it as a GeoTIFF.

What the air shows: water and parks (crisp shapes), streets (the street graph), building cover
(density), roof colour and parcel size (building era), and trees and lawns (greenery). Facade
upkeep, litter and shop fronts leave no trace here: they are the street-only part of the score.
Flight strips differ a little in brightness, as real mosaics do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import shapely
from rasterio import features
from rasterio.transform import Affine, from_origin
from rasterio.windows import Window
from scipy import ndimage

from core.demo.city import CityFields, park_geometry, water_geometry
from core.grid import CELL_SIZE, RD_NEW, cell_index
from core.progress import Progress

PIXEL_SIZE = 4.0  # metres; real PDOK imagery is 0.25 m and is cut by metres the same way
_STRIP_ROWS = 512

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


def _lattice(fields: CityFields, column: str) -> tuple[np.ndarray, int, int]:
    """A latent as a 2-D array (row 0 = southernmost cell row) plus the lattice origin."""
    ix, iy = cell_index(fields.cells.index.to_numpy())
    grid = np.zeros((iy.max() - iy.min() + 1, ix.max() - ix.min() + 1))
    grid[iy - iy.min(), ix - ix.min()] = fields.cells[column].to_numpy(dtype=float)
    return grid, int(ix.min()), int(iy.min())


def _blocky_noise(rng: np.random.Generator, shape: tuple[int, int], block: int) -> np.ndarray:
    coarse = rng.random((shape[0] // block + 2, shape[1] // block + 2))
    return np.repeat(np.repeat(coarse, block, 0), block, 1)[: shape[0], : shape[1]]


def write_aerial(
    fields: CityFields,
    bounds: tuple[float, float, float, float],
    streets: np.ndarray,
    path: Path,
    seed: int,
    progress: Progress | None = None,
) -> Path:
    """Render the mosaic over ``bounds`` (RD metres) and write a tiled, compressed GeoTIFF.

    Args:
        fields: the city's latents.
        bounds: (minx, miny, maxx, maxy) of the mosaic; snapped outward to whole pixels.
        streets: street polygons (centre lines buffered to their width, see
            :func:`street_areas`), drawn as asphalt.
        path: output file; written under a temporary name and renamed when complete.
        seed: seeds the textures, per strip, so the output does not depend on strip order.
        progress: called with ``done`` and ``total`` rows after each strip.
    """
    minx, miny = np.floor(np.array(bounds[:2]) / PIXEL_SIZE) * PIXEL_SIZE
    maxx, maxy = np.ceil(np.array(bounds[2:]) / PIXEL_SIZE) * PIXEL_SIZE
    width, height = int((maxx - minx) / PIXEL_SIZE), int((maxy - miny) / PIXEL_SIZE)
    transform = from_origin(minx, maxy, PIXEL_SIZE, PIXEL_SIZE)
    latents = {name: _lattice(fields, name) for name in ("density", "era", "greenery")}
    shapes = {
        "water": shapely.STRtree([water_geometry()]),
        "park": shapely.STRtree([park_geometry()]),
        "street": shapely.STRtree(streets),
    }
    profile = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=3,
        dtype="uint8",
        crs=RD_NEW,
        transform=transform,
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
        zlevel=1,
        predictor=2,
        photometric="RGB",
    )
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(tmp, "w", **profile) as dst:
        for top in range(0, height, _STRIP_ROWS):
            rows = min(_STRIP_ROWS, height - top)
            strip_transform = from_origin(minx, maxy - top * PIXEL_SIZE, PIXEL_SIZE, PIXEL_SIZE)
            rng = np.random.default_rng([seed, 3, top])
            image = _render_strip(latents, shapes, strip_transform, (rows, width), rng)
            dst.write(image.transpose(2, 0, 1), window=Window(0, top, width, rows))
            if progress is not None:
                progress({"done": top + rows, "total": height})
    tmp.replace(path)
    return path


def _render_strip(
    latents: dict, shapes: dict, transform: Affine, shape: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
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

    small, large = _blocky_noise(rng, shape, 3), _blocky_noise(rng, shape, 7)
    parcels = np.where(
        look["era"] > 0.5, large, small
    )  # post-war slabs are bigger than canal houses
    building = (
        (parcels < 0.95 * look["density"]) & ~masks["street"] & ~masks["water"] & ~masks["park"]
    )
    trees = rng.random(shape) < 0.45 * look["greenery"]
    lawn = _blocky_noise(rng, shape, 2) < look["greenery"]

    image = np.where(lawn[..., None], _GRASS, _PAVING)
    image = np.where((trees & ~building)[..., None], _TREE, image)
    jitter = 1 + 0.12 * (parcels[..., None] - 0.5)
    image = np.where(building[..., None], roof_colour(look["era"]) * jitter, image)
    image = np.where(masks["street"][..., None], _ASPHALT, image)
    park_texture = np.where((rng.random(shape) < 0.5)[..., None], _TREE, _GRASS)
    image = np.where((masks["park"] & ~masks["street"])[..., None], park_texture, image)
    image = np.where(
        masks["water"][..., None],
        _WATER * (1 + 0.05 * rng.standard_normal(shape))[..., None],
        image,
    )

    strip_gain = 1 + 0.06 * np.sin(xs / 2000.0 + rng.random() * 6)  # flight strips
    image = image * strip_gain[None, :, None] + rng.normal(0, 5, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def street_areas(edges: np.ndarray, width: float = 10.0) -> np.ndarray:
    """Street centre lines (array of LineStrings) buffered to a carriageway of ``width`` m."""
    return shapely.buffer(edges, width / 2, cap_style="flat")
