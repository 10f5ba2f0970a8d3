"""UGE stage 2: a GATv2 graph encoder over a place's street subgraph, and its fusion with the image.

Each image is anchored to a street-graph node; its subgraph (the node and its neighbours up to a
few hops, tens of nodes) is encoded by GATv2 attention (Brody, Alon, Yahav 2022, "How Attentive
are Graph Attention Networks?") with edge features (length, bearing, dx, dy) and a multi-scale
sinusoidal encoding of node coordinates relative to the centre node. The centre node's output
is fused with the stage-1 image embedding (:class:`SpatialFusion`) and trained contrastively
against the spatial captions' text embeddings.

Why compact torch instead of torch-geometric: the subgraphs hold tens of nodes and at most a few
hundred edges, so a padded batch (B, N, ...) with an edge list (B, E, 2) and a scatter softmax
from core torch (``scatter_reduce`` / ``index_add``) is as fast as a sparse library at this size,
runs on any device torch runs on, and spares the project a heavy dependency whose wheels must
match the exact torch and CUDA build (they often lag a new torch release).

Batch layout (all tensors padded to the largest subgraph of the batch):

- ``nodes`` (B, N, F) node features, ``node_mask`` (B, N) bool (True = real node);
- ``edges`` (B, E, 2) long ``[source, target]`` node indices (messages flow source -> target;
  give both directions for an undirected street), ``edge_mask`` (B, E) bool,
  ``edge_attr`` (B, E, edge_dim), e.g. ``[length / 100 m, sin bearing, cos bearing, dx / 100 m,
  dy / 100 m]``: scale metre quantities to about unit range, the layers do not normalise them;
- ``centre`` (B,) long index of the anchor node; ``xy`` (B, N, 2) node coordinates in metres
  (any projected CRS, e.g. RD New), optional.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_encoding(
    xy_metres: torch.Tensor,
    dim: int,
    scales: Sequence[float] | None = None,
    min_scale: float = 10.0,
    max_scale: float = 10_000.0,
) -> torch.Tensor:
    """Multi-scale sin/cos encoding of planar coordinates (Space2Vec style).

    For K = dim / 4 wavelengths lambda_k the output is
    ``[sin(2 pi x / lambda_k)]_k, [cos(2 pi x / lambda_k)]_k, [sin(2 pi y / lambda_k)]_k,
    [cos(2 pi y / lambda_k)]_k``: short wavelengths resolve neighbouring nodes, long ones the
    district scale. Pass coordinates relative to the centre node so the encoding is
    translation invariant.

    Args:
        xy_metres: (..., 2) x (east) and y (north) in metres.
        dim: output size, a multiple of 4.
        scales: the K wavelengths in metres; None spaces them geometrically from
            ``min_scale`` to ``max_scale``.
        min_scale: shortest wavelength (metres) when ``scales`` is None.
        max_scale: longest wavelength (metres) when ``scales`` is None.

    Returns:
        (..., dim) tensor in the input's float dtype.
    """
    if dim <= 0 or dim % 4:
        raise ValueError(f"dim must be a positive multiple of 4, got {dim}")
    if xy_metres.shape[-1] != 2:
        raise ValueError(f"expected (..., 2) coordinates, got shape {tuple(xy_metres.shape)}")
    k = dim // 4
    if scales is None:
        if k == 1:
            wavelengths = torch.tensor([min_scale], dtype=torch.float64)
        else:
            ratio = torch.arange(k, dtype=torch.float64) / (k - 1)
            wavelengths = min_scale * (max_scale / min_scale) ** ratio
    else:
        if len(scales) != k:
            raise ValueError(f"dim {dim} needs {k} scales (dim / 4), got {len(scales)}")
        wavelengths = torch.as_tensor(list(scales), dtype=torch.float64)
    dtype = xy_metres.dtype if xy_metres.is_floating_point() else torch.float32
    # float64 phases: RD coordinates are ~1e5 m, fine wavelengths need the precision
    freq = (2 * math.pi / wavelengths).to(xy_metres.device)
    phase = xy_metres.to(torch.float64).unsqueeze(-1) * freq  # (..., 2, K)
    x, y = phase[..., 0, :], phase[..., 1, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=-1).to(dtype)


def _with_self_loops(
    edges: torch.Tensor, edge_mask: torch.Tensor, edge_attr: torch.Tensor, node_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append one self loop per node (masked for padded nodes) and mask edges to padding.

    Returns the extended edges, mask and attributes, and a (B, E + N) bool marking self loops.
    """
    batch, nodes = node_mask.shape
    index = torch.arange(nodes, device=edges.device)
    loops = torch.stack([index, index], dim=-1).expand(batch, nodes, 2)
    all_edges = torch.cat([edges.long(), loops], dim=1)
    # an edge touching a padded node would leak padding into real nodes
    src_ok = torch.gather(node_mask, 1, edges[..., 0].long().clamp(0, nodes - 1))
    dst_ok = torch.gather(node_mask, 1, edges[..., 1].long().clamp(0, nodes - 1))
    real = edge_mask & src_ok & dst_ok
    mask = torch.cat([real, node_mask], dim=1)
    loop_attr = edge_attr.new_zeros(batch, nodes, edge_attr.shape[-1])
    attr = torch.cat([edge_attr, loop_attr], dim=1)
    is_loop = torch.cat([torch.zeros_like(edge_mask), torch.ones_like(node_mask)], dim=1).bool()
    return all_edges, mask, attr, is_loop


