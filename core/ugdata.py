"""UGData: street-level images anchored to a spatial graph, with spatial captions and paths.

Builds the dataset of UrbanGraphEmbeddings (arXiv 2602.08342, method 3 of DESIGN.md) for any
data root in Stadsbeeld's formats, without torch and without any external API:

- a **spatial graph** (:class:`SpatialGraph`): the street network of ``graph/streets.gpkg``
  (undirected, one edge per node pair) with edge features length, bearing (degrees, 0 = north,
  clockwise), dx and dy (metres, RD New); every grid cell and every image is anchored to its
  nearest street node (KD-tree);
- **spatial context captions** (:class:`TemplateCaptioner`, or any :class:`Captioner`): buurt
  and district, distance and 8-point direction to the nearest landmarks, street connectivity,
  water / park share, street density and Flickr photo density within
  :data:`CONTEXT_RADIUS_M`, camera heading and capture year, as varied sentences picked by a
  seeded RNG per sample;
- **spatial reasoning paths** (:func:`reasoning_path`): 1 to 3 hop walks on the street graph,
  each step with its distance and direction, as a question with its answer;
- **exports** in the layout of the paper's public code, a reader that checks it, and a split
  that holds out whole districts (the benchmark's held-out cities).

Layout (source: the README of the paper's repository, github.com/Jaygagaga/UGE, sections
"Stage 1/Stage 2: Dataset Format", and its ms-swift fork ``swift/llm/dataset/preprocessor/
core.py``, whose standard keys are ``messages``, ``images``, ``graphs``, their ``positive_``
and ``negative_`` variants and ``label``). An output folder holds:

- ``train.jsonl`` (and ``heldout.jsonl`` when a district is held out): one sample a line,

  - ``messages``: the query, ``[{"role": "user", "content": "<image> instruction"}]``;
    stage-2 queries start with ``<graph><image>``, reasoning queries carry the question;
  - ``positive_messages``: a list of message lists, ``[[{"role": "user", "content": text}]]``,
    the caption or the answer;
  - ``images``: image paths, one per ``<image>`` tag, relative to the output folder (the
    paper's loader resolves relative paths from the working directory or ``ROOT_IMAGE_DIR``:
    run it from the output folder);
  - ``graphs``: graph JSON paths relative to the output folder, one per ``<graph>`` tag,
    empty for stage-1 samples;
  - ``pair_type``: ``stage1_image_only`` (image -> caption), ``stage1_spatial_reasoning``
    (image + path question -> answer) or ``stage2_image_graph`` (graph + image -> caption);
  - ``label``: always 1 (a positive pair; negatives are the other samples of a batch);
  - ``meta``: our own provenance, ignored by the paper's loader (it keeps standard keys only):
    ``sample_id``, ``task`` (caption / reasoning), ``image_id``, ``source``, ``cell_id``,
    ``node_id`` (anchor street node), ``x``, ``y`` (RD New), ``buurt``, ``district``,
    ``districts`` (every district the sample touches: image, graph nodes, path nodes; the
    held-out split reads it), ``landmark`` (nearest: name, distance_m, bearing_deg,
    direction) and, for reasoning samples, ``question_kind``, ``path`` (node ids), ``steps``
    (length_m, bearing_deg, dx_m, dy_m, direction) and ``answer`` (the end node's node_id,
    buurt, district, and the fact asked for).

- ``graphs/<node_id>.json``: the ``hops``-hop street subgraph around an anchor node (shared by
  every image anchored there): ``center_node`` (a node id), ``nodes`` (``node_id``; ``coords``
  = [lon, lat] WGS84, as the paper's spatial encoder reads them; ``xy`` = [x, y] RD New
  metres; ``node_text`` in the paper's ``Category: ..., Neighborhood: ..., District: ...,
  Coordinates: (lon, lat)`` style; ``degree``; ``hop`` from the centre) and ``edges``
  (``source``, ``target``, ``length_m``, ``bearing_deg``, ``dx_m``, ``dy_m`` from source to
  target), plus ``crs`` of ``xy``.
- ``ugdata.json``: the manifest (layout version, data root, seed, options, counts, timings).

Differences from the paper's data, on purpose: graphs are JSON files as the README documents
(the fork's loader reads NetworkX pickles, ``to_networkx`` converts); the image is not inserted
as a graph node, so one graph file serves all images at a node; captions come from templates,
not from a hosted VLM (plug a local one in through :class:`Captioner`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Protocol

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

LAYOUT_VERSION = 1
MANIFEST = "ugdata.json"
TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.jsonl"
GRAPH_DIR = "graphs"

PAIR_CAPTION = "stage1_image_only"
PAIR_REASONING = "stage1_spatial_reasoning"
PAIR_GRAPH = "stage2_image_graph"
PAIR_TYPES = (PAIR_CAPTION, PAIR_REASONING, PAIR_GRAPH)

#: The query instruction of each pair type (the model's instruction prefix per task).
INSTRUCTIONS = {
    PAIR_CAPTION: "<image> Describe where this street-level image was taken: its neighbourhood, "
    "nearby landmarks, street layout and surroundings.",
    PAIR_GRAPH: "<graph><image> Describe where this street-level image was taken, using the "
    "street network around it.",
    PAIR_REASONING: "<image> Answer the spatial question about a walk from where this image was "
    "taken. ",
}

COMPASS = ("north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west")
CONTEXT_RADIUS_M = 150.0
#: Landmarks farther than this are not mentioned (they say nothing useful about the place).
MAX_LANDMARK_M = 5000.0
_RASTER_M = 10.0
#: A spot is "much photographed" with at least this many Flickr photos around it (and in the
#: city's top tenth of image positions).
_POPULAR_MIN = 10
_WGS84 = "EPSG:4326"
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")


class UGDataFormatError(ValueError):
    """A UGData file that does not follow the layout; the message names the file and line."""


# -- geometry -------------------------------------------------------------------------------------


def bearing_deg(dx: np.ndarray | float, dy: np.ndarray | float) -> np.ndarray:
    """Compass bearing of a displacement in degrees: 0 = north (+y), 90 = east (+x), clockwise."""
    return np.mod(np.degrees(np.arctan2(dx, dy)), 360.0)


def compass(bearing: float) -> str:
    """The 8-point compass word (``north``, ``north-east``, ...) of a bearing in degrees."""
    return COMPASS[int(((float(bearing) % 360.0) + 22.5) // 45.0) % 8]


def edge_features(xy_from: np.ndarray, xy_to: np.ndarray) -> dict[str, np.ndarray]:
    """Straight-line length, bearing, dx and dy (metres / degrees) from ``xy_from`` to ``xy_to``.

    Args:
        xy_from: (n, 2) start coordinates in a metric CRS.
        xy_to: (n, 2) end coordinates.
    """
    d = np.asarray(xy_to, dtype=float) - np.asarray(xy_from, dtype=float)
    return {
        "length": np.hypot(d[:, 0], d[:, 1]),
        "bearing": bearing_deg(d[:, 0], d[:, 1]),
        "dx": d[:, 0],
        "dy": d[:, 1],
    }


def format_distance(metres: float) -> str:
    """``"80 m"`` (rounded to 10 m, at least 10 m) below 1 km, ``"1.2 km"`` above."""
    if metres < 995:
        return f"{max(10, int(round(metres / 10.0)) * 10)} m"
    return f"{metres / 1000:.1f} km"


class KeyedRng:
    """A small seeded RNG (splitmix64) keyed by text: one cheap, independent stream per sample.

    ``KeyedRng(f"{seed}|caption|{image_id}")`` gives the same draws for the same seed and key
    whatever else is built, so a sample does not change when images are added or reordered.
    """

    _MASK = (1 << 64) - 1

    def __init__(self, key: str):
        self._state = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")

    def _next(self) -> int:
        self._state = (self._state + 0x9E3779B97F4A7C15) & self._MASK
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return z ^ (z >> 31)

    def random(self) -> float:
        """A float in [0, 1)."""
        return (self._next() >> 11) / float(1 << 53)

    def randrange(self, n: int) -> int:
        """An int in [0, n)."""
        return self._next() % n  # bias below 2**-40 for the small n used here

    def randint(self, a: int, b: int) -> int:
        """An int in [a, b]."""
        return a + self.randrange(b - a + 1)

    def choice(self, options: Sequence[Any]) -> Any:
        """One element of ``options``."""
        return options[self.randrange(len(options))]

    def shuffle(self, items: list[Any]) -> None:
        """Shuffle ``items`` in place (Fisher-Yates)."""
        for i in range(len(items) - 1, 0, -1):
            j = self.randrange(i + 1)
            items[i], items[j] = items[j], items[i]


# -- the spatial graph ----------------------------------------------------------------------------


@dataclass
class SubGraph:
    """A node's neighbourhood in a :class:`SpatialGraph` (indices into the graph's arrays).

    Attributes:
        center: index of the centre node.
        nodes: node indices, breadth-first from the centre (the centre first).
        hops: hop distance of each of ``nodes`` from the centre.
        edges: indices of the graph edges with both ends in ``nodes``.
    """

    center: int
    nodes: np.ndarray
    hops: np.ndarray
    edges: np.ndarray


@dataclass
class SpatialGraph:
    """An undirected street graph in RD New metres, with cells and images anchored to nodes.

    Attributes:
        node_ids: (n,) node ids as strings (the osmid of ``streets.gpkg``).
        xy: (n, 2) node coordinates, EPSG:28992.
        edges: (m, 2) node indices, first < second, one row per connected pair.
        length: (m,) edge length in metres (along the street where the file says so).
        bearing, dx, dy: (m,) straight-line bearing (degrees) and offsets from the first to the
            second node of each edge.
        street_names: per node, the names of its streets (empty when the file has none).
        cell_ids, cell_node: grid cells and the index of the street node nearest their centre.
        image_ids, image_node, image_distance: images, their nearest node and its distance.
    """

    node_ids: np.ndarray
    xy: np.ndarray
    edges: np.ndarray
    length: np.ndarray
    bearing: np.ndarray
    dx: np.ndarray
    dy: np.ndarray
    street_names: list[tuple[str, ...]] = field(default_factory=list)
    cell_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cell_node: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    image_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    image_node: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    image_distance: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        n = len(self.node_ids)
        if len(self.edges):
            ends = np.concatenate([self.edges[:, 0], self.edges[:, 1]])
            others = np.concatenate([self.edges[:, 1], self.edges[:, 0]])
            edge_of = np.concatenate([np.arange(len(self.edges))] * 2)
            order = np.lexsort((others, ends))  # neighbours sorted: deterministic traversal
            self._indptr = np.searchsorted(ends[order], np.arange(n + 1))
            self._adj, self._adj_edge = others[order], edge_of[order]
        else:
            self._indptr = np.zeros(n + 1, np.int64)
            self._adj = self._adj_edge = np.zeros(0, np.int64)
        self._tree = cKDTree(self.xy) if n else None
        if not self.street_names:
            self.street_names = [()] * n
        self._index = {nid: i for i, nid in enumerate(self.node_ids)}

    @classmethod
    def from_frames(cls, nodes: pd.DataFrame, edges: pd.DataFrame) -> SpatialGraph:
        """A graph from node (``osmid, x, y``) and edge (``u, v`` [, ``length``, ``name``]) tables.

        Edges may be directed or repeated (osmnx writes both directions and parallel edges):
        each node pair becomes one undirected edge with the shortest length; self-loops and
        edges to unknown nodes are dropped. Without ``length`` the straight line is used.
        """
        ids = nodes["osmid"].astype(str).to_numpy()
        if len(set(ids)) != len(ids):
            raise ValueError("street nodes: duplicated osmid values")
        xy = nodes[["x", "y"]].to_numpy(dtype=float)
        position = pd.Series(np.arange(len(ids)), index=ids)
        pu = position.reindex(edges["u"].astype(str).to_numpy()).to_numpy()
        pv = position.reindex(edges["v"].astype(str).to_numpy()).to_numpy()
        known = ~(np.isnan(pu) | np.isnan(pv))
        pu, pv = pu[known].astype(np.int64), pv[known].astype(np.int64)
        a, b = np.minimum(pu, pv), np.maximum(pu, pv)
        straight = np.hypot(*(xy[b] - xy[a]).T)
        length = straight
        if "length" in edges.columns:
            given = pd.to_numeric(edges["length"], errors="coerce").to_numpy(dtype=float)[known]
            length = np.where(np.isfinite(given) & (given > 0), given, straight)
        table = pd.DataFrame({"a": a, "b": b, "length": length})
        if "name" in edges.columns:
            table["name"] = edges["name"].to_numpy()[known]
        table = table[table["a"] != table["b"]].sort_values(["a", "b", "length"], kind="stable")
        unique = table.drop_duplicates(["a", "b"])
        pairs = unique[["a", "b"]].to_numpy(dtype=np.int64).reshape(-1, 2)
        feats = edge_features(xy[pairs[:, 0]], xy[pairs[:, 1]])
        names = _street_names(table, len(ids)) if "name" in table.columns else []
        return cls(
            node_ids=ids,
            xy=xy,
            edges=pairs,
            length=unique["length"].to_numpy(float),
            bearing=feats["bearing"],
            dx=feats["dx"],
            dy=feats["dy"],
            street_names=names,
        )

    @property
    def degree(self) -> np.ndarray:
        """Number of distinct neighbours of each node."""
        return np.diff(self._indptr)

    def index_of(self, node_id: str) -> int:
        """The array index of a node id."""
        return self._index[str(node_id)]

    def neighbours(self, node: int) -> np.ndarray:
        """Indices of the nodes sharing an edge with ``node``, in ascending order."""
        return self._adj[self._indptr[node] : self._indptr[node + 1]]

    def step(self, start: int, end: int) -> dict[str, float]:
        """Length, bearing, dx and dy of walking the edge from ``start`` to ``end``.

        Raises:
            KeyError: if the two nodes share no edge.
        """
        lo, hi = self._indptr[start], self._indptr[start + 1]
        at = lo + int(np.searchsorted(self._adj[lo:hi], end))
        if at >= hi or self._adj[at] != end:
            raise KeyError(
                f"no street edge between {self.node_ids[start]} and {self.node_ids[end]}"
            )
        e = int(self._adj_edge[at])
        sign = 1.0 if self.edges[e, 0] == start else -1.0
        dx, dy = sign * float(self.dx[e]), sign * float(self.dy[e])
        return {
            "length": float(self.length[e]),
            "bearing": float(bearing_deg(dx, dy)),
            "dx": dx,
            "dy": dy,
        }

    def nearest(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index of and distance to the nearest node of each point of ``xy`` (n, 2)."""
        if self._tree is None:
            raise ValueError("the street graph has no nodes")
        dist, idx = self._tree.query(np.asarray(xy, dtype=float).reshape(-1, 2))
        return idx.astype(np.int64), dist

    def count_within(self, xy: np.ndarray, radius: float) -> np.ndarray:
        """Number of street nodes within ``radius`` metres of each point."""
        if self._tree is None:
            return np.zeros(len(xy), np.int64)
        return np.asarray(
            self._tree.query_ball_point(np.asarray(xy, float), radius, return_length=True)
        )

    def anchor(
        self,
        cell_ids: np.ndarray | None = None,
        image_ids: np.ndarray | None = None,
        image_xy: np.ndarray | None = None,
    ) -> None:
        """Anchor cells (by their centre) and images (by position) to their nearest nodes."""
        if cell_ids is not None:
            self.cell_ids = np.asarray(cell_ids, np.int64)
            self.cell_node = self.nearest(np.column_stack(cell_center(self.cell_ids)))[0]
        if image_ids is not None and image_xy is not None:
            self.image_ids = np.asarray(image_ids, object)
            self.image_node, self.image_distance = self.nearest(image_xy)

    def subgraph(self, center: int, hops: int = 2, max_nodes: int = 64) -> SubGraph:
        """The nodes within ``hops`` edges of ``center`` (breadth-first, at most ``max_nodes``)
        and the edges among them."""
        hop_of = {center: 0}
        queue = deque([center])
        while queue and len(hop_of) < max_nodes:
            node = queue.popleft()
            if hop_of[node] >= hops:
                continue
            for nb in self.neighbours(node).tolist():
                if nb not in hop_of:
                    hop_of[nb] = hop_of[node] + 1
                    queue.append(nb)
                    if len(hop_of) >= max_nodes:
                        break
        nodes = np.fromiter(hop_of.keys(), np.int64, len(hop_of))
        edges = {
            int(self._adj_edge[k])
            for n in hop_of
            for k in range(self._indptr[n], self._indptr[n + 1])
            if int(self._adj[k]) in hop_of
        }
        return SubGraph(
            center=center,
            nodes=nodes,
            hops=np.fromiter(hop_of.values(), np.int64, len(hop_of)),
            edges=np.array(sorted(edges), np.int64),
        )


