"""UGE stage 2 in use: street subgraphs as padded batches, the graph model, fused embeddings.

A UGData sample's subgraph (its own graph file, else its anchor node's) becomes a padded batch
for :class:`~core.models.graph_encoder.GraphEncoder` (:func:`graph_records`,
:func:`node_vectors`, :func:`graph_tensors`); :class:`GraphModel` encodes it and fuses it with
the frozen stage-1 image embedding (:func:`fused_embeddings`). The trainer
(``python -m train uge``) fits it; a run's folder restores it (:func:`core.models.uge_run.restore`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from typing_extensions import override

from core.models.graph_encoder import GraphEncoder, SpatialFusion
from core.models.uge import NODE_TASK, UGEEmbedder
from core.ugdata import GRAPH_DIR, GraphRecord, UGData, UGSample, graph_file_name, read_graph

STRUCTURE_FEATURES = 2  # degree / 4 and hop / 2; the node text's embedding follows them
EDGE_FEATURES = 5  # length / 100 m, sin and cos of the bearing, dx and dy / 100 m


def graph_file(sample: UGSample) -> str:
    """A sample's street subgraph file: its own, else its anchor node's (where a walk starts)."""
    return (
        sample.graphs[0]
        if sample.graphs
        else f"{GRAPH_DIR}/{graph_file_name(str(sample.meta['node_id']))}"
    )


def graph_records(data: UGData, samples: Sequence[UGSample]) -> list[GraphRecord]:
    """Each sample's subgraph; a file shared by several samples (one anchor node) is read once."""
    files: dict[str, GraphRecord] = {}
    for sample in samples:
        name = graph_file(sample)
        if name not in files:
            files[name] = read_graph(data.root / name)
    return [files[graph_file(sample)] for sample in samples]


def node_texts(records: Sequence[GraphRecord]) -> dict[str, str]:
    """The text of every node in ``records``, by node id (each node once, in first-seen order)."""
    texts: dict[str, str] = {}
    for record in records:
        for node in record.nodes:
            texts.setdefault(node["node_id"], node["node_text"])
    return texts


def embed_node_texts(
    embedder: UGEEmbedder, texts: Sequence[str], batch_size: int = 128
) -> torch.Tensor:
    """Node texts embedded under the node task, ``(len(texts), dim)`` on the CPU."""
    with torch.no_grad():
        vectors = [
            embedder.embed_texts(list(texts[k : k + batch_size]), NODE_TASK).float().cpu()
            for k in range(0, len(texts), batch_size)
        ]
    return torch.cat(vectors) if vectors else torch.zeros(0, embedder.dim)


def node_vectors(
    embedder: UGEEmbedder, records: Sequence[GraphRecord], batch_size: int = 128
) -> dict[str, torch.Tensor]:
    """The embedding of every node text in ``records``, by node id (each node embedded once)."""
    texts = node_texts(records)
    vectors = embed_node_texts(embedder, list(texts.values()), batch_size)
    return dict(zip(texts, vectors, strict=True))


