"""The job store and the worker: real SQLite, real worker processes, real (tiny) training."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from core.dataroot import DataRoot
from core.jobs import (
    JOB_KINDS,
    JobCancelled,
    JobStore,
    log_tail,
    start_worker,
    worker_alive,
)
from core.runs import RunWriter, list_runs, load_run, new_run_id

REPO = Path(__file__).resolve().parents[1]
# About 0.05 s an epoch on the tiny city; QUICK jobs take well under a second once torch is in.
QUICK = {"ground": None, "epochs": 2, "aerial_px": 32, "batch_size": 64, "block_size": 300.0}
ENDLESS = {**QUICK, "aerial_px": 16, "epochs": 100_000}  # runs until it is stopped


def write_complete(run: RunWriter) -> None:
    run.write_predictions(
        pd.DataFrame(
            {
                "cell_id": [1, 2],
                "split": ["train", "test"],
                "true": [0.1, 0.2],
                "predicted": [0.1, 0.3],
            }
        )
    )
    run.write_metrics({"test_kendall_tau": 1.0})


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def data_root(tiny_demo, tmp_path) -> Path:
    """A writable copy of the tiny city, without the runs other tests wrote into it."""
    root = tmp_path / "demo"
    top = str(tiny_demo)
    shutil.copytree(tiny_demo, root, ignore=lambda folder, _: ["runs"] if folder == top else [])
    return root


def spawn_worker(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "train", "worker", "--data", str(root), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=10)


def run_worker_until_idle(data_root, timeout: float) -> tuple[subprocess.Popen, str]:
    """Run a worker until its queue has been empty for a second; the process and its output."""
    worker = spawn_worker(data_root, "--exit-when-idle", "1", "--poll", "0.2")
    try:
        out, _ = worker.communicate(timeout=timeout)
    finally:
        stop(worker)
    return worker, out


def running_epoch(store: JobStore, job_id: int) -> int:
    job = store.get(job_id)
    assert job.status in ("queued", "running"), f"job {job_id} ended early: {job}"
    return job.progress.get("epoch", 0) if job.status == "running" else 0


# The store alone


def test_queue_order_states_and_cancel(tmp_path):
    store = JobStore.for_runs(tmp_path / "runs")
    assert store.path == tmp_path / "runs" / "jobs.sqlite" and store.path.is_file()
    assert store.log_dir == tmp_path / "runs" / ".jobs"
    first, second, third = (store.enqueue("fusion", {**QUICK, "seed": s}) for s in range(3))
    assert [job.id for job in store.jobs()] == [third, second, first]  # newest first
    assert store.get(first).config["seed"] == 0 and store.get(first).status == "queued"

    claimed = store.claim(pid=os.getpid())
    assert claimed.id == first and claimed.status == "running" and claimed.pid == os.getpid()
    assert claimed.started and claimed.heartbeat == pytest.approx(time.time(), abs=5)
    run_id = new_run_id("fusion")
    assert store.report(first, {"epoch": 0, "epochs": 2, "run_id": run_id}) is False
    assert store.report(first, {"epoch": 1, "loss": float("nan")}) is False
    reported = store.get(first)
    assert reported.progress == {"epoch": 1, "epochs": 2, "run_id": run_id, "loss": None}
    assert reported.run_id == run_id

    store.cancel(second)  # queued: cancelled at once, never claimed
    assert store.get(second).status == "cancelled" and store.get(second).finished
    store.cancel(first)  # running: only asks the worker
    assert store.get(first).status == "running" and store.get(first).cancel_requested
    assert store.report(first) is True
    store.confirm_cancel(first, "stopped")
    assert store.get(first).status == "cancelled"
    assert store.report(first) is True  # an ended job tells its worker to stop

    assert store.claim(pid=1).id == third
    store.finish(third, "fusion-20260101-000000-abcd")
    store.fail(third, "too late")  # ended already: the first word stands
    store.cancel(third)
    done = store.get(third)
    assert (done.status, done.run_id, done.error) == ("done", "fusion-20260101-000000-abcd", None)
    assert done.finished >= done.started >= done.created
    assert store.claim(pid=1) is None
    assert [j.id for j in store.jobs(["cancelled"])] == [second, first]
    assert [j.id for j in store.jobs(limit=1)] == [third]

    with pytest.raises(KeyError, match="job 99 not found"):
        store.get(99)
    with pytest.raises(ValueError, match="job statuses"):
        store.jobs(["finished"])
    with pytest.raises(ValueError, match="job kind"):
        store.enqueue("bogus", {})
    with pytest.raises(ValueError, match="JSON"):
        store.enqueue("fusion", {"data": {1, 2}})  # a set has no JSON form
    as_text = store.enqueue("fusion", {**QUICK, "data": tmp_path})  # a path is stored as text
    assert store.get(as_text).config["data"] == str(tmp_path)
    assert JOB_KINDS == ("fusion", "contrastive", "uge", "predict")


def test_concurrent_claims_never_share_a_job(tmp_path):
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    ids = {store.enqueue("fusion", {"seed": s}) for s in range(40)}
    claimed: list[int] = []

    def claim_all(pid: int) -> None:
        own = JobStore(path)  # its own connections, as another process would have
        while (job := own.claim(pid)) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=claim_all, args=(pid,)) for pid in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == sorted(ids)  # each job once, none lost
    assert not store.jobs(["queued"])


def test_a_file_that_is_not_a_job_database_is_refused(tmp_path):
    text = tmp_path / "notes.sqlite"
    text.write_text("not a database at all, but long enough to have a header" * 10)
    with pytest.raises(ValueError, match="notes.sqlite: not a job database"):
        JobStore(text)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE jobs (id INTEGER)")
    with pytest.raises(ValueError, match="other.sqlite: an SQLite database, but not a job"):
        JobStore(other)
    (tmp_path / "folder.sqlite").mkdir()
    with pytest.raises(ValueError, match="folder.sqlite: not a job database"):
        JobStore(tmp_path / "folder.sqlite")
    (tmp_path / "empty.sqlite").touch()
    assert JobStore(tmp_path / "empty.sqlite").jobs() == []  # an empty file is a new database


def test_reap_fails_dead_workers_jobs_and_hides_their_partial_runs(tmp_path):
    runs = tmp_path / "runs"
    store = JobStore.for_runs(runs)
    with RunWriter(runs, "fusion", {"epochs": 1}) as complete:  # a finished run beside jobs.sqlite
        write_complete(complete)

    stale = store.enqueue("fusion", QUICK)
    store.claim(pid=os.getpid())  # alive: only its heartbeat can say it died
    partial = RunWriter(runs, "fusion", {"epochs": 2})  # a run the dead worker left half-written
    write_complete(partial)
    store.report(stale, {"epoch": 1, "run_id": partial.run_id})
    store.log_dir.mkdir(exist_ok=True)
    lines = "".join(f"line {i}\n" for i in range(30)) + "epoch 1/2: loss 0.9\n"
    store.log_path(stale).write_text(lines)

    assert store.reap(stale_after=60) == []  # a fresh heartbeat
    time.sleep(0.05)
    assert store.reap(stale_after=0.01) == [stale]
    job = store.get(stale)
    assert job.status == "failed" and job.finished
    assert job.error.startswith("worker died (stale heartbeat")
    assert job.error.endswith("epoch 1/2: loss 0.9") and "line 11" in job.error
    assert "line 10\n" not in job.error  # the tail only
    assert not (runs / f".tmp-{partial.run_id}").exists()
    assert "worker died" in (runs / f".failed-{partial.run_id}" / "log.txt").read_text()
    assert list(list_runs(runs)["run_id"]) == [complete.run_id]  # jobs.sqlite, .jobs/ ignored
    assert store.reap(stale_after=0.01) == []  # reaped once

    # A worker pid that is gone (on this host) is dead however fresh its heartbeat.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    lost = store.enqueue("fusion", QUICK)
    store.claim(pid=int(gone.stdout))
    # A job whose run was complete when its worker died is done, not failed.
    finished = store.enqueue("fusion", QUICK)
    store.claim(pid=int(gone.stdout))
    store.report(finished, {"run_id": complete.run_id})
    assert store.reap(stale_after=3600) == [lost, finished]
    assert store.get(lost).error.startswith(f"worker died (pid {gone.stdout.strip()} is gone")
    assert (store.get(finished).status, store.get(finished).run_id) == ("done", complete.run_id)


def test_log_tail_and_worker_alive(tmp_path):
    assert log_tail(tmp_path / "missing.log") == ""
    (tmp_path / "a.log").write_text("one\ntwo\nthree\n")
    assert log_tail(tmp_path / "a.log", lines=2) == "two\nthree"

    runs = tmp_path / "runs"
    assert not worker_alive(runs)  # no lock file yet
    lock = JobStore.for_runs(runs).log_dir / "worker.lock"
    lock.parent.mkdir()
    with open(lock, "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert worker_alive(runs)
        assert worker_alive(runs)  # probing does not take the lock away
        fcntl.flock(held, fcntl.LOCK_UN)
        assert not worker_alive(runs)


def test_run_progress_reaches_the_callback_and_a_cancel_fails_the_run(tmp_path):
    seen: list[dict] = []
    with RunWriter(tmp_path, "fusion", {}, progress=seen.append) as run:
        run.progress(epoch=0, epochs=2)
        write_complete(run)
    assert seen == [{"epoch": 0, "epochs": 2, "run_id": run.run_id}]

    def cancel(values: dict) -> None:
        raise JobCancelled("stop")

    with pytest.raises(JobCancelled), RunWriter(tmp_path, "fusion", {}, progress=cancel) as run:
        write_complete(run)
        run.progress(epoch=1)
    assert run.path.name == f".failed-{run.run_id}"


def test_the_dashboards_side_never_imports_torch():
    code = (
        "import sys, core.jobs, train.worker; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert set(train.worker.JOB_RUNNERS) == set(core.jobs.JOB_KINDS)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# The worker process


def test_start_worker_detaches_a_worker_that_exits_when_idle(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.chdir(tmp_path)  # a relative data root must survive the worker's own cwd
    process = start_worker("data", exit_when_idle=1.5)
    assert os.getsid(process.pid) == process.pid  # its own session: no signals from ours
    wait_for(lambda: worker_alive(root / "runs"), 10, "the worker's lock")
    assert process.wait(timeout=20) == 0 and not worker_alive(root / "runs")
    log = (root / "runs" / ".jobs" / "worker.log").read_text()
    assert f"worker {process.pid} on {root.resolve()}" in log and "exiting" in log

    missing = subprocess.run(
        [sys.executable, "-m", "train", "worker", "--data", str(tmp_path / "nope")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2 and "data root not found" in missing.stderr
    assert not (tmp_path / "nope").exists()


def test_worker_runs_queued_jobs_one_after_the_other(data_root):
    runs = DataRoot(data_root).runs
    store = JobStore.for_runs(runs)
    first = store.enqueue("fusion", QUICK)
    second = store.enqueue("fusion", {**QUICK, "epochs": 3, "seed": 1, "data": "/elsewhere"})
    worker, out = run_worker_until_idle(data_root, 60)
    assert worker.returncode == 0, out
    ran = [store.get(first), store.get(second)]
    assert [job.status for job in ran] == ["done", "done"], out
    assert ran[1].started >= ran[0].finished  # one at a time
    assert ran[0].pid == ran[1].pid == worker.pid
    assert {job.run_id for job in ran} == set(list_runs(runs, kind="fusion")["run_id"])
    for job in ran:
        assert job.progress["epoch"] == job.progress["epochs"] == job.config["epochs"]
        assert job.progress["run_id"] == job.run_id and job.progress["val_kendall_tau"] is not None
        log = store.log_path(job.id).read_text()
        assert f"epoch {job.config['epochs']}/{job.config['epochs']}" in log and job.run_id in log
    assert "no queued jobs" in out and not worker_alive(runs)


def test_a_predict_job_predicts_a_year_with_the_runs_it_names(data_root):
    runs = DataRoot(data_root).runs
    store = JobStore.for_runs(runs)
    trained = [store.enqueue("fusion", {**QUICK, "seed": seed, "split_seed": 0}) for seed in (0, 1)]
    run_worker_until_idle(data_root, 120)
    members = [store.get(job).run_id for job in trained]
    job_id = store.enqueue("predict", {"run": members, "year": 2024, "window_years": 1})
    bad = store.enqueue("predict", {"run": members, "year": 2031})
    _, out = run_worker_until_idle(data_root, 120)
    job = store.get(job_id)
    assert job.status == "done", out + store.log_path(job_id).read_text()
    prediction = load_run(runs / job.run_id)
    assert prediction.config["year"] == 2024
    assert [m["run_id"] for m in prediction.config["members"]] == members
    assert job.progress["epoch"] == job.progress["epochs"] == 1
    failed = store.get(bad)
    assert failed.status == "failed" and "no aerial imagery of 2031" in failed.error


@pytest.mark.slow  # embeds every image of the tiny city: minutes on two cores
def test_a_uge_job_builds_the_missing_ugdata_and_trains(data_root):
    runs = DataRoot(data_root).runs
    assert not (DataRoot(data_root).root / "ugdata").exists()
    store = JobStore.for_runs(runs)
    tiny = {"tiny_pretrain_steps": 2, "stage1_steps": 2, "stage2_steps": 2}
    job_id = store.enqueue("uge", {**tiny, "stage2_questions": 8, "batch_size": 4})
    _, out = run_worker_until_idle(data_root, 300)
    job = store.get(job_id)
    assert job.status == "done", out + store.log_path(job_id).read_text()
    assert (DataRoot(data_root).root / "ugdata" / "ugdata.json").is_file()
    assert job.run_id in set(list_runs(runs, kind="uge")["run_id"])
    assert "building it" in store.log_path(job_id).read_text()


def test_cancel_restart_view_second_worker_and_sigterm(data_root):
    runs = DataRoot(data_root).runs
    store = JobStore.for_runs(runs)
    cancelled = store.enqueue("fusion", ENDLESS)
    worker = spawn_worker(data_root, "--poll", "0.2")
    try:
        wait_for(lambda: running_epoch(store, cancelled) >= 1, 60, "the first epoch")

        # A dashboard restarted now sees the job running, with a live heartbeat and progress.
        seen = JobStore(runs / "jobs.sqlite").get(cancelled)
        assert seen.status == "running" and seen.pid == worker.pid and seen.run_id
        assert seen.progress["epoch"] >= 1 and seen.progress["epochs"] == ENDLESS["epochs"]
        assert time.time() - seen.heartbeat < 3
        wait_for(lambda: store.get(cancelled).heartbeat > seen.heartbeat, 5, "the next heartbeat")
        assert worker_alive(runs)
        assert store.reap(stale_after=30) == []

        second = subprocess.run(
            [sys.executable, "-m", "train", "worker", "--data", str(data_root)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 0 and "another worker holds" in second.stdout
        assert store.get(cancelled).pid == worker.pid

        store.cancel(cancelled)
        wait_for(lambda: store.get(cancelled).status != "running", 15, "the cancel")
        job = store.get(cancelled)
        assert job.status == "cancelled" and "cancelled on request" in job.error
        assert (runs / f".failed-{job.run_id}").is_dir()
        assert not (runs / f".tmp-{job.run_id}").exists()
        assert "cancelled on request" in store.log_path(cancelled).read_text()

        terminated = store.enqueue("fusion", ENDLESS)
        wait_for(lambda: running_epoch(store, terminated) >= 1, 30, "the second job's first epoch")
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=30)
    finally:
        stop(worker)
    assert worker.returncode == 0, out
    job = store.get(terminated)
    assert job.status == "failed" and job.error.startswith("worker terminated (SIGTERM)"), job
    assert re.search(r"epoch \d+/100000", job.error)  # the log tail
    assert (runs / f".failed-{job.run_id}").is_dir() and not (runs / f".tmp-{job.run_id}").exists()
    assert list_runs(runs).empty and not worker_alive(runs)


def kill_worker_after_an_epoch(data_root, store: JobStore, job_id: int, timeout: float) -> None:
    """Start a worker, and SIGKILL it once job ``job_id`` has finished an epoch."""
    worker = spawn_worker(data_root)
    try:
        wait_for(lambda: running_epoch(store, job_id) >= 1, timeout, "the first epoch")
        os.kill(worker.pid, signal.SIGKILL)
        worker.communicate(timeout=10)
    finally:
        stop(worker)


def test_a_killed_worker_is_reaped_and_leaves_no_run(data_root):
    runs = DataRoot(data_root).runs
    store = JobStore.for_runs(runs)
    job_id = store.enqueue("fusion", ENDLESS)
    kill_worker_after_an_epoch(data_root, store, job_id, 60)
    job = store.get(job_id)
    # Nobody has said otherwise yet.
    assert job.status == "running" and (runs / f".tmp-{job.run_id}").is_dir()
    assert not worker_alive(runs)  # the lock died with it

    assert store.reap(stale_after=30) == [job_id]  # its pid is gone, so no need to wait 30 s
    job = store.get(job_id)
    assert job.status == "failed" and job.error.startswith("worker died (pid")
    assert re.search(r"epoch \d+/100000", job.error)  # the log tail
    assert not (runs / f".tmp-{job.run_id}").exists() and (runs / f".failed-{job.run_id}").is_dir()
    assert list_runs(runs).empty


def test_after_a_killed_worker_a_fresh_one_runs_the_next_job(data_root):
    """SIGKILL mid-epoch with a job queued behind: the next worker reaps the dead one's job by
    itself, then runs the queued job to completion; only that job's run is listed."""
    runs = DataRoot(data_root).runs
    store = JobStore.for_runs(runs)
    killed_job = store.enqueue("fusion", ENDLESS)
    next_job = store.enqueue("fusion", QUICK)
    first = spawn_worker(data_root)
    try:
        wait_for(lambda: running_epoch(store, killed_job) >= 1, 60, "the first epoch")
        assert store.get(next_job).status == "queued"  # one job at a time
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=10)
    finally:
        stop(first)
    partial = store.get(killed_job).run_id
    assert (runs / f".tmp-{partial}").is_dir()

    fresh, out = run_worker_until_idle(data_root, 120)
    assert fresh.returncode == 0, out
    assert f"job {killed_job}: its worker died; marked failed" in out
    dead, done = store.get(killed_job), store.get(next_job)
    assert dead.status == "failed" and dead.error.startswith(
        f"worker died (pid {first.pid} is gone"
    )
    assert done.status == "done", out + store.log_path(next_job).read_text()
    assert done.pid == fresh.pid != first.pid and done.started > dead.finished  # reaped first
    assert done.progress["epoch"] == done.progress["epochs"] == QUICK["epochs"]
    assert list(list_runs(runs)["run_id"]) == [done.run_id]
    assert (runs / f".failed-{partial}").is_dir()
    assert not [p.name for p in runs.iterdir() if p.name.startswith(".tmp-")]
    assert not worker_alive(runs)