class GATv2Layer(nn.Module):
    """Multi-head GATv2 attention with edge features over padded batched graphs.

    Score of the edge j -> i: ``e_ij = a^T LeakyReLU(W_t h_i + W_s h_j + W_e f_ij)`` (GATv2:
    the nonlinearity comes before ``a``, so the ranking of neighbours depends on the query
    node), i.e. ``W [h_i || h_j || f_ij]`` split in three. Softmax over node i's in-neighbours
    including a self loop (whose edge features are a learned vector); the message is
    ``W_s h_j``. Padded nodes and masked edges take no part; padded nodes output zeros.

    Args:
        in_dim: input node features.
        out_dim: output features per head.
        heads: attention heads.
        edge_dim: edge features (0 for none).
        concat: concatenate heads (output ``heads * out_dim``) or average them (``out_dim``).
        negative_slope: LeakyReLU slope.
        dropout: dropout on attention weights (train mode only).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        heads: int = 4,
        edge_dim: int = 0,
        concat: bool = True,
        negative_slope: float = 0.2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.heads, self.out_dim, self.concat = heads, out_dim, concat
        self.negative_slope, self.dropout = negative_slope, dropout
        self.source = nn.Linear(in_dim, heads * out_dim)
        self.target = nn.Linear(in_dim, heads * out_dim)
        self.edge = nn.Linear(edge_dim, heads * out_dim, bias=False) if edge_dim else None
        self.self_loop_attr = nn.Parameter(torch.zeros(edge_dim)) if edge_dim else None
        self.att = nn.Parameter(torch.empty(heads, out_dim))
        self.bias = nn.Parameter(torch.zeros(heads * out_dim if concat else out_dim))
        nn.init.xavier_uniform_(self.att)

    def forward(
        self,
        x: torch.Tensor,
        node_mask: torch.Tensor,
        edges: torch.Tensor,
        edge_mask: torch.Tensor,
        edge_attr: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Attend over in-neighbours.

        Args:
            x: (B, N, in_dim) node features.
            node_mask: (B, N) bool.
            edges: (B, E, 2) ``[source, target]``.
            edge_mask: (B, E) bool.
            edge_attr: (B, E, edge_dim), required when the layer has edge features.
            return_attention: also return ``{"edges": (B, E + N, 2), "mask": (B, E + N),
                "alpha": (B, E + N, heads)}`` (self loops appended after the E edges).

        Returns:
            (B, N, heads * out_dim) or (B, N, out_dim); zeros at padded nodes.
        """
        batch, nodes, _ = x.shape
        heads, width = self.heads, self.out_dim
        node_mask = node_mask.bool()
        if edge_attr is None:
            edge_attr = x.new_zeros(*edges.shape[:2], 0)
        edges_all, mask, attr, is_loop = _with_self_loops(
            edges, edge_mask.bool(), edge_attr.to(x.dtype), node_mask
        )
        src, dst = edges_all[..., 0].clamp(0, nodes - 1), edges_all[..., 1].clamp(0, nodes - 1)
        hs = self.source(x).view(batch, nodes, heads, width)
        ht = self.target(x).view(batch, nodes, heads, width)
        take = torch.arange(batch, device=x.device)[:, None]
        msg = hs[take, src]  # (B, E', H, C)
        pre = msg + ht[take, dst]
        if self.edge is not None:
            loop_attr = self.self_loop_attr.to(x.dtype).expand_as(attr)
            attr = torch.where(is_loop.unsqueeze(-1), loop_attr, attr)
            pre = pre + self.edge(attr).view(batch, -1, heads, width)
        score = (F.leaky_relu(pre, self.negative_slope) * self.att).sum(-1)  # (B, E', H)

        # softmax per target node: flatten (batch, target) into one segment id; masked edges go
        # to a spare segment so they neither receive nor give weight
        spare = batch * nodes
        segment = torch.where(mask, take * nodes + dst, torch.full_like(dst, spare)).reshape(-1)
        valid = mask.reshape(-1, 1)
        score = score.reshape(-1, heads).float().masked_fill(~valid, 0.0)
        # the max shift only guards exp() against overflow (it cancels in the ratio), so it is
        # detached; empty segments keep a finite 0 so no NaN can reach the backward pass
        top = score.new_full((spare + 1, heads), float("-inf"))
        masked = score.detach().masked_fill(~valid, float("-inf"))
        top = top.scatter_reduce(0, segment[:, None].expand(-1, heads), masked, "amax")
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weight = (score - top[segment]).exp() * valid
        total = score.new_zeros(spare + 1, heads).index_add(0, segment, weight)
        alpha = weight / total[segment].clamp(min=1e-20)
        alpha_drop = F.dropout(alpha, self.dropout, self.training).to(x.dtype)
        out = x.new_zeros(spare + 1, heads, width)
        out = out.index_add(0, segment, alpha_drop[..., None] * msg.reshape(-1, heads, width))
        out = out[:spare].view(batch, nodes, heads, width)
        out = out.reshape(batch, nodes, heads * width) if self.concat else out.mean(dim=2)
        out = (out + self.bias) * node_mask.unsqueeze(-1).to(x.dtype)
        if return_attention:
            info = {"edges": edges_all, "mask": mask, "alpha": alpha.view(batch, -1, heads)}
            return out, info
        return out