def graph_batch(
    records: Sequence[GraphRecord], node_vectors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Padded tensors of subgraphs for :class:`GraphEncoder` (both edge directions).

    A node's features are its degree and hop, then the embedding of its text (``node_vectors``,
    keyed by node id: the paper's nodes carry their category, neighbourhood and coordinates as
    text, so names in a caption can meet the same names on the graph).
    """
    n = max(len(r.nodes) for r in records)
    e = max(2 * len(r.edges) for r in records) or 1
    width = STRUCTURE_FEATURES + next(iter(node_vectors.values())).shape[0]
    batch = {
        "nodes": torch.zeros(len(records), n, width),
        "node_mask": torch.zeros(len(records), n, dtype=torch.bool),
        "xy": torch.zeros(len(records), n, 2),
        "edges": torch.zeros(len(records), e, 2, dtype=torch.long),
        "edge_mask": torch.zeros(len(records), e, dtype=torch.bool),
        "edge_attr": torch.zeros(len(records), e, EDGE_FEATURES),
        "centre": torch.zeros(len(records), dtype=torch.long),
    }
    for b, record in enumerate(records):
        index = {node["node_id"]: i for i, node in enumerate(record.nodes)}
        for i, node in enumerate(record.nodes):
            batch["nodes"][b, i, :STRUCTURE_FEATURES] = torch.tensor(
                [node.get("degree", 0) / 4, node.get("hop", 0) / 2]
            )
            batch["nodes"][b, i, STRUCTURE_FEATURES:] = node_vectors[node["node_id"]]
            batch["xy"][b, i] = torch.tensor(node["xy"], dtype=torch.float32)
        batch["node_mask"][b, : len(record.nodes)] = True
        batch["centre"][b] = index[record.center_node]
        for j, edge in enumerate(record.edges):
            bearing = np.radians(edge["bearing_deg"])
            forward = [
                edge["length_m"] / 100,
                np.sin(bearing),
                np.cos(bearing),
                edge["dx_m"] / 100,
                edge["dy_m"] / 100,
            ]
            backward = [forward[0], -forward[1], -forward[2], -forward[3], -forward[4]]
            for k, (pair, attr) in enumerate(
                (
                    ((edge["source"], edge["target"]), forward),
                    ((edge["target"], edge["source"]), backward),
                )
            ):
                batch["edges"][b, 2 * j + k] = torch.tensor([index[pair[0]], index[pair[1]]])
                batch["edge_attr"][b, 2 * j + k] = torch.tensor(attr, dtype=torch.float32)
                batch["edge_mask"][b, 2 * j + k] = True
    return batch


def _pad_cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate padded graph batches of different widths."""
    out = {}
    for key in parts[0]:
        width = max(p[key].shape[1] for p in parts) if parts[0][key].ndim > 1 else None
        padded = []
        for p in parts:
            value = p[key]
            if width is not None and value.shape[1] < width:
                pad = torch.zeros(
                    (value.shape[0], width - value.shape[1], *value.shape[2:]), dtype=value.dtype
                )
                value = torch.cat([value, pad], 1)
            padded.append(value)
        out[key] = torch.cat(padded)
    return out


def graph_tensors(
    records: Sequence[GraphRecord], vectors: Mapping[str, torch.Tensor], batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Subgraphs as one padded batch (see :func:`graph_batch`)."""
    return _pad_cat(
        [
            graph_batch(records[i : i + batch_size], vectors)
            for i in range(0, len(records), batch_size)
        ]
    )


class GraphModel(torch.nn.Module):
    """Stage 2: the graph encoder and its fusion with the (frozen) image embedding."""

    def __init__(self, image_dim: int, graph_dim: int, place_dim: int = 0) -> None:
        super().__init__()
        self.encoder = GraphEncoder(
            STRUCTURE_FEATURES + image_dim,
            EDGE_FEATURES,
            hidden=graph_dim,
            out_dim=graph_dim,
            place_dim=place_dim,
        )
        self.fusion = SpatialFusion(image_dim, graph_dim)

    @override
    def forward(self, image: torch.Tensor, graphs: dict[str, torch.Tensor]) -> torch.Tensor:
        graph = self.encoder(
            graphs["nodes"],
            graphs["node_mask"],
            graphs["edges"],
            graphs["edge_mask"],
            graphs["edge_attr"],
            graphs["centre"],
            graphs["xy"],
        )
        return self.fusion(image, graph)


def fused_embeddings(
    model: GraphModel, images: torch.Tensor, graphs: dict[str, torch.Tensor], batch_size: int = 256
) -> torch.Tensor:
    """Stage-2 embeddings of images with their subgraphs."""
    with torch.no_grad():
        return (
            torch.cat(
                [
                    model(
                        images[i : i + batch_size],
                        {k: v[i : i + batch_size] for k, v in graphs.items()},
                    )
                    for i in range(0, len(images), batch_size)
                ]
            )
            if len(images)
            else images
        )
