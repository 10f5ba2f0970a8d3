"""Faults with real processes: SIGKILLed builds and extractions, concurrent enqueues, and
``stadsbeeld demo --force`` over a root that holds trained runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from core.dataroot import DataRoot
from core.io import building, remove_stale_siblings
from core.jobs import JobStore
from core.runs import RunWriter, list_runs
from tests.conftest import TINY_EXTENT
from tests.test_jobs import write_complete
from train.cli import main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
DEMO = ["--extent", TINY_EXTENT, "--flickr-photos", "2000", "--workers", "1", "--quiet"]


def spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(process: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    """SIGKILL ``process`` as soon as ``ready()`` holds; fail if it ends or times out first."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if process.poll() is not None:
                raise AssertionError(f"ended before {what}: {process.communicate()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".jobs" not in p.parts
    }


# --- building(): stale temporary folders of dead processes ---------------------------------------


def test_a_killed_build_leaves_a_hidden_folder_the_next_build_removes(tmp_path):
    out = tmp_path / "city"
    child = spawn(
        f"""
        import time
        from core.io import building
        with building({str(out)!r}) as tmp:
            (tmp / "half.txt").write_text("half")
            print("ready", flush=True)
            time.sleep(120)
        """
    )
    kill_when(child, lambda: any(tmp_path.glob(".city.building-*/half.txt")), "the first file")
    assert not out.exists()  # nothing that looks finished
    assert [p.name for p in tmp_path.iterdir()] == [f".city.building-{child.pid}"]

    with building(out) as tmp:
        (tmp / "whole.txt").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["city"]
    assert [p.name for p in out.iterdir()] == ["whole.txt"]


def test_stale_cleanup_spares_live_builds_and_restores_kept_entries(tmp_path):
    out = tmp_path / "city"
    (out / "runs").mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    live = tmp_path / f".city.building-{os.getppid()}"  # a running process: left alone
    live.mkdir()
    stale = tmp_path / f".city.building-{dead_pid}"
    (stale / "runs" / "fusion-20260101-000000-abcd").mkdir(parents=True)
    (out / "runs").rmdir()  # killed after moving runs/ into its new city, before the swap
    other = tmp_path / f".town.building-{dead_pid}"  # another folder's: not ours to remove
    other.mkdir()

    assert remove_stale_siblings(out, keep=("runs",)) == [stale]
    assert (out / "runs" / "fusion-20260101-000000-abcd").is_dir()
    assert live.is_dir() and other.is_dir() and not stale.exists()


