"""UGE on several processes: two gloo ranks on CPU against one process.

UGE has no BatchNorm, so two ranks take the one-process step up to float rounding: the InfoNCE
over a batch gathered from the ranks is checked exactly against one process, and the whole
trainer (captioning pretraining, stage 1, stage 2) on the tiny model is compared with one
process on the same global batches, with LoRA dropout off (each rank draws its own masks).
What remains is rounding: a rank pads its half of a batch to its own longest prompt, and the
ranks' gradients are summed in another order.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from core.configs import UGEConfig
from core.dataroot import DataRoot
from core.distributed import Ranks, join_local_group
from core.models.uge import info_nce
from core.models.uge_run import PRETRAINING_MARKER
from core.runs import load_run
from tests.test_distributed import TORCHRUN, _free_port, _ranks_of, _visible
from train.cli import main
from train.uge import train_uge
from train.uge_bench import run_bench

#: The tiny schedule; a global batch of 7 shares out unevenly (4 + 3 rows).
SCHEDULE = {
    "tiny_pretrain_steps": 3,
    "stage1_steps": 4,
    "stage2_steps": 10,
    "stage2_questions": 20,
    "batch_size": 7,
    "lora_dropout": 0.0,
    "device": "cpu",
}
#: Two ranks vs one process, float rounding only (the largest gaps measured in two runs).
WEIGHT_ATOL = 2e-5  # pretrained backbone weights (moved by ~3e-3; measured gap up to 1.4e-6)
ADAPTER_ATOL = 1e-4  # LoRA weights (moved by ~1e-2; Adam amplifies rounding: up to 6.8e-6)
LOSS_RTOL = 1e-4  # every step's loss, both stages (measured: up to 1.5e-6)
EMBEDDING_ATOL = 1e-4  # the run's per-cell embeddings, unit vectors (measured: up to 3.7e-6)
BENCH_MOVED = 1  # UGBench query ranks (of 10 per task) that rounding may move past a near-tie


class _Pair(nn.Module):
    """Two embedders, as stage 1's image and text sides."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(z)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seven pairs; rows 0 and 1 (and 4 and 5) share a group, so are not each other's negatives."""
    x = torch.arange(21.0).reshape(7, 3).sin()
    z = torch.arange(14.0).reshape(7, 2).cos()
    return x, z, torch.tensor([0, 0, 1, 2, 3, 3, 4])


def _gathered_step(rank: int, world: int, port: int, out: str) -> None:
    """A rank of :func:`test_ranks_take_the_one_process_infonce_step`."""
    ranks = join_local_group(rank, world, port)
    torch.manual_seed(0)
    model = _Pair()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    x, z, groups = _batch()
    mine = ranks.shard(torch.arange(7))
    net = ranks.ddp(model)  # held: DDP reduces the gradients only while it lives
    a, b = net(x[mine], z[mine])
    a, b = ranks.gather_batch(a, 7), ranks.gather_batch(b, 7)
    loss = info_nce(a, b, 0.5, groups)
    (loss * ranks.world).backward()
    optimiser.step()
    np.savez(
        f"{out}-{rank}.npz",
        loss=loss.item(),
        a=a.detach().numpy(),
        b=b.detach().numpy(),
        **{name: p.detach().numpy() for name, p in model.named_parameters()},
    )
    torch.distributed.destroy_process_group()


def test_ranks_take_the_one_process_infonce_step(tmp_path):
    out = str(tmp_path / "step")
    torch.multiprocessing.start_processes(
        _gathered_step, args=(2, _free_port(), out), nprocs=2, start_method="spawn"
    )
    # one process: the InfoNCE of the whole batch, one SGD step
    torch.manual_seed(0)
    model = _Pair()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    x, z, groups = _batch()
    a, b = model(x, z)
    loss = info_nce(a, b, 0.5, groups)
    loss.backward()
    optimiser.step()
    for rank in (0, 1):
        got = np.load(f"{out}-{rank}.npz")
        # every rank holds the whole batch in order and computes the one-process loss
        np.testing.assert_allclose(got["a"], a.detach().numpy(), rtol=0, atol=1e-7)
        np.testing.assert_allclose(got["b"], b.detach().numpy(), rtol=0, atol=1e-7)
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-6)
        for name, param in model.named_parameters():
            np.testing.assert_allclose(got[name], param.detach().numpy(), rtol=0, atol=1e-6)
    # the step moved the weights (an update lost on the way would still fail the comparison)
    torch.manual_seed(0)
    assert not torch.allclose(_Pair().a.weight, model.a.weight, atol=1e-3)


def test_the_gathered_batch_is_the_shard_itself_in_one_process():
    ranks = Ranks("cpu")
    mine = torch.randn(5, 3, requires_grad=True)
    assert ranks.gather_batch(mine, 5) is mine
    rows = ranks.map_rows(5, lambda r: (r * 10).numpy())
    np.testing.assert_array_equal(rows, np.arange(5) * 10)


def _torchrun(root: Path, **changes: object) -> list[str]:
    """``python -m train uge`` on ``root`` under torchrun with two ranks, the tiny schedule."""
    args = [*TORCHRUN, "--nproc-per-node=2", "-m", "train", "uge", "--data", str(root)]
    for key, value in (SCHEDULE | changes).items():
        args += [f"--{key}", str(value)]
    return args


def _run_id(stdout: str) -> str:
    return re.search(r"uge: run (uge-\S+)", stdout).group(1)


@pytest.fixture(scope="module")
def runs(tiny_demo, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """One UGData in two data roots; one trained in this process, one on two gloo ranks."""
    base = tmp_path_factory.mktemp("distributed-uge")
    one, two = base / "one", base / "two"
    shutil.copytree(tiny_demo, one, ignore=shutil.ignore_patterns("runs", "cache"))
    assert (
        main(["ugdata", "--data", str(one), "--max-images", "100", "--holdout-district", "Oost"])
        == 0
    )
    shutil.copytree(one, two)
    done = subprocess.run(
        _torchrun(two),
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("uge: run") == 1  # rank 0 speaks for the run
    run_one = train_uge(UGEConfig(data=str(one), **SCHEDULE), log=lambda _: None)
    return {"one": (one, run_one), "two": (two, _run_id(done.stdout))}


def _backbone(root: Path) -> Path:
    (folder,) = [
        p for p in (DataRoot(root).cache / "vlm").iterdir() if (p / PRETRAINING_MARKER).is_file()
    ]
    return folder


@pytest.mark.slow  # whole torchrun runs: `pytest -m slow`
def test_two_gloo_ranks_pretrain_the_tiny_vlm_like_one_process(runs):
    one, two = _backbone(runs["one"][0]), _backbone(runs["two"][0])
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    base = load_file(one.parent / "tiny-qwen2vl" / "model.safetensors")
    moved = max(float((a[k] - base[k]).abs().max()) for k in a)
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"pretraining: weights moved {moved:.3g}, two ranks vs one {gap:.3g}")
    assert moved > 1e-3 and gap < WEIGHT_ATOL
    marks = [json.loads((f / PRETRAINING_MARKER).read_text()) for f in (one, two)]
    assert [m["processes"] for m in marks] == [1, 2]
    assert marks[1]["final_loss"] == pytest.approx(marks[0]["final_loss"], rel=LOSS_RTOL)


@pytest.mark.slow  # whole torchrun runs: `pytest -m slow`
def test_two_gloo_ranks_train_both_stages_like_one_process(runs):
    one = load_run(DataRoot(runs["one"][0]).runs / runs["one"][1])
    two = load_run(DataRoot(runs["two"][0]).runs / runs["two"][1])
    assert (one.config["processes"], two.config["processes"]) == (1, 2)
    assert len(two.epochs) == SCHEDULE["stage1_steps"] + SCHEDULE["stage2_steps"]
    for column in ("stage", "step", "pair_type"):
        assert two.epochs[column].tolist() == one.epochs[column].tolist()
    relative = (two.epochs["loss"] / one.epochs["loss"] - 1).abs()
    print("loss, largest relative gap per stage:", relative.groupby(one.epochs["stage"]).max())
    np.testing.assert_allclose(two.epochs["loss"], one.epochs["loss"], rtol=LOSS_RTOL)
    (ids_one, matrix_one), (ids_two, matrix_two) = one.embeddings(), two.embeddings()
    np.testing.assert_array_equal(ids_two, ids_one)
    print("embeddings: largest gap", np.abs(matrix_two - matrix_one).max())
    np.testing.assert_allclose(matrix_two, matrix_one, rtol=0, atol=EMBEDDING_ATOL)
    # the whole set once, not per rank: every cell of both splits, in the same order
    a, b = one.predictions(), two.predictions()
    assert a[["cell_id", "split"]].equals(b[["cell_id", "split"]])
    assert one.metrics["stage2_final_loss"] == pytest.approx(
        two.metrics["stage2_final_loss"], rel=LOSS_RTOL
    )
    assert "x 2 process(es)" in (two.path / "log.txt").read_text()
    assert (two.path / "adapters" / "adapter_model.safetensors").is_file()
    adapters = [load_file(r.path / "adapters" / "adapter_model.safetensors") for r in (one, two)]
    moved = max(float(v.abs().max()) for k, v in adapters[0].items() if "lora_B" in k)
    gap = max(float((adapters[0][k] - adapters[1][k]).abs().max()) for k in adapters[0])
    print(f"adapters: lora_B moved from zero by {moved:.3g}, two ranks vs one {gap:.3g}")
    assert moved > 1e-3 and gap < ADAPTER_ATOL


@pytest.mark.slow  # whole torchrun runs: `pytest -m slow`
def test_ugbench_scores_the_two_rank_run_like_the_one_process_run(runs):
    one, two = (
        run_bench(DataRoot(root), run_id, candidates=4, max_queries=10)
        for root, run_id in runs.values()
    )
    keys = ["stage", "split", "task", "query"]
    ranks = one.query_ranks.merge(two.query_ranks, on=keys, suffixes=("_one", "_two"))
    assert len(ranks) == len(one.query_ranks) == len(two.query_ranks)
    assert set(ranks["task"]) == {"geolocation", "retrieval", "grounding"}
    moved = int((ranks["rank_one"] != ranks["rank_two"]).sum())
    print(f"ugbench: {moved} of {len(ranks)} query ranks differ")
    assert moved <= BENCH_MOVED
    summaries = [
        r.summary.sort_values(["stage", "split"]).reset_index(drop=True) for r in (one, two)
    ]
    numbers = [c for c in summaries[0].columns if c.endswith(("_mrr", "hit@1"))]
    np.testing.assert_allclose(
        summaries[1][numbers], summaries[0][numbers], rtol=0, atol=BENCH_MOVED / 10
    )


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill(process: psutil.Process) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        process.kill()


def test_a_killed_rank_fails_the_uge_run_cleanly(runs):
    root = runs["two"][0]  # its tiny backbone is pretrained already
    before = _visible(DataRoot(root).runs)
    log = root.parent / "killed.log"
    with log.open("w") as out:
        torchrun = subprocess.Popen(
            _torchrun(root, stage1_steps=200),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        ranks = _ranks_of(psutil.Process(torchrun.pid))
        deadline = time.monotonic() + 120
        while "uge stage 1 step" not in log.read_text():  # stage 1 under way, the run open
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            assert torchrun.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGKILL)
        code = torchrun.wait(120)
    finally:
        for child in ranks.values() if "ranks" in locals() else ():
            _kill(child)
        torchrun.kill()
    assert code != 0
    assert not _alive(ranks[0])  # torchrun stopped the other rank too
    assert _visible(DataRoot(root).runs) == before  # no half-written run folder is visible
    assert not re.search(r"uge: run uge-", log.read_text())  # no run was reported
