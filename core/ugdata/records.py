"""What a UGData folder holds: file names, pair types, and the sample and graph records.

The layout of every field is documented in :mod:`core.ugdata`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.grid import RD_NEW

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

if TYPE_CHECKING:
    import networkx as nx


class UGDataFormatError(ValueError):
    """A UGData file that does not follow the layout; the message names the file and line."""


@dataclass
class GraphRecord:
    """A subgraph in the paper's graph JSON layout (see :mod:`core.ugdata`)."""

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


def to_networkx(record: GraphRecord) -> nx.Graph:
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


@dataclass
class UGSample:
    """One JSONL line (see :mod:`core.ugdata` for every field)."""

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


def graph_file_name(node_id: str) -> str:
    """The graph JSON file name of a node id (characters unsafe in file names become ``_``)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in node_id)
    return f"{safe}.json"
