"""MoCo v3: heads, momentum update, InfoNCE against a direct computation, the momentum schedule,
a training step, and a 2-process DDP run (gloo, CPU) against one process on the whole batch."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from core.models.backbones import create_backbone
from core.models.contrastive import (
    MoCoV3,
    concat_all_gather,
    cosine_momentum,
    info_nce,
    mlp,
)


def make_model(seed: int = 0, backbone: str = "convnet_small", **kwargs: object) -> MoCoV3:
    """A tiny MoCo v3, the same weights for the same seed in any process."""
    torch.manual_seed(seed)  # the heads draw from the global stream
    # a 2-block ViT keeps the ViT path (LayerNorm, no BatchNorm) but costs a tenth of the time
    options = {"width": 4} if backbone == "convnet_small" else {"depth": 2}
    return MoCoV3(create_backbone(backbone, seed=seed, **options), dim=16, mlp_dim=32, **kwargs)


def images(n: int, seed: int, px: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(seed))


def direct_info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float, offset: int = 0) -> float:
    """Softmax cross entropy written out in Python floats, times the 2T of MoCo v3's code."""
    q, k = q.double().tolist(), k.double().tolist()

    def unit(v: list[float]) -> list[float]:
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    q, k = [unit(v) for v in q], [unit(v) for v in k]
    total = 0.0
    for i, qi in enumerate(q):
        logits = [sum(a * b for a, b in zip(qi, kj, strict=True)) / temperature for kj in k]
        top = max(logits)
        logsumexp = top + math.log(sum(math.exp(x - top) for x in logits))
        total += logsumexp - logits[offset + i]
    return total / len(q) * 2 * temperature