class GraphEncoder(nn.Module):
    """Stacked GATv2 layers over a place's subgraph; returns the centre node's embedding.

    Input projection of node features (plus the sinusoidal encoding of coordinates relative to
    the centre node when ``xy`` is given), then ``layers`` pre-norm residual GATv2 blocks, then a
    linear map of the centre node to ``out_dim``.

    Args:
        node_dim: node feature size F (0 when nodes carry only coordinates).
        edge_dim: edge feature size.
        hidden: hidden width (divisible by ``heads``).
        layers: GATv2 blocks (a block reaches one hop further).
        heads: attention heads.
        out_dim: output size.
        pos_dim: sinusoidal position features (multiple of 4; 0 disables them).
        pos_scales: wavelengths in metres (``pos_dim / 4`` of them); None = 10 m .. 10 km.
        place_dim: sinusoidal features of the nodes' absolute coordinates (multiple of 4; 0,
            the default, keeps the encoder translation invariant). Where a place lies is what
            a caption's landmark distances and directions describe.
        place_scales: their wavelengths in metres; None = 200 m .. 20 km.
        dropout: attention and feature dropout.
    """

    def __init__(
        self,
        node_dim: int,
        edge_dim: int,
        hidden: int = 64,
        layers: int = 2,
        heads: int = 4,
        out_dim: int = 64,
        pos_dim: int = 32,
        pos_scales: Sequence[float] | None = None,
        place_dim: int = 0,
        place_scales: Sequence[float] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden {hidden} must be divisible by heads {heads}")
        if node_dim + pos_dim <= 0:
            raise ValueError("nodes need features, coordinates (pos_dim > 0) or both")
        self.pos_dim, self.pos_scales = pos_dim, pos_scales
        self.place_dim, self.place_scales = place_dim, place_scales
        self.node_dim, self.out_dim = node_dim, out_dim
        self.input = nn.Linear(node_dim + pos_dim + place_dim, hidden)
        self.layers = nn.ModuleList(
            GATv2Layer(hidden, hidden // heads, heads, edge_dim, dropout=dropout)
            for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.feedforward = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(hidden),
                nn.Linear(hidden, 2 * hidden),
                nn.GELU(),
                nn.Linear(2 * hidden, hidden),
            )
            for _ in range(layers)
        )
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, out_dim))

    def node_inputs(
        self, nodes: torch.Tensor | None, centre: torch.Tensor, xy: torch.Tensor | None
    ) -> torch.Tensor:
        """Node features joined with the position encodings: relative to the centre node, and
        absolute (``place_dim``)."""
        parts = [] if nodes is None or self.node_dim == 0 else [nodes]
        if (self.pos_dim or self.place_dim) and xy is None:
            raise ValueError("this GraphEncoder encodes coordinates: pass xy (B, N, 2)")
        if self.pos_dim:
            take = torch.arange(xy.shape[0], device=xy.device)
            relative = xy - xy[take, centre.long()].unsqueeze(1)
            parts.append(sinusoidal_encoding(relative, self.pos_dim, self.pos_scales))
        if self.place_dim:
            parts.append(
                sinusoidal_encoding(xy, self.place_dim, self.place_scales, 200.0, 20_000.0)
            )
        dtype = self.input.weight.dtype
        return torch.cat([part.to(dtype) for part in parts], dim=-1)

    def forward(
        self,
        nodes: torch.Tensor | None,
        node_mask: torch.Tensor,
        edges: torch.Tensor,
        edge_mask: torch.Tensor,
        edge_attr: torch.Tensor | None,
        centre: torch.Tensor,
        xy: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode padded subgraphs (layout in the module docstring); returns (B, out_dim)."""
        node_mask = node_mask.bool()
        keep = node_mask.unsqueeze(-1).to(self.input.weight.dtype)
        h = self.input(self.node_inputs(nodes, centre, xy)) * keep
        for attend, norm, feedforward in zip(
            self.layers, self.norms, self.feedforward, strict=True
        ):
            h = h + self.dropout(F.elu(attend(norm(h), node_mask, edges, edge_mask, edge_attr)))
            h = (h + self.dropout(feedforward(h))) * keep
        take = torch.arange(h.shape[0], device=h.device)
        return self.output(h[take, centre.long()])


class SpatialFusion(nn.Module):
    """Fuse the image embedding with the graph embedding into one L2-normalised embedding.

    ``gated``: ``normalise(image + g * P(graph))`` with ``g = sigmoid(W [image || P(graph)])``
    per dimension; the gate's bias starts negative so stage 2 starts near the stage-1 image
    embedding and learns how much spatial context to mix in. ``concat``: ``normalise(image +
    MLP([image || graph]))``, a residual MLP.

    Args:
        dim: image embedding size (and output size).
        graph_dim: graph embedding size.
        mode: ``gated`` or ``concat``.
        hidden: MLP width for ``concat`` (default ``2 * dim``).
        gate_bias: initial gate bias for ``gated`` (sigmoid(-2) ~ 0.12).
    """

    def __init__(
        self,
        dim: int,
        graph_dim: int,
        mode: str = "gated",
        hidden: int | None = None,
        gate_bias: float = -2.0,
    ) -> None:
        super().__init__()
        if mode not in ("gated", "concat"):
            raise ValueError(f"mode must be 'gated' or 'concat', got {mode!r}")
        self.mode = mode
        if mode == "gated":
            self.project = nn.Linear(graph_dim, dim)
            self.gate = nn.Linear(2 * dim, dim)
            nn.init.constant_(self.gate.bias, gate_bias)
        else:
            width = hidden or 2 * dim
            self.mlp = nn.Sequential(
                nn.Linear(dim + graph_dim, width), nn.GELU(), nn.Linear(width, dim)
            )

    def forward(self, image: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
        """(B, dim) image and (B, graph_dim) graph embeddings -> (B, dim), unit norm, fp32."""
        image = image.float()
        graph = graph.float()
        if self.mode == "gated":
            context = self.project(graph)
            gate = torch.sigmoid(self.gate(torch.cat([image, context], dim=-1)))
            fused = image + gate * context
        else:
            fused = image + self.mlp(torch.cat([image, graph], dim=-1))
        return F.normalize(fused, dim=-1)