def _street_names(table: pd.DataFrame, n: int) -> list[tuple[str, ...]]:
    names: list[set[str]] = [set() for _ in range(n)]
    for a, b, value in zip(table["a"], table["b"], table["name"], strict=True):
        for name in _name_list(value):
            names[a].add(name)
            names[b].add(name)
    return [tuple(sorted(s)) for s in names]


def _name_list(value: Any) -> list[str]:
    """osmnx writes one name, a list, or the list's text (``"['A', 'B']"``)."""
    if isinstance(value, list | tuple | np.ndarray):
        return [str(v) for v in value if isinstance(v, str) and v]
    if not isinstance(value, str) or not value.strip():
        return []
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        return [p.strip(" '\"") for p in text[1:-1].split(",") if p.strip(" '\"")]
    return [text]


def read_streets(path: str | PathLike) -> SpatialGraph:
    """Read an osmnx-style GeoPackage (layers ``nodes`` and ``edges``) into a graph in RD New.

    Nodes in another CRS (osmnx's default is WGS84) are projected; ``length`` is kept (osmnx
    writes metres along the street), bearings and offsets come from the projected nodes.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: naming the file, for missing layers or columns.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: street graph file not found")
    try:
        nodes = gpd.read_file(path, layer="nodes")
        edges = gpd.read_file(path, layer="edges", ignore_geometry=True)
    except Exception as exc:  # pyogrio raises several types for a missing layer or bad file
        raise ValueError(f"{path}: expected GeoPackage layers 'nodes' and 'edges' ({exc})") from exc
    for table, layer, columns in ((nodes, "nodes", ("osmid",)), (edges, "edges", ("u", "v"))):
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise ValueError(f"{path}: layer {layer!r} lacks columns {missing}")
    if nodes.crs is not None and nodes.crs.to_epsg() != 28992:
        points = nodes.geometry.to_crs(RD_NEW)
        nodes = pd.DataFrame({"osmid": nodes["osmid"], "x": points.x, "y": points.y})
    elif not {"x", "y"} <= set(nodes.columns):
        nodes = pd.DataFrame(
            {"osmid": nodes["osmid"], "x": nodes.geometry.x, "y": nodes.geometry.y}
        )
    return SpatialGraph.from_frames(nodes, edges)


# -- the city context ----------------------------------------------------------------------------


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
    ):
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
    images = read_catalog(root.catalog, check_files=False).images
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


# -- captions ------------------------------------------------------------------------------------


class Captioner(Protocol):
    """Writes a spatial context caption; plug in a local VLM by implementing this method."""

    def caption(self, facts: PlaceFacts, image_path: str | None = None) -> str:
        """The caption of the image at ``image_path`` taken at the place of ``facts``."""
        ...


_OPENINGS = (
    "This street-level image was taken in {b}, a neighbourhood in the {d} district.",
    "The photo shows a spot in {b} ({d}).",
    "Location: the {b} neighbourhood of {d}.",
    "We are in {b}, part of the {d} district.",
    "This view comes from {b}, in {d}.",
)
_OPENINGS_DISTRICT = (
    "This street-level image was taken in the {d} district.",
    "The photo shows a spot in {d}.",
)
_OPENINGS_NONE = ("This street-level image was taken outside the mapped neighbourhoods.",)
_ONE_LANDMARK = (
    "{n} is about {dist} to the {dir}.",
    "The nearest landmark, {n}, lies {dist} {dir} of here.",
    "About {dist} to the {dir} you would reach {n}.",
    "It is roughly {dist} from {n}, which lies to the {dir}.",
)
_TWO_LANDMARKS = (
    "{n} is about {dist} to the {dir}, and {n2} about {dist2} to the {dir2}.",
    "Nearby landmarks: {n} ({dist} {dir}) and {n2} ({dist2} {dir2}).",
    "The closest landmarks are {n}, {dist} to the {dir}, and {n2}, {dist2} to the {dir2}.",
)
_DEAD_END = (
    "The nearest street node is a dead end.",
    "It sits by a dead-end street.",
    "The closest street ends here in a dead end.",
)
_THROUGH = (
    "The nearest street node joins two street segments, without a crossing.",
    "The street runs through here without a junction.",
)
_JUNCTION = (
    "The nearest junction joins {k} streets.",
    "It is close to a {k}-way junction.",
    "{K} streets meet at the closest crossing.",
)
_AROUND = (
    "Within {r} m there is {items}.",
    "The surroundings ({r} m) have {items}.",
    "Around it: {items}.",
)
_POPULAR = (
    "It is a much-photographed spot: {n} Flickr photos were taken within {r} m.",
    "Many visitors take photos here ({n} Flickr photos within {r} m).",
)
_HEADING = ("The camera faces {dir}.", "The view looks {dir}.", "It is taken facing {dir}.")
_SOURCE = {
    "gsv": ("It is a street-view capture from {y}.", "A street-view car captured it in {y}."),
    "flickr": ("It is a Flickr photo from {y}.", "Someone posted this photo on Flickr in {y}."),
    "other": ("It was captured in {y}.",),
}
_DENSITY = {
    "dense": ("a dense street network", "many closely spaced streets"),
    "moderate": ("a moderately dense street grid", "a regular street grid"),
    "open": ("an open, sparse street pattern", "few streets"),
}


def _amount(share: float, what: str, big: str, some: str) -> str:
    if share >= 0.25:
        return f"{big} ({share:.0%} {what})"
    if share >= 0.05:
        return f"{some} ({share:.0%} {what})"
    return f"no {what}" if what == "park" else "no open water"


class TemplateCaptioner:
    """The default captioner: varied sentences from templates, chosen by a seeded RNG.

    The choice depends only on ``seed`` and the facts' ``key``, so a caption does not change
    when other images are added or the sample order changes.
    """

    def __init__(self, seed: int = 0, radius: float = CONTEXT_RADIUS_M):
        self.seed, self.radius = seed, radius

    def caption(self, facts: PlaceFacts, image_path: str | None = None) -> str:
        """A caption of 4..7 sentences: place first, then the other facts in a seeded order."""
        rng = KeyedRng(f"{self.seed}|caption|{facts.key}")
        b, d = facts.buurt, facts.district
        if b and d:
            opening = rng.choice(_OPENINGS).format(b=b, d=d)
        elif d:
            opening = rng.choice(_OPENINGS_DISTRICT).format(d=d)
        else:
            opening = _OPENINGS_NONE[0]
        rest = [
            s
            for s in (
                self._landmarks(facts, rng),
                self._connectivity(facts, rng),
                self._around(facts, rng),
                self._popular(facts, rng),
                self._camera(facts, rng),
            )
            if s
        ]
        rng.shuffle(rest)
        return " ".join([opening, *rest])

    def _landmarks(self, facts: PlaceFacts, rng: KeyedRng) -> str:
        marks = facts.landmarks
        if not marks:
            return ""
        first = {
            "n": marks[0].label,
            "dist": format_distance(marks[0].distance_m),
            "dir": marks[0].direction,
        }
        if len(marks) == 1 or rng.random() < 0.4:
            return rng.choice(_ONE_LANDMARK).format(**first)
        second = {
            "n2": marks[1].label,
            "dist2": format_distance(marks[1].distance_m),
            "dir2": marks[1].direction,
        }
        return rng.choice(_TWO_LANDMARKS).format(**first, **second)

    @staticmethod
    def _connectivity(facts: PlaceFacts, rng: KeyedRng) -> str:
        k = facts.degree
        if k == 1:
            return rng.choice(_DEAD_END)
        if k == 2:
            return rng.choice(_THROUGH)
        if k >= 3:
            word = _NUMBERS[k] if k < len(_NUMBERS) else str(k)
            return rng.choice(_JUNCTION).format(k=word, K=word.capitalize())
        return ""

    def _around(self, facts: PlaceFacts, rng: KeyedRng) -> str:
        items = [rng.choice(_DENSITY[facts.density])]
        if facts.water_share is not None:
            items.append(_amount(facts.water_share, "water", "a lot of water", "some water"))
        if facts.park_share is not None:
            items.append(_amount(facts.park_share, "park", "a large park", "some park"))
        rng.shuffle(items)
        text = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        return rng.choice(_AROUND).format(r=int(self.radius), items=text)

    def _popular(self, facts: PlaceFacts, rng: KeyedRng) -> str:
        if not facts.popular:
            return ""
        return rng.choice(_POPULAR).format(n=facts.photos, r=int(self.radius))

    @staticmethod
    def _camera(facts: PlaceFacts, rng: KeyedRng) -> str:
        parts = []
        if facts.heading is not None:
            parts.append(rng.choice(_HEADING).format(dir=compass(facts.heading)))
        if facts.year is not None:
            parts.append(
                rng.choice(_SOURCE.get(facts.source or "other", _SOURCE["other"])).format(
                    y=facts.year
                )
            )
        if facts.title:
            parts.append(f'Its title reads "{facts.title}".')
        return " ".join(parts)


# -- reasoning paths -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReasoningPath:
    """A walk on the street graph as a question and its answer.

    Attributes:
        nodes: node indices from start to end (no node repeats).
        steps: per step ``length_m``, ``bearing_deg``, ``dx_m``, ``dy_m``, ``direction``.
        kind: ``buurt``, ``landmark`` or ``displacement``: what the question asks.
        question, answer: the texts.
        facts: the answer's facts (end node id, buurt, district and the asked value).
    """

    nodes: tuple[int, ...]
    steps: tuple[dict[str, Any], ...]
    kind: str
    question: str
    answer: str
    facts: dict[str, Any]


_STARTS = (
    "Starting at the street corner nearest to this photo,",
    "From the point of the street network closest to where this picture was taken,",
    "Begin at the street node nearest to this image and",
)
_QUESTIONS = {
    "buurt": ("Which neighbourhood (buurt) are you in?", "In which buurt do you end up?"),
    "landmark": (
        "Which landmark is nearest to where you end up, and where is it?",
        "What is the closest landmark to your end point?",
    ),
    "displacement": (
        "How far and in which direction are you from the start, as the crow flies?",
        "Where are you relative to the starting point?",
    ),
}
QUESTION_KINDS = tuple(_QUESTIONS)


def random_walk(graph: SpatialGraph, start: int, hops: int, rng: KeyedRng) -> list[int]:
    """A walk of up to ``hops`` edges from ``start`` that never revisits a node (shorter when
    it reaches a dead end)."""
    path = [start]
    for _ in range(hops):
        options = [n for n in graph.neighbours(path[-1]).tolist() if n not in path]
        if not options:
            break
        path.append(rng.choice(options))
    return path


def reasoning_path(
    context: CityContext, start: int, rng: KeyedRng, max_hops: int = 3
) -> ReasoningPath | None:
    """A 1..``max_hops`` hop question/answer walk from node ``start``; ``None`` if isolated."""
    graph = context.graph
    nodes = random_walk(graph, start, rng.randint(1, max_hops), rng)
    if len(nodes) < 2:
        return None
    steps = []
    for a, b in zip(nodes[:-1], nodes[1:], strict=True):
        s = graph.step(a, b)
        steps.append(
            {
                "length_m": round(s["length"], 1),
                "bearing_deg": round(s["bearing"], 1),
                "dx_m": round(s["dx"], 2),
                "dy_m": round(s["dy"], 2),
                "direction": compass(s["bearing"]),
            }
        )
    verb = rng.choice(("walk", "go", "head"))
    moves = [f"{format_distance(s['length_m'])} {s['direction']}" for s in steps]
    route = f"{verb} {moves[0]}" + "".join(f", then {m}" for m in moves[1:])
    kind = rng.choice(QUESTION_KINDS)
    end = nodes[-1]
    buurt, district = str(context.node_buurt[end]), str(context.node_district[end])
    facts: dict[str, Any] = {
        "node_id": str(graph.node_ids[end]),
        "buurt": buurt,
        "district": district,
    }
    if kind == "buurt":
        if buurt:
            answer = f"You end up in {buurt}, in the {district} district."
        else:
            answer = "You end up outside the mapped neighbourhoods" + (
                f", in the {district} district." if district else "."
            )
    elif kind == "landmark":
        marks = context.node_landmark[end]
        if not marks:
            kind = "displacement"  # nothing within reach to ask about
        else:
            m = marks[0]
            facts.update(landmark=m.name, distance_m=m.distance_m, direction=m.direction)
            answer = (
                f"{m.label} is the nearest landmark, about {format_distance(m.distance_m)} "
                f"to the {m.direction}."
            )
    if kind == "displacement":
        d = graph.xy[end] - graph.xy[start]
        dist, direction = float(np.hypot(*d)), compass(float(bearing_deg(d[0], d[1])))
        facts.update(distance_m=round(dist, 1), direction=direction)
        answer = f"You are about {format_distance(dist)} {direction} of the start."
    start_text = rng.choice(_STARTS)
    question = f"{start_text} {route}. {rng.choice(_QUESTIONS[kind])}"
    return ReasoningPath(
        nodes=tuple(nodes),
        steps=tuple(steps),
        kind=kind,
        question=question,
        answer=answer,
        facts=facts,
    )


# -- graph records -------------------------------------------------------------------------------


@dataclass
class GraphRecord:
    """A subgraph in the paper's graph JSON layout (see the module docstring)."""

    center_node: str
    nodes: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    crs: str = RD_NEW

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``graphs/<node_id>.json``."""
        return {
            "center_node": self.center_node,
            "crs": self.crs,
            "nodes": self.nodes,
            "edges": self.edges,
        }

    @property
    def districts(self) -> set[str]:
        """Districts named by the nodes (for the held-out split)."""
        return {n["district"] for n in self.nodes if n.get("district")}


def node_text(
    kind: str, names: Sequence[str], buurt: str, district: str, lon: float, lat: float
) -> str:
    """A node's text in the paper's style: ``Category: ..., Name: ..., Neighborhood: ...``."""
    parts = [f"Category: {kind}"]
    if names:
        parts.append("Name: " + (" / ".join(names[:2])))
    if buurt:
        parts.append(f"Neighborhood: {buurt}")
    if district:
        parts.append(f"District: {district}")
    parts.append(f"Coordinates: ({lon:.6f}, {lat:.6f})")
    return ", ".join(parts)


def _node_kind(degree: int) -> str:
    if degree >= 3:
        return f"street junction ({degree} streets)"
    return {0: "isolated street node", 1: "dead end", 2: "street node"}[degree]


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


def to_networkx(record: GraphRecord):
    """The record as a ``networkx.Graph`` with ``node_text``/``coords`` node attributes and
    ``central_node_id`` graph attribute: what the paper's fork loads from pickles."""
    import networkx as nx  # optional: only this converter needs it

    g = nx.Graph(central_node_id=record.center_node, central_node=record.center_node)
    for n in record.nodes:
        g.add_node(n["node_id"], **{**n, "coords": tuple(n["coords"])})
    for e in record.edges:
        g.add_edge(
            e["source"],
            e["target"],
            **{k: v for k, v in e.items() if k not in ("source", "target")},
        )
    return g