def test_a_build_killed_mid_swap_gets_the_old_folder_back(tmp_path):
    out = tmp_path / "city"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    pid = int(dead.stdout)
    old, new = tmp_path / f".city.old-{pid}", tmp_path / f".city.building-{pid}"
    (old / "runs").mkdir(parents=True)
    (old / "demo.json").write_text("old")
    new.mkdir()
    (new / "demo.json").write_text("new, runs not yet moved")
    remove_stale_siblings(out, keep=("runs",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["city"]
    assert (out / "demo.json").read_text() == "old" and (out / "runs").is_dir()


def test_a_failed_swap_moves_kept_entries_back(tmp_path, monkeypatch):
    import core.io

    out = tmp_path / "city"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "jobs.sqlite").write_text("db")

    def refuse(*args, **kwargs):
        raise OSError("swap refused")

    monkeypatch.setattr(core.io, "move_folder", refuse)
    with pytest.raises(OSError, match="swap refused"), building(out, replace=True, keep=("runs",)):
        pass
    assert (out / "runs" / "jobs.sqlite").read_text() == "db"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["city"]


# --- the demo city: --force keeps runs/, --force_delete_runs deletes them -----------------------


def add_runs(root: Path) -> tuple[str, int]:
    runs = DataRoot(root).runs
    with RunWriter(runs, "fusion", {"lr": 0.1}) as run:
        write_complete(run)
    job_id = JobStore.for_runs(runs).enqueue("fusion", {"epochs": 1})
    return run.run_id, job_id


def test_demo_force_keeps_runs_and_force_delete_runs_deletes_them(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), *DEMO]
    assert main(args) == 0
    run_id, job_id = add_runs(out)
    runs_before = snapshot(out / "runs")

    assert main([*args, "--force", "--seed", "8"]) == 0
    assert "kept" in capsys.readouterr().out
    assert json.loads((out / "demo.json").read_text())["config"]["seed"] == 8
    assert snapshot(out / "runs") == runs_before
    assert list_runs(out / "runs")["run_id"].tolist() == [run_id]
    assert JobStore.for_runs(out / "runs").get(job_id).status == "queued"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]

    assert main([*args, "--force_delete_runs"]) == 0
    assert "deleted 2 entries" in capsys.readouterr().err  # the run and jobs.sqlite
    assert not (out / "runs").exists() and list_runs(out / "runs").empty
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_a_killed_demo_force_build_loses_nothing_and_the_rerun_cleans_up(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), *DEMO]
    assert main(args) == 0
    run_id, _ = add_runs(out)
    city_before, runs_before = (out / "demo.json").read_text(), snapshot(out / "runs")

    child = subprocess.Popen(
        [sys.executable, "-m", "train", *args, "--force", "--seed", "8"],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = tmp_path / f".demo.building-{child.pid}"
    kill_when(child, lambda: any(partial.glob("*/*")), "the build's first files")
    assert partial.is_dir()  # the killed build's leftovers, hidden
    assert (out / "demo.json").read_text() == city_before  # the old city, whole
    assert snapshot(out / "runs") == runs_before

    assert main([*args, "--force", "--seed", "8"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # leftovers cleaned
    assert json.loads((out / "demo.json").read_text())["config"]["seed"] == 8
    assert snapshot(out / "runs") == runs_before
    assert list_runs(out / "runs")["run_id"].tolist() == [run_id]


# --- the feature cache: a SIGKILL mid-write resumes to the same features -------------------------


def test_a_killed_feature_extraction_resumes_to_the_same_features(tiny_demo, tmp_path):
    pytest.importorskip("torch")
    from core.datasets import street_images
    from core.features import extract_features

    images = street_images(DataRoot(tiny_demo), "gsv").iloc[:600][["id", "path"]]
    images = images.reset_index(drop=True)
    table = tmp_path / "images.parquet"
    images.to_parquet(table)
    cache = tmp_path / "cache"
    child = spawn(
        f"""
        import pandas as pd
        from core.features import extract_features
        images = pd.read_parquet({str(table)!r})
        extract_features(images, "convnet_small", None, {str(cache)!r}, px=16, batch_size=8,
                         workers=0, device="cpu", chunk_batches=1)
        """
    )

    def midway() -> bool:
        metas = list(cache.glob("*/meta.json"))
        try:
            return bool(metas) and 0 < json.loads(metas[0].read_text())["done"] < len(images)
        except (ValueError, KeyError, OSError):
            return False

    kill_when(child, midway, "a partial feature cache")
    features = extract_features(
        images, "convnet_small", None, cache, px=16, batch_size=8, workers=0, device="cpu"
    )
    clean = extract_features(
        images,
        "convnet_small",
        None,
        tmp_path / "clean",
        px=16,
        batch_size=8,
        workers=0,
        device="cpu",
    )
    np.testing.assert_array_equal(np.asarray(features.matrix), np.asarray(clean.matrix))
    assert json.loads((features.folder / "meta.json").read_text())["done"] == len(images)
    assert sorted(p.name for p in features.folder.iterdir()) == [
        "features.npy",
        "index.parquet",
        "meta.json",
    ]


# --- the job store: two processes enqueue at once ------------------------------------------------


def test_two_processes_enqueuing_at_once_lose_and_repeat_no_job(tmp_path):
    runs = tmp_path / "runs"
    JobStore.for_runs(runs)  # created first, as the dashboard does
    go = tmp_path / "go"
    code = """
        import os, sys, time
        from pathlib import Path
        from core.jobs import JobStore
        store = JobStore.for_runs({runs!r})
        while not Path({go!r}).exists():
            time.sleep(0.005)
        ids = [store.enqueue("fusion", {{"seed": i, "by": {who!r}}}) for i in range(20)]
        print(" ".join(map(str, ids)))
        """
    children = [
        spawn(code.format(runs=str(runs), go=str(go), who=who)) for who in ("first", "second")
    ]
    time.sleep(1.0)  # both importing and waiting
    go.write_text("go")
    returned = []
    for child in children:
        stdout, stderr = child.communicate(timeout=60)
        assert child.returncode == 0, stderr
        returned += [int(x) for x in stdout.split()]
    store = JobStore.for_runs(runs)
    assert sorted(returned) == list(range(1, 41))
    claimed = []
    while (job := store.claim(os.getpid())) is not None:
        claimed.append((job.id, job.config["by"], job.config["seed"]))
    assert sorted(c[0] for c in claimed) == list(range(1, 41))  # each claimed once
    assert sorted((who, seed) for _, who, seed in claimed) == sorted(
        (who, i) for who in ("first", "second") for i in range(20)
    )
    assert store.claim(os.getpid()) is None


def _race(runs: Path, go: Path, sessions: int, attempts: int, claimers: int, caps: dict) -> tuple:
    """``sessions`` processes, each one dashboard session's enqueue path (its own ids as ``mine``,
    the caps checked where the job is inserted), and ``claimers`` processes claiming and finishing
    jobs as a worker does, all started by ``go`` on one SQLite file. Meanwhile this process reads
    the active jobs (queued or running) again and again, each read one consistent snapshot.

    Returns:
        (each session's ``{"mine": ids, "refused": messages}``, each claimer's claimed ids, the
        largest number of active jobs seen at once, the largest of one session's seen at once).
    """
    session = """
        import json, time
        from pathlib import Path
        from core.jobs import JobStore, QueueFull
        store = JobStore.for_runs({runs!r})
        mine, refused = [], []
        while not Path({go!r}).exists():
            time.sleep(0.005)
        for i in range({attempts}):
            try:
                mine.append(store.enqueue(
                    "fusion", {{"seed": i, "by": {who!r}}},
                    max_active={max_active}, mine=mine, max_mine={max_mine},
                ))
            except QueueFull as full:
                refused.append(str(full))
            time.sleep(0.005)  # a person clicks; the claimers get a turn
        print(json.dumps({{"mine": mine, "refused": refused}}))
        """
    claimer = """
        import json, os, time
        from pathlib import Path
        from core.jobs import JobStore
        store = JobStore.for_runs({runs!r})
        claimed = []
        while not Path({go!r}).exists():
            time.sleep(0.005)
        while not Path({go!r}).with_name("stop").exists():
            job = store.claim(os.getpid())
            if job is None:
                time.sleep(0.005)
                continue
            time.sleep(0.02)  # trains
            store.finish(job.id, "fusion-20260101-000000-{who}")
            claimed.append(job.id)
        print(json.dumps(claimed))
        """
    children = [
        spawn(session.format(runs=str(runs), go=str(go), who=f"s{i}", attempts=attempts, **caps))
        for i in range(sessions)
    ] + [
        spawn(claimer.format(runs=str(runs), go=str(go), who=f"c{i:03d}")) for i in range(claimers)
    ]
    store = JobStore.for_runs(runs)
    time.sleep(1.0)  # all importing and waiting
    go.write_text("go")
    most, most_one = 0, 0
    while any(child.poll() is None for child in children[:sessions]) or (
        claimers and store.jobs(["queued", "running"], limit=1)
    ):
        active = store.jobs(["queued", "running"], limit=10_000)
        most = max(most, len(active))
        per_session = [sum(j.config["by"] == f"s{i}" for j in active) for i in range(sessions)]
        most_one = max(most_one, *per_session)
    (go.parent / "stop").write_text("stop")
    results = []
    for child in children:
        stdout, stderr = child.communicate(timeout=60)
        assert child.returncode == 0, stderr
        results.append(json.loads(stdout))
    return results[:sessions], results[sessions:], most, most_one


def test_sessions_queueing_at_once_never_pass_the_caps(tmp_path):
    """Four sessions each try six jobs at once, nobody claims: exactly the global cap is queued,
    no session has more than its share, and every refusal is the cap's message."""
    runs = tmp_path / "runs"
    JobStore.for_runs(runs)
    caps = {"max_active": 5, "max_mine": 2}
    sessions, _, most, most_one = _race(runs, tmp_path / "go", 4, 6, 0, caps)
    ids = [i for s in sessions for i in s["mine"]]
    assert len(ids) == len(set(ids)) == caps["max_active"]  # the cap exactly, none twice
    assert all(len(s["mine"]) <= caps["max_mine"] for s in sessions)
    assert sorted(j.id for j in JobStore.for_runs(runs).jobs()) == sorted(ids)  # none lost
    refused = [m for s in sessions for m in s["refused"]]
    assert len(refused) == 4 * 6 - caps["max_active"]
    assert all(
        m == "5 jobs are already queued or running (at most 5)"
        or m == "2 of your jobs are already queued or running (at most 2)"
        for m in refused
    ), refused
    assert most <= caps["max_active"] and most_one <= caps["max_mine"]


def test_sessions_queueing_while_workers_claim_lose_and_repeat_no_job(tmp_path):
    """Four sessions enqueue within the caps while two claimers run jobs as they come: every
    queued job runs exactly once, none is lost, and the active jobs never pass either cap."""
    runs = tmp_path / "runs"
    JobStore.for_runs(runs)
    caps = {"max_active": 4, "max_mine": 2}
    sessions, claimers, most, most_one = _race(runs, tmp_path / "go", 4, 25, 2, caps)
    ids = sorted(i for s in sessions for i in s["mine"])
    ran = sorted(i for c in claimers for i in c)
    jobs = JobStore.for_runs(runs).jobs(limit=10_000)
    assert ran == ids == sorted(j.id for j in jobs)  # each queued job ran exactly once
    assert {j.status for j in jobs} == {"done"}
    assert all(c for c in claimers)  # both claimers took part
    assert [m for s in sessions for m in s["refused"]]  # the caps were reached ...
    assert most <= caps["max_active"] and most_one <= caps["max_mine"]  # ... and held