def test_a_killed_contrastive_job_resumes_through_the_queue(data_root):
    """A contrastive job killed mid-run (SIGKILL of its worker) leaves a ``.failed-`` folder
    with the last epoch's checkpoint; a job ``{"resume": run id}`` run by a fresh worker continues
    that run in place to a complete run with every epoch once (README: ``--resume`` continues an
    interrupted or failed run)."""
    runs = DataRoot(data_root).runs
    store = JobStore.for_runs(runs)
    # Six short epochs: the kill lands after the first one's checkpoint, well before the end.
    tiny = {"epochs": 6, "steps_per_epoch": 2, "batch_size": 16, "dim": 16, "mlp_dim": 32}
    killed_job = store.enqueue("contrastive", {**tiny, "device": "cpu", "seed": 5})
    kill_worker_after_an_epoch(data_root, store, killed_job, 120)
    run_id = store.get(killed_job).run_id
    assert (runs / f".tmp-{run_id}" / "checkpoint.safetensors").is_file()
    assert list_runs(runs).empty  # killed before the end: nothing complete

    resume_job = store.enqueue("contrastive", {"resume": run_id, "device": "cpu"})
    fresh, out = run_worker_until_idle(data_root, 180)
    assert store.get(killed_job).status == "failed"
    resumed = store.get(resume_job)
    assert resumed.status == "done", out + store.log_path(resume_job).read_text()
    assert resumed.run_id == run_id and resumed.pid == fresh.pid
    run = load_run(runs / run_id)
    assert run.epochs["epoch"].tolist() == list(range(1, tiny["epochs"] + 1))  # each once
    assert (runs / run_id / "backbone.safetensors").is_file()
    log = (runs / run_id / "log.txt").read_text()
    assert f"resumed from .failed-{run_id}" in log and "worker died" in log
    assert re.search(r"resuming after epoch [1-5] ", log), log
    assert list(list_runs(runs)["run_id"]) == [run_id]
    assert not [p.name for p in runs.iterdir() if p.name.startswith((".tmp-", ".failed-"))]


def test_make_demo_queues_each_embedding_run_once(data_root):
    import fcntl

    from core.jobs import JOBS_DIR, LOCK_FILE
    from train.demo_runs import queue_embedding_runs

    root = DataRoot(data_root)
    lock = root.runs / JOBS_DIR / LOCK_FILE
    lock.parent.mkdir(parents=True)
    with open(lock, "wb") as held:  # a worker is alive: none is started
        fcntl.flock(held, fcntl.LOCK_EX)
        store = JobStore.for_runs(root.runs)
        first = queue_embedding_runs(root, log=lambda _: None)
        assert [store.get(j).kind for j in first] == ["contrastive", "uge"]
        assert all(store.get(j).config == {} for j in first)  # the kinds' default schedules
        assert queue_embedding_runs(root, log=lambda _: None) == []  # already queued
        for job in first:
            store.cancel(job)
        with RunWriter(root.runs, "contrastive", {"label": "done"}) as run:
            write_complete(run)
        again = queue_embedding_runs(root, log=lambda _: None)  # a contrastive run exists
        assert [store.get(j).kind for j in again] == ["uge"]
        store.cancel(again[0])
