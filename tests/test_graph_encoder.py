"""The UGE stage-2 graph encoder: position encoding, GATv2 attention, padding, fusion."""

from __future__ import annotations

import math

import pytest
import torch

from core.models.graph_encoder import GATv2Layer, GraphEncoder, SpatialFusion, sinusoidal_encoding

NODE_DIM, EDGE_DIM = 5, 4


def _graphs(seed: int = 0, batch: int = 3, nodes: int = 8, edges: int = 14):
    """A padded batch: graph 0 has 2 padded nodes, graph 1 has 4 padded edges."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, nodes, NODE_DIM, generator=gen)
    node_mask = torch.ones(batch, nodes, dtype=torch.bool)
    node_mask[0, 6:] = False
    # graph 0's edges stay among its 6 real nodes; the others use all 8
    high = torch.tensor([6] + [nodes] * (batch - 1)).view(batch, 1, 1)
    edge_index = (torch.rand(batch, edges, 2, generator=gen) * high).long()
    edge_mask = torch.ones(batch, edges, dtype=torch.bool)
    edge_mask[1, -4:] = False
    edge_attr = torch.randn(batch, edges, EDGE_DIM, generator=gen)
    centre = torch.tensor([0, 3, 5])[:batch]
    xy = torch.randn(batch, nodes, 2, generator=gen) * 200 + 120_000
    return x, node_mask, edge_index, edge_mask, edge_attr, centre, xy


def _encoder(seed: int = 0) -> GraphEncoder:
    torch.manual_seed(seed)
    return GraphEncoder(NODE_DIM, EDGE_DIM, hidden=32, layers=2, heads=4, out_dim=16).eval()


def test_sinusoidal_encoding_hand_case():
    # one wavelength of 100 m: a quarter wavelength east is sin = 1, cos = 0
    xy = torch.tensor([[25.0, 0.0], [0.0, 50.0], [0.0, 0.0]])
    out = sinusoidal_encoding(xy, 4, scales=[100.0])
    expected = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, -1.0], [0.0, 1.0, 0.0, 1.0]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # default scales: dim / 4 wavelengths per axis, geometric from 10 m to 10 km
    many = sinusoidal_encoding(torch.zeros(2, 3, 2), 32)
    assert many.shape == (2, 3, 32)
    x = torch.tensor([[1.0, 0.0]])
    enc = sinusoidal_encoding(x, 8, min_scale=10.0, max_scale=1000.0)
    expected_x = [math.sin(2 * math.pi / 10.0), math.sin(2 * math.pi / 1000.0)]
    torch.testing.assert_close(enc[0, :2], torch.tensor(expected_x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        sinusoidal_encoding(xy, 6)
    with pytest.raises(ValueError, match="scales"):
        sinusoidal_encoding(xy, 8, scales=[10.0])


def test_attention_sums_to_one_over_in_neighbours():
    x, node_mask, edges, edge_mask, edge_attr, _, _ = _graphs()
    torch.manual_seed(0)
    layer = GATv2Layer(NODE_DIM, 8, heads=2, edge_dim=EDGE_DIM)
    _, info = layer(x, node_mask, edges, edge_mask, edge_attr, return_attention=True)
    alpha, mask, all_edges = info["alpha"], info["mask"], info["edges"]
    batch, nodes = node_mask.shape
    sums = torch.zeros(batch, nodes, 2)
    for b in range(batch):
        for e in range(all_edges.shape[1]):
            if mask[b, e]:
                sums[b, all_edges[b, e, 1]] += alpha[b, e]
    expected = node_mask.float().unsqueeze(-1).expand(-1, -1, 2)
    torch.testing.assert_close(sums, expected)
    # masked edges (padding, and edges into padded nodes) get exactly zero weight
    assert (alpha[~mask] == 0).all()
    assert not mask[0, -nodes:][6:].any()  # padded nodes' self loops are masked too


def test_padded_nodes_and_edges_change_nothing():
    x, node_mask, edges, edge_mask, edge_attr, centre, xy = _graphs()
    encoder = _encoder()
    with torch.no_grad():
        base = encoder(x, node_mask, edges, edge_mask, edge_attr, centre, xy)
        x2, xy2, attr2, edges2 = x.clone(), xy.clone(), edge_attr.clone(), edges.clone()
        x2[0, 6:] = 1e3 * torch.randn(2, NODE_DIM)
        xy2[0, 6:] = -5e4
        attr2[1, -4:] = 1e3
        edges2[1, -4:] = torch.tensor([[0, 3], [1, 3], [3, 3], [2, 3]])  # into the centre
        perturbed = encoder(x2, node_mask, edges2, edge_mask, attr2, centre, xy2)
        # an edge marked valid from a padded node into the centre is still ignored
        extra = torch.tensor([[[7, 0]], [[0, 3]], [[0, 5]]])
        edges3 = torch.cat([edges, extra], dim=1)
        mask3 = torch.cat([edge_mask, torch.tensor([[True], [False], [False]])], dim=1)
        attr3 = torch.cat([edge_attr, torch.ones(3, 1, EDGE_DIM)], dim=1)
        leaked = encoder(x2, node_mask, edges3, mask3, attr3, centre, xy2)
    torch.testing.assert_close(perturbed, base)
    torch.testing.assert_close(leaked, base)
    # the padded-edge perturbation would matter if it were unmasked (the test can fail)
    with torch.no_grad():
        unmasked = encoder(x, node_mask, edges2, torch.ones_like(edge_mask), attr2, centre, xy)
    assert not torch.allclose(unmasked[1], base[1], atol=1e-4)


def test_permutation_of_non_centre_nodes_is_invariant():
    x, node_mask, edges, edge_mask, edge_attr, centre, xy = _graphs(seed=1)
    encoder = _encoder()
    batch, nodes = node_mask.shape
    gen = torch.Generator().manual_seed(5)
    perm = torch.stack([torch.randperm(nodes, generator=gen) for _ in range(batch)])  # new -> old
    inverse = perm.argsort(dim=1)  # old -> new
    take = torch.arange(batch)[:, None]
    x_p, mask_p, xy_p = x[take, perm], node_mask[take, perm], xy[take, perm]
    edges_p = torch.stack([inverse[b][edges[b]] for b in range(batch)])
    centre_p = inverse[torch.arange(batch), centre]
    # shuffle the edge list too
    order = torch.randperm(edges.shape[1], generator=gen)
    with torch.no_grad():
        base = encoder(x, node_mask, edges, edge_mask, edge_attr, centre, xy)
        permuted = encoder(
            x_p, mask_p, edges_p[:, order], edge_mask[:, order], edge_attr[:, order], centre_p, xy_p
        )
    torch.testing.assert_close(permuted, base, atol=1e-5, rtol=1e-5)
    # a different centre gives a different embedding (the readout is the centre node)
    with torch.no_grad():
        other = encoder(x, node_mask, edges, edge_mask, edge_attr, (centre + 1) % 6, xy)
    assert not torch.allclose(other, base, atol=1e-4)


def test_edge_features_and_coordinates_matter():
    x, node_mask, edges, edge_mask, edge_attr, centre, xy = _graphs(seed=2)
    encoder = _encoder()
    with torch.no_grad():
        base = encoder(x, node_mask, edges, edge_mask, edge_attr, centre, xy)
        new_attr = encoder(x, node_mask, edges, edge_mask, edge_attr + 1.0, centre, xy)
        moved = xy.clone()
        moved[:, :, 0] += torch.linspace(0, 300, xy.shape[1])
        new_xy = encoder(x, node_mask, edges, edge_mask, edge_attr, centre, moved)
        # a common translation is invisible: positions are relative to the centre node
        shifted = encoder(x, node_mask, edges, edge_mask, edge_attr, centre, xy + 1000.0)
    assert (new_attr - base).abs().amax(dim=1).min() > 1e-4
    assert (new_xy - base).abs().amax(dim=1).min() > 1e-4
    torch.testing.assert_close(shifted, base, atol=1e-5, rtol=1e-4)


def test_place_features_see_where_a_graph_lies():
    x, node_mask, edges, edge_mask, edge_attr, centre, xy = _graphs(seed=3)
    torch.manual_seed(0)
    encoder = GraphEncoder(NODE_DIM, EDGE_DIM, hidden=32, out_dim=16, place_dim=8).eval()
    assert encoder.input.in_features == NODE_DIM + 32 + 8
    with torch.no_grad():
        base = encoder(x, node_mask, edges, edge_mask, edge_attr, centre, xy)
        shifted = encoder(x, node_mask, edges, edge_mask, edge_attr, centre, xy + 1000.0)
    # the same street pattern 1 km away is another place (shortest wavelength 200 m: 1 km is
    # five whole periods there, but not of the longer ones)
    assert (shifted - base).abs().amax(dim=1).min() > 1e-3


def test_graph_encoder_trains_without_nans():
    x, node_mask, edges, edge_mask, edge_attr, centre, xy = _graphs(seed=3)
    encoder = _encoder().train()
    out = encoder(x, node_mask, edges, edge_mask, edge_attr, centre, xy)
    assert out.shape == (3, 16)
    out.pow(2).sum().backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert encoder.layers[0].self_loop_attr.grad is not None


@pytest.mark.parametrize("mode", ["gated", "concat"])
def test_spatial_fusion_unit_norm(mode: str):
    torch.manual_seed(0)
    fusion = SpatialFusion(dim=24, graph_dim=16, mode=mode)
    image = torch.nn.functional.normalize(torch.randn(5, 24), dim=-1)
    graph = torch.randn(5, 16)
    out = fusion(image, graph)
    assert out.shape == (5, 24)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    # the graph side contributes
    assert not torch.allclose(fusion(image, graph + 1.0), out)
    out.sum().backward()
    with pytest.raises(ValueError, match="mode"):
        SpatialFusion(8, 8, mode="sum")