# -- samples -------------------------------------------------------------------------------------


@dataclass
class UGSample:
    """One JSONL line (see the module docstring for every field)."""

    messages: list[dict[str, str]]
    positive_messages: list[list[dict[str, str]]]
    images: list[str]
    graphs: list[str]
    pair_type: str
    label: int = 1
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The line's JSON object, keys in the paper's order."""
        return {
            "messages": self.messages,
            "positive_messages": self.positive_messages,
            "images": self.images,
            "graphs": self.graphs,
            "pair_type": self.pair_type,
            "label": self.label,
            "meta": self.meta,
        }

    @property
    def query(self) -> str:
        """The query text (the last user message)."""
        return self.messages[-1]["content"]

    @property
    def positive(self) -> str:
        """The first positive text."""
        return self.positive_messages[0][-1]["content"]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@dataclass
class UGBuild:
    """What :func:`build_samples` makes: the samples and the graphs they reference."""

    samples: list[UGSample]
    graphs: dict[str, GraphRecord]
    images: int


def select_images(context: CityContext, max_images: int | None, seed: int) -> np.ndarray:
    """Row indices of the images to use: all, or a seeded random subset in catalog order."""
    n = len(context.images)
    if max_images is None or max_images >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 61]).choice(n, max_images, replace=False))


def build_samples(
    context: CityContext,
    out: str | PathLike,
    seed: int = 0,
    max_images: int | None = None,
    hops: int = 2,
    max_nodes: int = 64,
    paths_per_node: int = 2,
    captioner: Captioner | None = None,
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
    """
    captioner = captioner or TemplateCaptioner(seed, context.radius)
    out = Path(os.path.abspath(out))
    rows = select_images(context, max_images, seed)
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
    return UGBuild(samples=samples, graphs=graphs, images=len(images))


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


