"""Contrastive pretraining (MoCo v3, UrbanSTCL) on several processes: gloo ranks on CPU.

The step itself (shared pair samples and view decisions, each rank's slice, keys gathered from
all ranks, DDP's average of the gradients, the momentum update) is checked exactly against an
independent one-process computation with BatchNorm on fixed statistics. Whole runs under
``torchrun`` are checked against one process within a tolerance, because on CPU each rank's
BatchNorm normalises over its own half of the batch (PyTorch synchronises BatchNorm on GPUs
only); resume after a killed rank, and a worker job on two ranks, run for real.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from safetensors.numpy import load_file

from core.configs import ContrastiveConfig
from core.dataroot import DataRoot
from core.distributed import join_local_group
from core.jobs import JobStore
from core.models.backbones import create_backbone
from core.models.contrastive import MoCoV3
from core.pairs import spatial_pairs
from core.runs import BACKBONE_FILE, CHECKPOINT_FILE, PROGRESS_FILE, list_runs, load_run
from tests.test_distributed import TORCHRUN, _free_port, _ranks_of, _visible
from train.contrastive import Objectives, PairSampler, augment, step_losses, train_contrastive
from train.worker import Worker

#: The same global batch of 64 pairs in one and in two processes (32 per rank).
TINY = ["--batch_size", "64", "--dim", "16", "--mlp_dim", "32", "--device", "cpu"]
#: Long enough epochs (20 steps, a few seconds) to kill a rank between two of them.
SCHEDULE = ["--epochs", "3", "--steps_per_epoch", "20"]
#: Per-epoch loss of two CPU ranks vs one process. Everything but BatchNorm is the same
#: computation (the exact test below checks it); BatchNorm over 32 instead of 64 images per view
#: changes the normalised features and so the logits: measured 0.1-0.7% (temporal) and
#: 0.1-1.4% (global) over epochs 1-3 of these runs; 5% leaves room for other machines. A rank
#: that drew pairs of its own, contrasted only its own keys or missed the average would be off
#: by far more: at chance level the loss is 4T ln(keys), so 32 keys instead of 64 give 83% of it.
LOSS_RTOL = 0.05

# --- the step, exactly: 2 spawned ranks against an independent one-process computation -------

#: The objectives whose steps are checked, each on a global batch of 8 pairs: temporal (a pair
#: table of its own) with global (no table), spatial alone (the pairs of :func:`spatial_pairs`
#: on the images' positions) and all three rules at once.
STEPS_OF = {
    "temporal+global": ContrastiveConfig(
        objective="unified", loss_weights={"temporal": 0.5, "spatial": 0.0, "global": 1.0}
    ),
    "spatial": ContrastiveConfig(objective="spatial"),
    "unified": ContrastiveConfig(
        objective="unified", loss_weights={"temporal": 0.5, "spatial": 0.3, "global": 1.0}
    ),
}
STEP = {"batch_size": 8, "dim": 16, "mlp_dim": 32}
STEPS, MOMENTUM, LR = 3, 0.9, 0.05


def _step_config(name: str) -> ContrastiveConfig:
    return replace(STEPS_OF[name], **STEP)


def _step_inputs(config: ContrastiveConfig) -> tuple[np.ndarray, dict[str, PairSampler], MoCoV3]:
    """Images, pair samplers for ``config``'s rules and a model, the same in every process.

    The model is in eval mode: BatchNorm then normalises with its (fixed) running statistics,
    as if there were none, so one process and two ranks must agree to float rounding.
    """
    pixels = np.random.default_rng(0).integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
    # 20 images 40 m apart on a 5 x 4 grid: each has 2-6 spatial partners within 100 m
    places = pd.DataFrame({"x": 40.0 * (np.arange(20) % 5), "y": 40.0 * (np.arange(20) // 5)})
    tables = {
        "temporal": pd.DataFrame({"a": np.arange(0, 18, 2), "b": np.arange(1, 19, 2)}),
        "spatial": spatial_pairs(places, config.pairs),
        "global": None,
    }
    assert len(tables["spatial"]) > STEP["batch_size"]
    samplers = {rule: PairSampler(rule, tables[rule], len(pixels)) for rule in config.rules}
    torch.manual_seed(0)  # the heads draw from the global stream
    model = MoCoV3(create_backbone("convnet_small", seed=0, width=4), config.dim, config.mlp_dim)
    return pixels, samplers, model.eval()


def _parameters(model: MoCoV3) -> dict[str, np.ndarray]:
    return {name: p.detach().numpy().copy() for name, p in model.named_parameters()}


def _rank_steps(rank: int, world: int, port: int, out: str, data: str) -> None:
    """A rank of :func:`test_two_ranks_take_the_one_process_steps_exactly`: the steps of every
    objective of :data:`STEPS_OF`, one after the other in one group (a spawn costs seconds)."""
    torch.set_num_threads(1)
    ranks = join_local_group(rank, world, port)
    # 8 pairs do not split over 3 ranks, but a run with a batch that does not split over the
    # ranks is refused before it reads anything
    with pytest.raises(ValueError, match="does not split evenly over 2 processes"):
        train_contrastive(ContrastiveConfig(data=data, batch_size=7, device="cpu"))
    for name in STEPS_OF:
        config = _step_config(name)
        pixels, samplers, model = _step_inputs(config)
        net = ranks.ddp(Objectives(model))
        optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
        generator = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(STEPS):
            per_rule = step_losses(net, samplers, pixels, generator, config, MOMENTUM, ranks)
            loss = sum(w * x for w, x in zip(config.rules.values(), per_rule, strict=True))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append([ranks.sum(float(x.detach())) / ranks.world for x in per_rule])
        np.savez(
            f"{out}-{name}-{rank}.npz",
            losses=np.array(losses),
            generator=generator.get_state().numpy(),
            **_parameters(model),
        )
    torch.distributed.destroy_process_group()


def _one_process_steps(
    config: ContrastiveConfig,
) -> tuple[list[list[float]], torch.Generator, MoCoV3]:
    """The steps of ``config`` in one process, independently of the ranks' code: the whole
    batch through MoCoV3 itself. Its per-rule losses, generator and model."""
    pixels, samplers, model = _step_inputs(config)
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        per_rule = []
        for i, rule in enumerate(config.rules):
            first, second = samplers[rule].sample(config.batch_size, generator)
            views = [
                augment(torch.from_numpy(pixels[rows.numpy()]), generator, config.crop_min_scale)
                for rows in (first, second)
            ]
            per_rule.append(model(*views, MOMENTUM if i == 0 else 1.0))
        loss = sum(w * x for w, x in zip(config.rules.values(), per_rule, strict=True))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append([float(x.detach()) for x in per_rule])
    return losses, generator, model


def test_two_ranks_take_the_one_process_steps_exactly(tmp_path):
    out = str(tmp_path / "rank")
    torch.multiprocessing.start_processes(
        _rank_steps,
        args=(2, _free_port(), out, str(tmp_path / "no-data")),
        nprocs=2,
        start_method="spawn",
    )
    for name in STEPS_OF:
        got = [np.load(f"{out}-{name}-{rank}.npz") for rank in (0, 1)]
        config = _step_config(name)
        expected, generator, model = _one_process_steps(config)
        assert got[0]["losses"].shape == (STEPS, len(config.rules)), name
        # the loss over the global batch: each rank's queries met the keys of both ranks
        np.testing.assert_allclose(got[0]["losses"], expected, rtol=1e-5, err_msg=name)
        # every rank drew the same pairs and view decisions: the generators stayed equal
        assert np.array_equal(got[0]["generator"], generator.get_state().numpy()), name
        assert np.array_equal(got[1]["generator"], got[0]["generator"]), name
        for key, value in _parameters(model).items():
            # base encoder and predictor: DDP's average made the global batch's SGD step; the
            # momentum encoder followed them identically on both ranks
            where = f"{name}: {key}"
            np.testing.assert_allclose(got[0][key], value, rtol=1e-4, atol=1e-6, err_msg=where)
            assert np.array_equal(got[1][key], got[0][key]), where
        moved = [n for n in got[0].files if n.startswith("momentum_encoder.")]
        initial = _step_inputs(config)[2].state_dict()
        changed = [n for n in moved if not np.array_equal(got[0][n], initial[n])]
        assert changed, f"{name}: the momentum encoder did not move"


# --- whole runs under torchrun -------------------------------------------------------------


@pytest.fixture(scope="module")
def city(tiny_demo, tmp_path_factory) -> Path:
    """A copy of the tiny city whose runs are this module's."""
    root = tmp_path_factory.mktemp("distributed-contrastive") / "city"
    shutil.copytree(tiny_demo, root, ignore=shutil.ignore_patterns("runs"))
    return root


