"""The spatial graph: the street network in RD New, cells and images anchored to its nodes,
subgraphs around a node, and the reader of ``graph/streets.gpkg``."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from core.grid import RD_NEW, cell_center
from core.ugdata.geometry import bearing_deg, edge_features


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