def same(tensors: Iterable[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(tensors, expected, strict=True))


def test_mlp_follows_moco_v3_heads():
    projector = mlp(8, 32, 16, layers=3)
    kinds = [type(layer) for layer in projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    linears = [layer for layer in projector if isinstance(layer, nn.Linear)]
    assert [layer.out_features for layer in linears] == [32, 32, 16]
    assert all(layer.bias is None for layer in linears)
    assert projector[1].affine and not projector[-1].affine
    predictor = mlp(16, 32, 16, layers=2, last_bn=False)
    assert [type(layer) for layer in predictor] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert mlp(8, 32, 4, layers=1)(torch.randn(5, 8)).shape == (5, 4)
    with pytest.raises(ValueError, match="at least one layer"):
        mlp(8, 32, 4, layers=0)


def test_momentum_update_is_the_exact_moving_average():
    model = make_model()
    with torch.no_grad():  # move the base away from its copy so the average is not trivial
        for p in model.base_encoder.parameters():
            p.add_(torch.randn_like(p))
    base = [p.detach().clone() for p in model.base_encoder.parameters()]
    old = [p.detach().clone() for p in model.momentum_encoder.parameters()]

    model.update_momentum(0.9)
    for new, o, b in zip(model.momentum_encoder.parameters(), old, base, strict=True):
        # the average in float64, against the float32 update: within a few units of rounding
        expected = (0.9 * o.double() + 0.1 * b.double()).float()
        torch.testing.assert_close(new, expected, rtol=2e-7, atol=1e-7)
        assert not torch.equal(new, o)
    assert same(model.base_encoder.parameters(), base)

    before = [p.detach().clone() for p in model.momentum_encoder.parameters()]
    model.update_momentum(1.0)
    assert same(model.momentum_encoder.parameters(), before)
    model.update_momentum(0.0)
    assert same(model.momentum_encoder.parameters(), base)


def test_momentum_encoder_starts_as_a_frozen_copy_and_gets_no_gradient():
    model = make_model()
    base, momentum = model.base_encoder.state_dict(), model.momentum_encoder.state_dict()
    assert base.keys() == momentum.keys()
    assert all(torch.equal(base[key], momentum[key]) for key in base)
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    # the paper's heads: the projector ends in an affine-free BatchNorm, the predictor in a Linear
    assert isinstance(model.base_encoder.projector[-1], nn.BatchNorm1d)
    assert isinstance(model.predictor[-1], nn.Linear)

    model(images(6, 1), images(6, 2), m=0.99).backward()
    trained = [*model.base_encoder.named_parameters(), *model.predictor.named_parameters()]
    assert all(p.grad is not None for _, p in trained), [n for n, p in trained if p.grad is None]
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    # the momentum encoder is a separate copy: moving it leaves the base encoder alone
    model.update_momentum(0.5)
    assert model.backbone is model.base_encoder.backbone
    assert model.backbone is not model.momentum_encoder.backbone


@pytest.mark.parametrize("offset", [0, 3])
def test_info_nce_equals_a_direct_computation(offset):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(4, 5, generator=generator) * 3  # not unit length: info_nce normalises
    k = torch.randn(4 + offset, 5, generator=generator)
    for temperature in (0.2, 1.0):
        expected = direct_info_nce(q, k, temperature, offset)
        loss = info_nce(q, k, temperature, offset=offset)
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_stays_float32_under_bf16_autocast():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    exact = info_nce(q, k, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = info_nce(q, k, 0.2)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(exact.item(), rel=1e-6)


def test_contrastive_loss_on_one_process_is_info_nce():
    model = make_model(temperature=0.5)
    q, k = torch.randn(6, 16), torch.randn(6, 16, requires_grad=True)
    assert not dist.is_initialized()
    gathered = concat_all_gather(k)
    assert torch.equal(gathered, k) and not gathered.requires_grad  # keys never carry gradient
    assert torch.equal(model.contrastive_loss(q, k), info_nce(q, k, 0.5))


def test_cosine_momentum_rises_from_base_to_one():
    values = [cosine_momentum(step, 100, base=0.99) for step in range(101)]
    assert values[0] == pytest.approx(0.99, abs=1e-12)
    assert values[-1] == 1.0
    assert values[50] == pytest.approx(0.995, abs=1e-12)
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    with pytest.raises(ValueError):
        cosine_momentum(101, 100)
    with pytest.raises(ValueError):
        cosine_momentum(0, 0)


@pytest.mark.parametrize("backbone", ["convnet_small", "vit_tiny"])
def test_training_step_is_finite_and_reaches_the_backbone(backbone):
    model = make_model(backbone=backbone)
    x1, x2 = images(8, 1), images(8, 2)
    loss = model(x1, x2, m=0.99)
    # each of the two terms is 2T * cross entropy; at initialisation close to 2T * log(N)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert 0 < loss.item() < 2 * 2 * 0.2 * (math.log(8) + 1)
    loss.backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0

    features = model.embed(x1)
    assert features.shape == (8, model.backbone.num_features)
    assert torch.equal(features, model.backbone(x1))


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    model = make_model()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0
    )
    base = images(16, 0)
    x1, x2 = base + 0.3 * images(16, 1), base + 0.3 * images(16, 2)
    losses = []
    for step in range(15):
        loss = model(x1, x2, m=cosine_momentum(step, 15, base=0.9))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_rejects_a_backbone_without_num_features():
    with pytest.raises(ValueError, match="num_features"):
        MoCoV3(nn.Linear(3, 4))


# --- DDP: 2 gloo processes on CPU, each with half of the global batch ------------------------

WORLD = 2


def global_batches() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Two global batches of 8 view pairs.

    "eval": 8 different images; the model runs in eval mode, so BatchNorm uses its running
    statistics, the same in every process. "train": the second half is a permutation of the
    first, so each process's half has exactly the statistics of the whole batch, as a function
    of the weights too; per-process BatchNorm in training mode (what CPU runs get, since
    SyncBatchNorm refuses CPU tensors) then matches one process on the whole batch, gradients
    included. The permutation also keeps a wrong label offset or a missing gather visible.
    """
    eval_x1, eval_x2 = images(8, 10), images(8, 11)
    half1, half2 = images(4, 12), images(4, 13)
    perm = torch.tensor([2, 0, 3, 1])
    train_x1, train_x2 = torch.cat([half1, half1[perm]]), torch.cat([half2, half2[perm]])
    return {"eval": (eval_x1, eval_x2), "train": (train_x1, train_x2)}


def step(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    loss = model(x1, x2, m=0.9)
    loss.backward()
    return loss.detach()


def ddp_worker(rank: int, port: int, workdir: Path) -> None:
    """One process of the DDP run; writes its loss and (all-reduced) gradients to workdir."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        results = {}
        for scenario, (x1, x2) in torch.load(workdir / "batches.pt", weights_only=True).items():
            model = make_model().train(scenario == "train")
            share = slice(rank * len(x1) // WORLD, (rank + 1) * len(x1) // WORLD)
            loss = step(DistributedDataParallel(model), x1[share], x2[share])
            grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
            results[scenario] = {"loss": loss, "grads": grads}
        torch.save(results, workdir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ddp_on_two_processes_matches_one_process_on_the_whole_batch(tmp_path):
    batches = global_batches()
    torch.save(batches, tmp_path / "batches.pt")
    mp.spawn(ddp_worker, args=(free_port(), tmp_path), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    for scenario, (x1, x2) in batches.items():
        model = make_model().train(scenario == "train")
        loss = step(model, x1, x2)
        per_process = torch.stack([r[scenario]["loss"] for r in ranks])
        if scenario == "eval":  # different halves, different losses: the mean is not trivial
            assert (per_process[0] - per_process[1]).abs() > 1e-3
        assert per_process.mean().item() == pytest.approx(loss.item(), abs=1e-5)

        expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        for result in ranks:
            grads = result[scenario]["grads"]
            assert grads.keys() == expected.keys()
            for name, grad in grads.items():
                # relative to the tensor's largest entry: BatchNorm's backward sums in a different
                # order on half batches, a few 1e-7 of the scale (a missing average would be 2x)
                error = (grad - expected[name]).abs().max() / expected[name].abs().max()
                assert error < 1e-5, (scenario, name, error.item())
