"""Training on several processes: gloo ranks on CPU against one process.

The plumbing (:mod:`core.distributed`) is checked exactly against an independent one-process
computation; a whole trainer under ``torchrun`` is checked against one process within a
tolerance, because on CPU each rank normalises its BatchNorm layers over its own half of the
batch (PyTorch synchronises BatchNorm on GPUs only).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import streamlit as st
import torch
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest
from torch import nn

from core.configs import FusionConfig, PredictConfig
from core.dataroot import DataRoot
from core.distributed import Ranks, join_local_group
from core.jobs import LOCK_FILE, WORKER_LOG, JobStore, worker_alive
from core.models.backbones import create_backbone, save_backbone
from core.runs import EPOCHS_FILE, list_runs, load_run
from tests.test_dashboard import APP
from train.fusion import train_fusion
from train.predict import predict
from train.worker import Worker

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
#: The same global batch in one and in two processes; three splits on the tiny city.
FUSION = ["--ground", "gsv", "--epochs", "3", "--batch_size", "64", "--block_size", "300"]
#: Per-epoch training loss of two CPU ranks vs one process: BatchNorm over 32 instead of 64.
LOSS_RTOL = 0.15
#: The final run's test Kendall tau, two CPU ranks vs one process. The tiny city's test split
#: is 24 cells (276 pairs), so one pair ranked the other way moves tau by 0.007; measured 0.029
#: apart (0.174 and 0.145, four pairs), with the same best epoch. 0.1 is 14 pairs.
TEST_TAU_ATOL = 0.1
#: The final run's test mean absolute error, relative: measured 0.2% apart.
TEST_MAE_RTOL = 0.05


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_step(rank: int, world: int, port: int, out: str) -> None:
    """A rank of :func:`test_ranks_take_the_one_process_step`: one SGD step on 7 rows."""
    ranks = join_local_group(rank, world, port)
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.arange(21.0).reshape(7, 3) / 10, torch.linspace(-1, 1, 7)
    rows = torch.arange(7)
    mine = ranks.shard(rows)
    net = ranks.ddp(model)
    loss = world / len(rows) * ((net(x[mine]).squeeze(1) - y[mine]) ** 2).sum()
    loss.backward()
    optimiser.step()
    gathered = ranks.gather_rows(mine, (x[mine] * 2).numpy(), len(rows))
    total = ranks.sum(rank + 1.0)
    if ranks.is_main:
        np.savez(
            out,
            weight=model.weight.detach().numpy(),
            bias=model.bias.detach().numpy(),
            gathered=gathered,
            total=total,
            world=ranks.world,
        )
    torch.distributed.destroy_process_group()


def test_ranks_take_the_one_process_step(tmp_path):
    out = tmp_path / "step.npz"
    torch.multiprocessing.start_processes(
        _one_step, args=(2, _free_port(), str(out)), nprocs=2, start_method="spawn"
    )
    got = np.load(out)
    assert got["world"] == 2
    # one process, by hand: mean squared error over all 7 rows, one SGD step
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.arange(21.0).reshape(7, 3) / 10, torch.linspace(-1, 1, 7)
    residual = (x @ model.weight.detach().T).squeeze(1) + model.bias.detach() - y
    grad_w = 2 * (residual[:, None] * x).mean(0)
    grad_b = 2 * residual.mean()
    np.testing.assert_allclose(got["weight"][0], model.weight.detach()[0] - 0.1 * grad_w, atol=1e-6)
    np.testing.assert_allclose(got["bias"], model.bias.detach() - 0.1 * grad_b, atol=1e-6)
    np.testing.assert_array_equal(got["gathered"], (x * 2).numpy())  # rows back in order
    assert got["total"] == 3.0


def test_one_process_is_world_one():
    ranks = Ranks("cpu")
    rows = torch.arange(5)
    assert (ranks.rank, ranks.world, ranks.is_main) == (0, 1, True)
    assert torch.equal(ranks.shard(rows), rows)
    model = nn.Linear(2, 1)
    assert ranks.ddp(model) is model


@pytest.fixture(scope="module")
def city(tiny_demo, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the tiny city (its runs are this module's) and ground weights for it."""
    root = tmp_path_factory.mktemp("distributed") / "city"
    shutil.copytree(tiny_demo, root, ignore=shutil.ignore_patterns("runs"))
    weights = root.parent / "ground.safetensors"
    save_backbone(create_backbone("convnet_small", seed=3), weights)
    return root, weights