def _command(root: Path, processes: int, *options: str) -> list[str]:
    launcher = [*TORCHRUN, f"--nproc-per-node={processes}"] if processes > 1 else [sys.executable]
    return [*launcher, "-m", "train", "contrastive", "--data", str(root), *TINY, *options]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(root: Path, processes: int, *options: str) -> str:
    """Run ``stadsbeeld contrastive`` on ``processes`` ranks; the id of the run it wrote."""
    done = subprocess.run(
        _command(root, processes, *options),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ground weights") == 1  # rank 0 speaks, once
    return re.search(r"contrastive run (contrastive-\S+):", done.stdout).group(1)


#: The runs each test compares: options and an uninterrupted run on 1 and on 2 processes.
RUNS = {
    "temporal": [*SCHEDULE, "--objective", "temporal", "--seed", "3"],
    "global": ["--epochs", "3", "--steps_per_epoch", "6", "--objective", "global", "--seed", "3"],
}


@pytest.fixture(scope="module")
def trained(city) -> Callable[[str, int], str]:
    """``{(objective, processes): run id}``, trained once when first asked for."""
    cache: dict[tuple[str, int], str] = {}

    def run(objective: str, processes: int) -> str:
        if (objective, processes) not in cache:
            cache[objective, processes] = _train(city, processes, *RUNS[objective])
        return cache[objective, processes]

    return run


def _weights(root: Path, run_id: str) -> dict[str, np.ndarray]:
    return load_file(DataRoot(root).runs / run_id / BACKBONE_FILE)


@pytest.mark.slow  # whole torchrun runs: `pytest -m slow`
@pytest.mark.parametrize("objective", ["temporal", "global"])
def test_two_gloo_ranks_pretrain_like_one_process(city, trained, objective):
    runs = DataRoot(city).runs
    one, two = (load_run(runs / trained(objective, n)) for n in (1, 2))
    assert (one.config["processes"], two.config["processes"]) == (1, 2)
    assert {**one.config, "processes": 2} == two.config  # the same run otherwise
    column = f"loss_{objective}"
    np.testing.assert_allclose(two.epochs[column], one.epochs[column], rtol=LOSS_RTOL)
    assert "x 2 process(es)" in (two.path / "log.txt").read_text()
    # the embeddings cover every image once, gathered from both ranks, in the cells' order
    ids_one, one_matrix = one.embeddings()
    ids_two, two_matrix = two.embeddings()
    np.testing.assert_array_equal(ids_two, ids_one)
    assert np.isfinite(two_matrix).all()
    np.testing.assert_array_equal(two.predictions()["images"], one.predictions()["images"])
    similarity = (one_matrix * two_matrix).sum(1) / (
        np.linalg.norm(one_matrix, axis=1) * np.linalg.norm(two_matrix, axis=1)
    )
    assert np.median(similarity) > 0.9  # the same encoder up to BatchNorm's halves
    assert not (two.path / CHECKPOINT_FILE).exists()


def _interrupted(runs: Path, prefixes: tuple[str, ...] = (".tmp-",)) -> Path:
    """The one contrastive run folder of ``runs`` being written (or failed)."""
    (folder,) = (
        p for p in runs.iterdir() if p.name.startswith(prefixes) and "contrastive" in p.name
    )
    return folder


def _epoch_reported(folder: Path) -> int:
    try:
        return int(pd.read_json(folder / PROGRESS_FILE, typ="series").get("epoch", 0))
    except (FileNotFoundError, ValueError):  # not written yet, or replaced while read
        return 0


@pytest.mark.slow  # whole torchrun runs: `pytest -m slow`
def test_a_killed_rank_leaves_a_run_that_two_ranks_resume(city, trained, tmp_path):
    root = tmp_path / "city"  # a root of its own: the test looks for its one interrupted run
    shutil.copytree(city, root, ignore=shutil.ignore_patterns("runs"), symlinks=True)
    runs = DataRoot(root).runs
    launcher = subprocess.Popen(
        _command(root, 2, *RUNS["temporal"]),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ranks = _ranks_of(psutil.Process(launcher.pid))
        deadline = time.monotonic() + 300
        while not runs.is_dir() or not any(runs.glob(".tmp-contrastive-*")):
            assert time.monotonic() < deadline, "no run folder appeared"
            time.sleep(0.1)
        folder = _interrupted(runs)
        while _epoch_reported(folder) < 1:  # rank 0 reports an epoch after its checkpoint
            assert time.monotonic() < deadline, "no epoch was reported"
            time.sleep(0.1)
        ranks[1].send_signal(signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                child.kill()
            launcher.kill()
    assert launcher.returncode != 0, "torchrun succeeded with a killed rank"
    assert _visible(runs) == set()  # no half-written run is visible
    # rank 0 failed in a collective (its run folder became .failed-) or torchrun stopped it
    # (.tmp-): either way the run is resumable from its last checkpoint
    folder = _interrupted(runs, (".tmp-", ".failed-"))
    assert (folder / CHECKPOINT_FILE).is_file()
    run_id = folder.name.split("-", 1)[1]

    resumed = _train(root, 2, "--resume", run_id)
    assert resumed == run_id
    run = load_run(runs / run_id)
    assert run.epochs["epoch"].tolist() == [1, 2, 3]
    assert run.config["processes"] == 2
    assert "after epoch" in (run.path / "log.txt").read_text()
    # the same run as the uninterrupted one: weights, optimiser, schedule and the shuffling
    # generator were restored identically on both ranks
    straight = trained("temporal", 2)
    np.testing.assert_allclose(
        run.epochs["loss_temporal"],
        load_run(DataRoot(city).runs / straight).epochs["loss_temporal"],
        rtol=1e-4,
    )
    expected = _weights(city, straight)
    got = _weights(root, run_id)
    assert got.keys() == expected.keys()
    for key in got:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_a_worker_runs_a_contrastive_job_on_two_ranks(city):
    runs = DataRoot(city).runs
    store = JobStore.for_runs(runs)
    config = {"objective": "global", "epochs": 2, "steps_per_epoch": 2, "batch_size": 16}
    job_id = store.enqueue("contrastive", config | {"dim": 16, "mlp_dim": 32, "device": "cpu"})
    Worker(city, processes=2, say=lambda _: None).loop(once=True)
    job = store.get(job_id)
    assert job.status == "done", job.error
    run = load_run(runs / job.run_id)
    assert run.config["processes"] == 2 and run.epochs["epoch"].tolist() == [1, 2]
    assert job.progress["epoch"] == 2
    assert "x 2 process(es)" in (run.path / "log.txt").read_text()
    assert store.log_path(job_id).read_text().count("epoch 1/2") == 1  # rank 0 speaks, once
    assert job.run_id in set(list_runs(runs)["run_id"])
    ids, matrix = run.embeddings()
    assert len(ids) == len(run.predictions()) and np.isfinite(matrix).all()
