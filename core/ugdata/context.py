"""The city context of captions, paths and graphs: grid places, landmarks, water and park
shares, street and photo density around any point, read from a data root."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import Transformer
from rasterio import features
from rasterio.transform import from_origin
from scipy.signal import fftconvolve
from scipy.spatial import cKDTree

from core.dataroot import DataRoot
from core.grid import CELL_SIZE, RD_NEW, cell_center, cell_id, read_grid
from core.sources.boundaries import read_landmarks
from core.sources.catalog import read_catalog
from core.ugdata.geometry import bearing_deg, compass
from core.ugdata.graph import SpatialGraph, read_streets
from core.ugdata.records import _node_kind, node_text

CONTEXT_RADIUS_M = 150.0
#: Landmarks farther than this are not mentioned (they say nothing useful about the place).
MAX_LANDMARK_M = 5000.0
_RASTER_M = 10.0
#: A spot is "much photographed" with at least this many Flickr photos around it (and in the
#: city's top tenth of image positions).
_POPULAR_MIN = 10
_WGS84 = "EPSG:4326"


class ShareRaster:
    """Share of an area covered by polygons within a radius of any point (disk average).

    Rasterised at :data:`_RASTER_M` and convolved once, so a lookup is an array index.
    """

    def __init__(
        self,
        geometry: Sequence[Any],
        bounds: tuple[float, float, float, float],
        radius: float,
        pixel: float = _RASTER_M,
    ) -> None:
        pad = radius + 2 * pixel
        self.left, self.top = bounds[0] - pad, bounds[3] + pad
        self.pixel = pixel
        width = int(math.ceil((bounds[2] - bounds[0] + 2 * pad) / pixel))
        height = int(math.ceil((bounds[3] - bounds[1] + 2 * pad) / pixel))
        box = shapely.box(self.left, self.top - height * pixel, self.left + width * pixel, self.top)
        shapes = [
            g
            for g in shapely.intersection(np.asarray(geometry, dtype=object), box)
            if g is not None and not g.is_empty
        ]
        mask = np.zeros((height, width), np.float32)
        if shapes:
            mask = features.rasterize(
                shapes,
                out_shape=(height, width),
                dtype="uint8",
                transform=from_origin(self.left, self.top, pixel, pixel),
            )
        r = int(round(radius / pixel))
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        disk = (xx**2 + yy**2 <= r**2).astype(np.float32)
        self.share = (
            np.clip(fftconvolve(mask.astype(np.float32), disk / disk.sum(), mode="same"), 0.0, 1.0)
            if shapes
            else mask
        )

    def at(self, xy: np.ndarray) -> np.ndarray:
        """The share (0..1) around each point of ``xy`` (n, 2); 0 outside the raster."""
        xy = np.asarray(xy, dtype=float).reshape(-1, 2)
        col = np.floor((xy[:, 0] - self.left) / self.pixel).astype(np.int64)
        row = np.floor((self.top - xy[:, 1]) / self.pixel).astype(np.int64)
        inside = (row >= 0) & (row < self.share.shape[0]) & (col >= 0) & (col < self.share.shape[1])
        out = np.zeros(len(xy))
        out[inside] = self.share[row[inside], col[inside]]
        return out


@dataclass(frozen=True)
class LandmarkFact:
    """A landmark seen from a place: distance and compass direction from the place to it."""

    name: str
    kind: str
    distance_m: float
    bearing_deg: float

    @property
    def direction(self) -> str:
        """The 8-point compass word of :attr:`bearing_deg`."""
        return compass(self.bearing_deg)

    @property
    def label(self) -> str:
        """The name as a sentence uses it (``Amstel station`` for the station ``Amstel``)."""
        if self.kind == "station" and not self.name.lower().endswith(("centraal", "station")):
            return f"{self.name} station"
        return self.name


@dataclass(frozen=True)
class PlaceFacts:
    """What a caption may say about one place (and the image taken there).

    ``water_share`` / ``park_share`` are ``None`` where the data root has no such layer;
    ``heading`` is ``None`` where unknown; ``buurt`` / ``district`` are empty outside the grid.
    """

    key: str
    x: float
    y: float
    buurt: str
    district: str
    landmarks: tuple[LandmarkFact, ...]
    degree: int
    density: str
    photos: int = 0
    popular: bool = False
    water_share: float | None = None
    park_share: float | None = None
    heading: float | None = None
    source: str | None = None
    year: int | None = None
    title: str | None = None


@dataclass
class CityContext:
    """Everything captions, paths and graphs are built from, for one data root.

    Attributes:
        graph: the street graph with cells and images anchored.
        cells: grid cells indexed by ``cell_id`` with ``buurt``, ``district``, ``x``, ``y``.
        landmarks: ``name``, ``kind``, ``x``, ``y`` (RD New).
        images: the catalog's images (``id, source, path, x, y, heading, captured_at, title``)
            with ``node`` (index of the anchor node); row order matches ``graph.image_ids``.
        water, parks: share rasters, ``None`` where the data root lacks the layer.
        density_edges: street-node counts within the radius: fewer is ``open``, more is
            ``dense`` (quartiles over the street nodes, so relative to this city).
        popular_min: Flickr photos within the radius that make a spot "much photographed".
        radius: the context radius in metres.
    """

    graph: SpatialGraph
    cells: pd.DataFrame
    landmarks: pd.DataFrame
    images: pd.DataFrame
    water: ShareRaster | None = None
    parks: ShareRaster | None = None
    density_edges: tuple[float, float] = (0.0, 0.0)
    popular_min: float = math.inf
    radius: float = CONTEXT_RADIUS_M
    root: Path | None = None

    def __post_init__(self) -> None:
        flickr = self.images["source"].to_numpy() == "flickr" if len(self.images) else []
        self._photo_tree = (
            cKDTree(self.images.loc[flickr, ["x", "y"]].to_numpy(float)) if np.any(flickr) else None
        )
        centres = self.cells[["x", "y"]].to_numpy(float)
        self._cell_tree = cKDTree(centres) if len(centres) else None
        buurt, district = self.place_of(self.graph.xy)
        self.node_buurt, self.node_district = buurt.astype(object), district.astype(object)
        self._lonlat: np.ndarray | None = None
        self._node_mark: list[tuple[LandmarkFact, ...]] | None = None
        self._node_json: list[dict[str, Any]] | None = None
        self._edge_json: list[dict[str, Any]] | None = None

    @property
    def node_landmark(self) -> list[tuple[LandmarkFact, ...]]:
        """The nearest landmark of each street node (empty beyond :data:`MAX_LANDMARK_M`)."""
        if self._node_mark is None:
            self._node_mark = nearest_landmarks(self.graph.xy, self.landmarks, 1)
        return self._node_mark

    def node_json(self, node: int) -> dict[str, Any]:
        """A node's graph-record entry without ``hop`` (computed once for all nodes)."""
        if self._node_json is None:
            g, lonlat, degree = self.graph, self.node_lonlat, self.graph.degree
            self._node_json = [
                {
                    "node_id": str(g.node_ids[i]),
                    "coords": [round(float(lonlat[i, 0]), 7), round(float(lonlat[i, 1]), 7)],
                    "xy": [round(float(g.xy[i, 0]), 2), round(float(g.xy[i, 1]), 2)],
                    "node_text": node_text(
                        _node_kind(int(degree[i])),
                        g.street_names[i],
                        str(self.node_buurt[i]),
                        str(self.node_district[i]),
                        float(lonlat[i, 0]),
                        float(lonlat[i, 1]),
                    ),
                    "degree": int(degree[i]),
                    "buurt": str(self.node_buurt[i]),
                    "district": str(self.node_district[i]),
                }
                for i in range(len(g.node_ids))
            ]
        return self._node_json[node]

    def edge_json(self, edge: int) -> dict[str, Any]:
        """An edge's graph-record entry (computed once for all edges)."""
        if self._edge_json is None:
            g = self.graph
            self._edge_json = [
                {
                    "source": str(g.node_ids[a]),
                    "target": str(g.node_ids[b]),
                    "length_m": round(float(length), 2),
                    "bearing_deg": round(float(bearing), 2),
                    "dx_m": round(float(dx), 2),
                    "dy_m": round(float(dy), 2),
                }
                for (a, b), length, bearing, dx, dy in zip(
                    g.edges.tolist(), g.length, g.bearing, g.dx, g.dy, strict=True
                )
            ]
        return self._edge_json[edge]

    @property
    def node_lonlat(self) -> np.ndarray:
        """(n, 2) WGS84 lon/lat of the street nodes."""
        if self._lonlat is None:
            to_wgs = Transformer.from_crs(RD_NEW, _WGS84, always_xy=True)
            lon, lat = to_wgs.transform(self.graph.xy[:, 0], self.graph.xy[:, 1])
            self._lonlat = np.column_stack([lon, lat])
        return self._lonlat

    def place_of(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Buurt and district names of the cells containing the points.

        A point in no grid cell (a street node on the edge of the extent) takes the nearest
        cell within 100 m; farther out the names are empty.
        """
        xy = np.asarray(xy, float).reshape(-1, 2)
        if not len(xy) or self._cell_tree is None:
            return np.full(len(xy), "", dtype=object), np.full(len(xy), "", dtype=object)
        pos = self.cells.index.get_indexer(cell_id(xy[:, 0], xy[:, 1]))
        outside = np.flatnonzero(pos < 0)
        if len(outside):
            dist, near = self._cell_tree.query(xy[outside], distance_upper_bound=CELL_SIZE)
            pos[outside] = np.where(np.isfinite(dist), near, -1)
        buurt = np.where(pos >= 0, self.cells["buurt"].to_numpy()[pos], "")
        district = np.where(pos >= 0, self.cells["district"].to_numpy()[pos], "")
        return buurt.astype(str), district.astype(str)

    def landmark_facts(self, xy: np.ndarray, k: int = 2) -> list[tuple[LandmarkFact, ...]]:
        """The ``k`` nearest landmarks (within :data:`MAX_LANDMARK_M`) of each point."""
        return nearest_landmarks(xy, self.landmarks, k)

    def density(self, xy: np.ndarray) -> np.ndarray:
        """``"open"``, ``"moderate"`` or ``"dense"`` street network around each point."""
        counts = self.graph.count_within(np.asarray(xy, float).reshape(-1, 2), self.radius)
        low, high = self.density_edges
        return np.where(counts < low, "open", np.where(counts > high, "dense", "moderate"))

    def photos_within(self, xy: np.ndarray) -> np.ndarray:
        """Flickr photos within the radius of each point (a proxy for a popular spot)."""
        xy = np.asarray(xy, float).reshape(-1, 2)
        if self._photo_tree is None:
            return np.zeros(len(xy), np.int64)
        return np.asarray(self._photo_tree.query_ball_point(xy, self.radius, return_length=True))

    def facts(
        self,
        keys: Sequence[str],
        xy: np.ndarray,
        nodes: np.ndarray,
        images: pd.DataFrame | None = None,
    ) -> list[PlaceFacts]:
        """Facts of places (vectorised): ``keys`` name them, ``nodes`` are their anchors.

        Args:
            keys: one stable key per place (the image id): it seeds the template choice.
            xy: (n, 2) RD New positions.
            nodes: (n,) anchor node indices.
            images: optional rows aligned with ``keys`` giving ``heading``, ``source``,
                ``captured_at`` and ``title``.
        """
        xy = np.asarray(xy, float).reshape(-1, 2)
        buurt, district = self.place_of(xy)
        marks = self.landmark_facts(xy)
        degree = self.graph.degree[np.asarray(nodes, np.int64)]
        density = self.density(xy)
        photos = self.photos_within(xy)
        water = self.water.at(xy) if self.water is not None else None
        parks = self.parks.at(xy) if self.parks is not None else None
        n = len(xy)
        heading = source = year = title = [None] * n
        if images is not None:
            heading = [None if pd.isna(h) else float(h) for h in images["heading"]]
            source = [str(s) for s in images["source"]]
            stamps = pd.to_datetime(images["captured_at"], utc=True, errors="coerce")
            year = [None if pd.isna(t) else int(t.year) for t in stamps]
            titles = images["title"] if "title" in images.columns else [None] * n
            title = [t.strip() if isinstance(t, str) and t.strip() else None for t in titles]
        return [
            PlaceFacts(
                key=str(keys[i]),
                x=float(xy[i, 0]),
                y=float(xy[i, 1]),
                buurt=str(buurt[i]),
                district=str(district[i]),
                landmarks=marks[i],
                degree=int(degree[i]),
                density=str(density[i]),
                photos=int(photos[i]),
                popular=bool(photos[i] >= self.popular_min),
                water_share=None if water is None else round(float(water[i]), 3),
                park_share=None if parks is None else round(float(parks[i]), 3),
                heading=heading[i],
                source=source[i],
                year=year[i],
                title=title[i],
            )
            for i in range(n)
        ]


def nearest_landmarks(
    xy: np.ndarray, landmarks: pd.DataFrame, k: int = 2, max_distance: float = MAX_LANDMARK_M
) -> list[tuple[LandmarkFact, ...]]:
    """The ``k`` nearest landmarks of each point, nearest first, within ``max_distance``.

    Args:
        xy: (n, 2) points in a metric CRS.
        landmarks: ``name``, ``kind``, ``x``, ``y`` in the same CRS.
        k: landmarks per point at most.
        max_distance: landmarks farther than this (in the CRS's units) are left out.
    """
    xy = np.asarray(xy, float).reshape(-1, 2)
    if not len(landmarks):
        return [()] * len(xy)
    lx, ly = landmarks["x"].to_numpy(float), landmarks["y"].to_numpy(float)
    dx, dy = lx[None, :] - xy[:, :1], ly[None, :] - xy[:, 1:]
    dist = np.hypot(dx, dy)
    k = min(k, len(landmarks))
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    bearing = bearing_deg(dx, dy)
    names = landmarks["name"].astype(str).to_numpy()
    kinds = landmarks["kind"].astype(str).to_numpy()
    out = []
    for i, row in enumerate(order):
        out.append(
            tuple(
                LandmarkFact(
                    names[j], kinds[j], round(float(dist[i, j]), 1), round(float(bearing[i, j]), 1)
                )
                for j in row
                if dist[i, j] <= max_distance
            )
        )
    return out


def load_city(
    data: DataRoot | str | PathLike,
    landmarks: pd.DataFrame | None = None,
    radius: float = CONTEXT_RADIUS_M,
) -> CityContext:
    """Read a data root's grid, street graph, catalog and context layers into a context.

    The catalog is read with ``check_images=True``, the check of every trainer's image set:
    UGE training decodes every image a sample names, so a missing, corrupt or truncated image
    (or one outside the catalog's folder) is left out here, with one warning naming it, and
    no sample names it.

    Args:
        data: the data root (see :class:`core.dataroot.DataRoot`).
        landmarks: ``name, kind`` with point geometry (any CRS) or ``x, y`` in RD New;
            Amsterdam's (``assets/amsterdam_landmarks.csv``) when not given.
        radius: what "around" means in captions, in metres.

    Raises:
        FileNotFoundError: naming the missing grid, street graph or catalog.
    """
    root = data if isinstance(data, DataRoot) else DataRoot(Path(data))
    grid = read_grid(root.grid)
    cells = pd.DataFrame(
        {
            "buurt": _text_column(grid, "buurt_naam"),
            "district": _text_column(grid, "district"),
        },
        index=pd.Index(grid["cell_id"].to_numpy(np.int64), name="cell_id"),
    )
    cells["x"], cells["y"] = cell_center(cells.index.to_numpy())
    graph = read_streets(root.streets)
    images = read_catalog(root.catalog, check_images=True).images
    images = pd.DataFrame(images.drop(columns="geometry")).reset_index(drop=True)
    graph.anchor(
        cell_ids=cells.index.to_numpy(),
        image_ids=images["id"].to_numpy(),
        image_xy=images[["x", "y"]].to_numpy(float),
    )
    images["node"] = graph.image_node
    marks = _landmark_table(read_landmarks() if landmarks is None else landmarks)
    points = [graph.xy, images[["x", "y"]].to_numpy(float), cells[["x", "y"]].to_numpy(float)]
    allxy = np.concatenate([p for p in points if len(p)])
    bounds = (*allxy.min(axis=0), *allxy.max(axis=0))
    # City-relative thresholds: "dense" means denser than most of this city's streets.
    counts = graph.count_within(graph.xy, radius)
    edges = tuple(float(q) for q in np.quantile(counts, [0.25, 0.75])) if len(counts) else (0, 0)
    context = CityContext(
        graph=graph,
        cells=cells,
        landmarks=marks,
        images=images,
        water=_share_layer(root.water, bounds, radius),
        parks=_share_layer(root.parks, bounds, radius),
        density_edges=edges,
        radius=radius,
        root=root.root,
    )
    if len(images):
        photos = context.photos_within(images[["x", "y"]].to_numpy(float))
        context.popular_min = max(_POPULAR_MIN, float(np.quantile(photos, 0.9)))
    return context


def _text_column(table: pd.DataFrame, column: str) -> np.ndarray:
    if column not in table.columns:
        return np.full(len(table), "", dtype=object)
    return table[column].fillna("").astype(str).to_numpy(dtype=object)


def _landmark_table(landmarks: pd.DataFrame) -> pd.DataFrame:
    if isinstance(landmarks, gpd.GeoDataFrame) and landmarks.geometry is not None:
        points = landmarks.geometry
        if landmarks.crs is not None:
            points = points.to_crs(RD_NEW)
        x, y = points.x.to_numpy(), points.y.to_numpy()
    else:
        x, y = landmarks["x"].to_numpy(float), landmarks["y"].to_numpy(float)
    kinds = landmarks.get("kind", pd.Series("place", index=landmarks.index))
    return pd.DataFrame(
        {
            "name": landmarks["name"].astype(str).to_numpy(),
            "kind": kinds.fillna("place").astype(str).to_numpy(),
            "x": x,
            "y": y,
        }
    )


def _share_layer(
    path: Path, bounds: tuple[float, float, float, float], radius: float
) -> ShareRaster | None:
    if not path.is_file():
        return None  # real roots may lack the layer: captions then say nothing about it
    layer = gpd.read_file(path)
    if layer.crs is not None and layer.crs.to_epsg() != 28992:
        layer = layer.to_crs(RD_NEW)
    return ShareRaster(layer.geometry.to_numpy(), bounds, radius)