def graph_file_name(node_id: str) -> str:
    """The graph JSON file name of a node id (characters unsafe in file names become ``_``)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in node_id)
    return f"{safe}.json"


# -- held-out districts --------------------------------------------------------------------------


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


# -- files ---------------------------------------------------------------------------------------


def write_samples(samples: Iterable[UGSample], path: str | PathLike) -> int:
    """Write samples as JSONL (UTF-8, one object a line); returns the line count."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_json(), ensure_ascii=False, separators=(",", ":")))
            f.write("\n")
            count += 1
    return count


def write_graph(record: GraphRecord, path: str | PathLike) -> None:
    """Write one graph JSON file."""
    Path(path).write_text(
        json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )


def _fail(where: str, problem: str) -> UGDataFormatError:
    return UGDataFormatError(f"{where}: {problem}")


def _check_messages(value: Any, where: str, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _fail(where, f"'{name}' must be a non-empty list of messages")
    for m in value:
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise _fail(where, f"'{name}' holds a message without string 'role' and 'content'")
    return value


def sample_from_json(obj: Any, where: str) -> UGSample:
    """Check one parsed JSONL object and make it a sample.

    Raises:
        UGDataFormatError: naming ``where`` (``file:line``) and the problem.
    """
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("messages", "positive_messages", "images", "pair_type") if k not in obj]
    if missing:
        raise _fail(where, f"missing fields {missing}")
    messages = _check_messages(obj["messages"], where, "messages")
    positives = obj["positive_messages"]
    if not isinstance(positives, list) or not positives:
        raise _fail(where, "'positive_messages' must be a non-empty list of message lists")
    for p in positives:
        _check_messages(p, where, "positive_messages[]")
    for key in ("images", "graphs"):
        value = obj.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _fail(where, f"'{key}' must be a list of path strings")
    if not isinstance(obj["pair_type"], str):
        raise _fail(where, "'pair_type' must be a string")
    query = messages[-1]["content"]
    if query.count("<image>") != len(obj["images"]):
        raise _fail(where, f"{query.count('<image>')} <image> tags but {len(obj['images'])} images")
    if query.count("<graph>") != len(obj.get("graphs", [])):
        raise _fail(
            where, f"{query.count('<graph>')} <graph> tags but {len(obj.get('graphs', []))} graphs"
        )
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise _fail(where, "'meta' must be an object")
    return UGSample(
        messages,
        positives,
        list(obj["images"]),
        list(obj.get("graphs", [])),
        obj["pair_type"],
        int(obj.get("label", 1)),
        meta,
    )