def _train(command: list[str], root: Path, weights: Path) -> str:
    """Run a fusion training command on ``root``; the id of the run it wrote."""
    args = [*command, "-m", "train", "fusion", "--data", str(root), *FUSION]
    args += ["--ground_weights", str(weights)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return re.search(r"run (fusion-\S+),", done.stdout).group(1)


def test_two_gloo_ranks_train_fusion_like_one_process(city):
    root, weights = city
    one = load_run(DataRoot(root).runs / _train([sys.executable], root, weights))
    two = load_run(DataRoot(root).runs / _train([*TORCHRUN, "--nproc-per-node=2"], root, weights))
    assert (one.config["processes"], two.config["processes"]) == (1, 2)
    np.testing.assert_allclose(two.epochs["train_loss"], one.epochs["train_loss"], rtol=LOSS_RTOL)
    # the whole split is evaluated once, not per rank: every cell predicted, in the same order
    a, b = one.predictions(), two.predictions()
    np.testing.assert_array_equal(a["cell_id"], b["cell_id"])
    assert b["predicted"].notna().all()
    assert np.corrcoef(a["predicted"], b["predicted"])[0, 1] > 0.9
    assert len(two.metrics["test_per_district"]) == len(one.metrics["test_per_district"])
    # the final metrics, on the same test cells, of the model chosen at the best epoch
    assert two.metrics["test_n"] == one.metrics["test_n"]
    tau = one.metrics["test_kendall_tau"]
    assert two.metrics["test_kendall_tau"] == pytest.approx(tau, abs=TEST_TAU_ATOL)
    mae = one.metrics["test_mae"]
    assert two.metrics["test_mae"] == pytest.approx(mae, rel=TEST_MAE_RTOL)
    assert (DataRoot(root).runs / two.run_id / EPOCHS_FILE).is_file()


def _ranks_of(parent: psutil.Process, timeout: float = 120.0) -> dict[int, psutil.Process]:
    """The training ranks below ``parent`` (by their ``RANK``), once both are running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for child in parent.children(recursive=True):
            try:
                rank = child.environ().get("RANK")
                if rank is not None and "train" in child.cmdline():
                    found[int(rank)] = child
            except psutil.Error:
                continue
        if len(found) == 2:
            return found
        time.sleep(0.2)
    raise AssertionError("the two ranks did not start")


def _visible(runs: Path) -> set[str]:
    return (
        {p.name for p in runs.iterdir() if not p.name.startswith(".")} if runs.is_dir() else set()
    )


def kill_rank_one(
    parent: psutil.Process,
    trained: Callable[[], bool],
    ended: Callable[[float], object],
    timeout: float = 120.0,
) -> None:
    """SIGKILL rank 1 of the two training ranks below ``parent`` mid-training.

    Waits for both ranks, then until ``trained()`` says an epoch is done, kills rank 1 and
    waits ``ended(timeout)`` for the launcher (torchrun, or the worker running it) to give up.
    Every rank is gone by then: torchrun stopped rank 0 too. Whatever is still running below
    ``parent`` when the helper leaves, by failure or not, is killed.
    """
    try:
        ranks = _ranks_of(parent)
        deadline = time.monotonic() + timeout
        while not trained():
            assert time.monotonic() < deadline, "no epoch was trained"
            assert all(rank.is_running() for rank in ranks.values()), "a rank ended early"
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGKILL)
        ended(timeout)
        _, alive = psutil.wait_procs(list(ranks.values()), timeout=10)
        assert not alive, f"ranks left running: {alive}"
    finally:
        with contextlib.suppress(psutil.Error):  # a launcher that ended has no children
            for child in parent.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()


def test_a_killed_rank_fails_the_worker_job_cleanly(city):
    root, weights = city
    runs = DataRoot(root).runs
    store = JobStore.for_runs(runs)
    config = {"ground": "gsv", "ground_weights": str(weights), "epochs": 200}
    config |= {"batch_size": 64, "block_size": 300.0}
    job_id = store.enqueue("fusion", config)
    before = _visible(runs)
    worker = Worker(root, processes=2, say=lambda _: None)
    thread = threading.Thread(target=worker.loop, kwargs={"once": True})
    thread.start()
    # rank 0 reports epochs to the store
    kill_rank_one(
        psutil.Process(), lambda: store.get(job_id).progress.get("epoch", 0) >= 1, thread.join
    )
    assert not thread.is_alive()
    job = store.get(job_id)
    assert job.status == "failed"
    assert "torchrun exited" in job.error
    assert _visible(runs) == before  # no half-written run folder is visible
    listed = list_runs(runs)
    assert listed.empty or job.run_id not in set(listed["run_id"])


def test_a_worker_runs_a_job_on_two_ranks(city):
    root, weights = city
    runs = DataRoot(root).runs
    store = JobStore.for_runs(runs)
    config = {"ground": "gsv", "ground_weights": str(weights), "epochs": 2}
    job_id = store.enqueue("fusion", config | {"batch_size": 64, "block_size": 300.0})
    Worker(root, processes=2, say=lambda _: None).loop(once=True)
    job = store.get(job_id)
    assert job.status == "done", job.error
    run = load_run(runs / job.run_id)
    assert run.config["processes"] == 2 and len(run.epochs) == 2
    assert job.progress["epoch"] == 2
    assert "x 2 process(es)" in (run.path / "log.txt").read_text()
    assert store.log_path(job_id).read_text().count("epoch 1/2") == 1  # rank 0 speaks, once
    assert run.predictions()["predicted"].notna().all()


def test_a_worker_predicts_on_two_ranks_into_one_folder(city):
    """A predict job on a two-process worker: the ranks share the cells, rank 0 writes the
    one prediction folder, and it equals the prediction of one process."""
    root, weights = city
    runs = DataRoot(root).runs
    fusion = FusionConfig(data=str(root), ground="gsv", ground_weights=str(weights), epochs=1)
    member = train_fusion(replace(fusion, batch_size=64, block_size=300.0), log=lambda _: None)
    request = {"run": [member], "window_years": 100, "device": "cpu"}
    one = load_run(runs / predict(PredictConfig(data=str(root), **request), log=lambda _: None))
    before = set(list_runs(runs, "prediction")["run_id"])
    store = JobStore.for_runs(runs)
    job_id = store.enqueue("predict", request)
    Worker(root, processes=2, say=lambda _: None).loop(once=True)
    job = store.get(job_id)
    assert job.status == "done", job.error
    assert set(list_runs(runs, "prediction")["run_id"]) - before == {job.run_id}
    assert not [p for p in runs.iterdir() if "prediction" in p.name and p.name.startswith(".")]
    two = load_run(runs / job.run_id)
    assert two.config["processes"] == 2
    assert store.log_path(job_id).read_text().count("predicting ") == 1  # rank 0 speaks, once
    a, b = one.predictions(), two.predictions()
    np.testing.assert_array_equal(b["cell_id"], a["cell_id"])
    np.testing.assert_array_equal(b["gsv_images"], a["gsv_images"])
    np.testing.assert_allclose(b["predicted"], a["predicted"], rtol=1e-5, atol=1e-6)
    assert two.metrics["cells"] == one.metrics["cells"] == len(b)


def test_worker_processes_in_dashboard_yaml_reach_the_worker(tiny_demo, tmp_path, monkeypatch):
    """The retrain form starts the worker with ``worker_processes`` from ``dashboard.yaml``."""
    root = tmp_path / "city"
    shutil.copytree(tiny_demo, root, ignore=shutil.ignore_patterns("runs", "cache"))
    (root / "dashboard.yaml").write_text(
        "retraining: true\nstart_worker: true\nworker_processes: 2\n"
    )
    for env in ("STADSBEELD_RETRAIN", "STADSBEELD_START_WORKER", "STADSBEELD_RETRAIN_SECRET"):
        monkeypatch.delenv(env, raising=False)  # the file decides
    monkeypatch.setenv("STADSBEELD_DATA", str(root))
    st.cache_data.clear()
    st.cache_resource.clear()
    address = st_config.get_option("server.address")
    st_config.set_option("server.address", "127.0.0.1")  # anyone may train on loopback
    store = JobStore.for_runs(DataRoot(root).runs)
    try:
        app = AppTest.from_file(APP, default_timeout=120).run()
        app.selectbox(key="retrain_kind").set_value("contrastive").run()
        app.button(key="retrain_contrastive_submit").click().run()
        assert not app.exception
    finally:
        st_config.set_option("server.address", address)
    (job,) = store.jobs()
    store.cancel(job.id)  # what the worker runs is not the point: how many processes it would
    log, lock = store.log_dir / WORKER_LOG, store.log_dir / LOCK_FILE
    deadline = time.monotonic() + 60
    while "waiting for jobs" not in (log.read_text() if log.is_file() else ""):
        assert time.monotonic() < deadline, "the dashboard started no worker"
        time.sleep(0.2)
    assert "2 process(es) per job" in log.read_text()
    worker = psutil.Process(int(lock.read_text()))  # the worker writes its pid into its lock
    assert worker.cmdline()[-2:] == ["--processes", "2"]
    worker.terminate()
    worker.wait(60)
    assert not worker_alive(store.runs_root)