def read_samples(path: str | PathLike) -> list[UGSample]:
    """Read and check a UGData JSONL file (blank lines are skipped).

    Raises:
        FileNotFoundError: if the file does not exist.
        UGDataFormatError: naming the file and line of the first malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: UGData JSONL file not found")
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _fail(where, f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
            samples.append(sample_from_json(obj, where))
    return samples


def read_graph(path: str | PathLike) -> GraphRecord:
    """Read and check a graph JSON file.

    Raises:
        FileNotFoundError: if the file does not exist.
        UGDataFormatError: naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: graph JSON file not found")
    where = str(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _fail(f"{where}:{exc.lineno}", f"not valid JSON ({exc.msg})") from exc
    if not isinstance(obj, dict) or not {"nodes", "edges", "center_node"} <= set(obj):
        raise _fail(where, "expected an object with 'nodes', 'edges' and 'center_node'")
    ids = set()
    for i, n in enumerate(obj["nodes"]):
        if not isinstance(n, dict) or not {"node_id", "coords", "node_text"} <= set(n):
            raise _fail(where, f"node {i} lacks 'node_id', 'coords' or 'node_text'")
        if not (isinstance(n["coords"], list) and len(n["coords"]) == 2):
            raise _fail(where, f"node {n['node_id']!r}: 'coords' must be [lon, lat]")
        ids.add(n["node_id"])
    for i, e in enumerate(obj["edges"]):
        if not isinstance(e, dict) or e.get("source") not in ids or e.get("target") not in ids:
            raise _fail(where, f"edge {i} must join two listed nodes (source, target)")
    if obj["center_node"] not in ids:
        raise _fail(where, f"center_node {obj['center_node']!r} is not a listed node")
    return GraphRecord(
        center_node=obj["center_node"],
        nodes=obj["nodes"],
        edges=obj["edges"],
        crs=obj.get("crs", RD_NEW),
    )


@dataclass
class UGData:
    """A UGData folder read back: its manifest and samples per file."""

    root: Path
    manifest: dict[str, Any]
    files: dict[str, list[UGSample]]

    def graph(self, sample: UGSample, index: int = 0) -> GraphRecord:
        """The ``index``-th graph of a sample, read from its JSON file."""
        return read_graph(self.root / sample.graphs[index])

    def image_path(self, sample: UGSample, index: int = 0) -> Path:
        """The absolute path of a sample's ``index``-th image."""
        return (self.root / sample.images[index]).resolve()


def read_ugdata(folder: str | PathLike, check_graphs: bool = True) -> UGData:
    """Read a UGData folder: manifest, ``train.jsonl`` and ``heldout.jsonl`` if present.

    Args:
        folder: the output folder of a build.
        check_graphs: read and check every graph file the samples name.

    Raises:
        FileNotFoundError: for a missing folder, manifest, JSONL or referenced graph file.
        UGDataFormatError: naming the file (and line) of malformed content.
    """
    root = Path(folder)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not a UGData folder (no manifest)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _fail(f"{manifest_path}:{exc.lineno}", f"not valid JSON ({exc.msg})") from exc
    files = {
        name: read_samples(root / name)
        for name in (TRAIN_FILE, HELDOUT_FILE)
        if (root / name).is_file()
    }
    if TRAIN_FILE not in files:
        raise FileNotFoundError(f"{root / TRAIN_FILE}: UGData JSONL file not found")
    if check_graphs:
        for name in sorted({g for samples in files.values() for s in samples for g in s.graphs}):
            read_graph(root / name)
    return UGData(root=root, manifest=manifest, files=files)
