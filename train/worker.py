"""``python -m train worker``: run the queued training jobs of one data root, one at a time.

One worker per data root: it holds an exclusive ``flock`` on ``runs/.jobs/worker.lock``, and a
second worker started on the same root exits at once. The loop gives up the jobs of dead workers
(:meth:`core.jobs.JobStore.reap`), claims the oldest queued job and runs it in this process, so
killing the worker kills the training too and nothing is left running unseen.

While a job runs, a heartbeat thread reports to the store about every second with the latest
training progress; when the store answers that a cancel was requested, the next progress report
of the training raises :class:`core.jobs.JobCancelled`, which the run writer turns into a
``.failed-`` run folder. SIGTERM (and SIGINT) stop the current job as failed ("worker
terminated") and end the worker cleanly.

With ``processes`` above 1 the worker launches each job as ``torchrun --nproc-per-node N -m
train job --job ID`` in a process group of its own (:func:`run_job_rank` on every rank) and
waits for it; rank 0 reports heartbeat and progress to the store and reads cancel requests, as
the worker does for a job in its own process. Every job kind shares its work among the ranks
and only rank 0 writes (:mod:`core.distributed`): fusion, contrastive and UGE train on them,
predict extracts and predicts a share of the cells on each. A rank that dies makes torchrun stop
the others; the job is then failed with the log's tail, and SIGTERM of the worker stops the
whole group.

This module imports torch only when a job runs, so a worker that finds another one holding the
lock exits in a fraction of a second.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import fields
from os import PathLike
from pathlib import Path
from typing import IO, Any

from core.dataroot import DataRoot
from core.io import utc_now
from core.jobs import LOCK_FILE, Job, JobCancelled, JobStore, log_tail
from core.progress import Progress

#: ``runner(config, log, progress) -> run_id``: ``log`` takes one message, ``progress`` one dict.
Runner = Callable[[dict, Callable[[str], None], Progress], str]


def run_fusion_job(config: dict, log: Callable[[str], None], progress: Progress) -> str:
    """Train one fusion run from a job config (:class:`core.configs.FusionConfig` fields).

    Raises:
        ValueError: for a key that is not a FusionConfig field (a typo would otherwise be
            silently dropped) or an invalid config.
    """
    from core.configs import FusionConfig
    from train.fusion import train_fusion  # torch, only when a job runs

    unknown = sorted(set(config) - {f.name for f in fields(FusionConfig)})
    if unknown:
        raise ValueError(f"fusion job config: unknown keys {unknown}")
    return train_fusion(FusionConfig.from_dict(config), log=log, progress=progress)


def run_contrastive_job(config: dict, log: Callable[[str], None], progress: Progress) -> str:
    """Pretrain one contrastive encoder from a job config (:class:`core.configs.ContrastiveConfig` fields).

    Raises:
        ValueError: for an unknown key or an invalid config.
    """
    from core.configs import ContrastiveConfig
    from train.contrastive import train_contrastive  # torch, only when a job runs

    unknown = sorted(set(config) - {f.name for f in fields(ContrastiveConfig)})
    if unknown:
        raise ValueError(f"contrastive job config: unknown keys {unknown}")
    return train_contrastive(ContrastiveConfig.from_dict(config), log=log, progress=progress)


def run_uge_job(config: dict, log: Callable[[str], None], progress: Progress) -> str:
    """Train one UGE (VLM embedding) run from a job config (:class:`core.configs.UGEConfig`
    fields), building the root's UGData first when it has none (with the config's seed).

    Raises:
        ValueError: for an unknown key or an invalid config.
    """
    from core.configs import UGEConfig
    from core.distributed import Ranks
    from core.ugdata import build_ugdata
    from train.uge import train_uge  # torch, only when a job runs

    unknown = sorted(set(config) - {f.name for f in fields(UGEConfig)})
    if unknown:
        raise ValueError(f"uge job config: unknown keys {unknown}")
    uge = UGEConfig.from_dict(config)
    with Ranks(uge.device).main_first():  # under torchrun rank 0 builds, the others read
        if not uge.ugdata_folder.exists():
            log(f"no UGData at {uge.ugdata_folder}: building it (seed {uge.seed})")
            progress({"stage": "building UGData", "epoch": 0, "epochs": 1})
            build_ugdata(uge.data, uge.ugdata_folder, seed=uge.seed)
    return train_uge(uge, log=log, progress=progress)


def run_predict_job(config: dict, log: Callable[[str], None], progress: Progress) -> str:
    """Predict a year with fusion runs from a job config (:class:`core.configs.PredictConfig`
    fields): the monitoring job the sidebar queues.

    Raises:
        ValueError: for an unknown key, or runs and a year that cannot be predicted.
        FileNotFoundError: for a missing run or a year without an aerial mosaic.
    """
    from core.configs import PredictConfig
    from train.predict import predict  # torch, only when a job runs

    unknown = sorted(set(config) - {f.name for f in fields(PredictConfig)})
    if unknown:
        raise ValueError(f"predict job config: unknown keys {unknown}")
    request = PredictConfig.from_dict(config)
    progress({"epoch": 0, "epochs": 1, "stage": f"predicting {request.year}"})
    run_id = predict(request, log=log)
    progress({"epoch": 1, "epochs": 1, "run_id": run_id})
    return run_id


#: One runner per :data:`core.jobs.JOB_KINDS`; a runner must call ``progress`` at least once an
#: epoch (a stage's steps, for UGE), as a cancel takes effect there.
JOB_RUNNERS: dict[str, Runner] = {
    "fusion": run_fusion_job,
    "contrastive": run_contrastive_job,
    "uge": run_uge_job,
    "predict": run_predict_job,
}


class WorkerTerminated(BaseException):
    """Raised in the running job by SIGTERM/SIGINT; a BaseException so no ``except Exception``
    in training code swallows it."""


class _Heartbeat(threading.Thread):
    """Reports a running job's heartbeat and progress to the store from a thread of its own.

    The training thread only ever puts progress on a :class:`queue.SimpleQueue` and reads an
    event flag: neither takes a Python lock, so a signal handler raising in the training thread
    can never leave a lock held that this thread then waits on forever.
    """

    def __init__(
        self,
        store: JobStore,
        job_id: int,
        interval: float,
        say: Callable[[str], None],
        min_gap: float = 0.25,
    ) -> None:
        super().__init__(name=f"heartbeat-job-{job_id}", daemon=True)
        self.store, self.job_id, self.interval, self.say = store, job_id, interval, say
        self.min_gap = min_gap  # tiny epochs must not turn into a database write each
        self.updates: queue.SimpleQueue[dict | None] = queue.SimpleQueue()
        self.stop_requested = threading.Event()
        self.progress: dict[str, Any] = {}  # everything reported so far, for the worker's record

    def push(self, values: dict) -> None:
        """Queue progress ``values`` for the next report (within ``min_gap`` seconds)."""
        self.updates.put(dict(values))

    def close(self) -> None:
        """Make the last report and stop."""
        self.updates.put(None)
        self.join(timeout=60.0)

    def run(self) -> None:
        closing, last = False, 0.0
        pending: dict[str, Any] = {}
        while not closing:
            # One report per interval, or sooner with new progress, carrying all queued since.
            wait = self.interval
            while not closing:
                try:
                    item = self.updates.get(timeout=wait)
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                else:
                    pending.update(item)
                    wait = max(0.0, self.min_gap - (time.monotonic() - last))
            last = time.monotonic()
            self.progress.update(pending)
            try:
                if self.store.report(self.job_id, pending):
                    self.stop_requested.set()
                pending = {}
            except Exception as exc:  # a locked or vanished database must not end the job
                self.say(f"job {self.job_id}: heartbeat failed ({exc})")  # retried next beat


def _say(message: str) -> None:
    print(f"{utc_now()} {message}", flush=True)


def _acquire_lock(path: Path, wait: float = 1.0) -> IO[bytes] | None:
    """The lock file held exclusively, or None if another worker holds it.

    It retries for ``wait`` seconds, because :func:`core.jobs.worker_alive` takes the lock for
    an instant to probe it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    file = open(path, "a+b")  # noqa: SIM115 -- held for the worker's lifetime
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                file.close()
                return None
            time.sleep(0.05)
            continue
        file.truncate(0)
        file.write(f"{os.getpid()}\n".encode())
        file.flush()
        return file


class Worker:
    """The job loop of one data root; :func:`run_worker` is the entry point."""

    def __init__(
        self,
        data_root: str | PathLike,
        *,
        heartbeat: float = 1.0,
        processes: int = 1,
        say: Callable[[str], None] = _say,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1, got {processes}")
        self.root = DataRoot(Path(data_root).resolve())
        if not self.root.root.is_dir():  # rather than create a job database under a typo
            raise FileNotFoundError(f"{self.root.root}: data root not found")
        self.store = JobStore.for_runs(self.root.runs)
        self.heartbeat, self.processes, self.say = heartbeat, processes, say
        self.stopping = False  # set by a signal: no new job, leave the loop
        self._in_job = False  # a signal raises WorkerTerminated only while a job's code runs
        self._terminating = False

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True
        if self._in_job and not self._terminating:
            self._terminating = True
            raise WorkerTerminated(signal.Signals(signum).name)

    def loop(
        self,
        *,
        exit_when_idle: float | None = None,
        poll: float = 1.0,
        stale_after: float = 30.0,
        once: bool = False,
    ) -> int:
        """Run jobs until stopped, idle for ``exit_when_idle`` s, or (``once``) after one job."""
        lock = _acquire_lock(self.store.log_dir / LOCK_FILE)
        if lock is None:
            self.say(
                f"another worker holds {self.store.log_dir / LOCK_FILE}; exiting "
                "(one worker per data root)"
            )
            return 0
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._on_signal) for s in handled}
        try:
            self.say(
                f"worker {os.getpid()} on {self.root.root}, {self.processes} process(es) per "
                "job: waiting for jobs"
            )
            idle_since = time.monotonic()
            while not self.stopping:
                for job_id in self.store.reap(stale_after):
                    status = self.store.get(job_id).status
                    self.say(f"job {job_id}: its worker died; marked {status}")
                job = self.store.claim(os.getpid())
                if job is None:
                    idle = time.monotonic() - idle_since
                    if once or (exit_when_idle is not None and idle >= exit_when_idle):
                        self.say(f"no queued jobs for {idle:.0f} s; exiting")
                        break
                    time.sleep(poll)  # a signal cuts it short only by setting self.stopping
                    continue
                self.run_job(job)
                idle_since = time.monotonic()
                if once:
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            lock.close()
        if self._terminating or self.stopping:
            self.say("worker terminated")
        return 0

    def run_job(self, job: Job) -> None:
        """Run one claimed job to its end and record how it ended."""
        self.say(f"job {job.id} ({job.kind}): started")
        log_path = self.store.log_path(job.id)
        with open(log_path, "a", encoding="utf-8") as file:
            log = _line_writer(file)
            beat = _Heartbeat(self.store, job.id, self.heartbeat, self.say)
            progress = _reporter(beat, job.id)
            log(f"job {job.id} ({job.kind}) run by worker {os.getpid()}: {json.dumps(job.config)}")
            beat.start()
            run_id, error = None, None
            try:
                try:
                    self._in_job = True
                    if self.stopping:  # signalled between the claim and here
                        raise WorkerTerminated("signalled before the job started")
                    runner = JOB_RUNNERS.get(job.kind)
                    if runner is None:
                        raise ValueError(
                            f"unknown job kind {job.kind!r}; this worker runs {sorted(JOB_RUNNERS)}"
                        )
                    if self.processes > 1:
                        run_id = self._launch(job, log_path)
                    else:
                        # The job trains on the data this worker serves, whatever the config says.
                        run_id = runner({**job.config, "data": str(self.root.root)}, log, progress)
                finally:
                    self._in_job = False
                status = "done"
            except JobCancelled:
                status = "cancelled"
                log("cancelled on request")
            except WorkerTerminated as exc:
                status, error = "failed", f"worker terminated ({exc})"
                log(error)
            except Exception as exc:
                status, error = "failed", f"{type(exc).__name__}: {exc}"
                log("job failed:\n" + traceback.format_exc())
            finally:
                beat.close()
        # A complete run folder is a result, whatever stopped the job after writing it.
        from core.runs import METRICS_FILE, run_path  # pandas: not at the top

        known = run_id or beat.progress.get("run_id") or self.store.get(job.id).run_id
        try:
            complete = bool(known) and (run_path(self.root.runs, known) / METRICS_FILE).is_file()
        except ValueError:  # a progress report naming no run id of ours
            complete = False
        if status != "done" and complete:
            status, run_id = "done", known
        if status == "done":
            self.store.finish(job.id, run_id)
        elif status == "cancelled":
            epoch, epochs = beat.progress.get("epoch"), beat.progress.get("epochs")
            self.store.confirm_cancel(job.id, f"cancelled on request at epoch {epoch} of {epochs}")
        else:
            self.store.fail(job.id, f"{error}\n{log_tail(log_path)}")
        recorded = self.store.get(job.id)  # the store's word: a reaped job stays failed
        self.say(f"job {job.id}: {recorded.status}" + (f" (run {run_id})" if run_id else ""))

    def _launch(self, job: Job, log_path: Path) -> str | None:
        """Run ``job`` under torchrun with :attr:`processes` ranks; its run id.

        Raises:
            JobCancelled: the ranks stopped because a cancel was requested.
            RuntimeError: a rank failed (torchrun stops the others).
        """
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc-per-node={self.processes}", "-m", "train", "job", str(job.id)]
        command += ["--data", str(self.root.root)]
        with open(log_path, "ab") as out:
            ranks = subprocess.Popen(
                command,
                cwd=self.root.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one group: a stop reaches every rank
            )
        try:
            code = ranks.wait()
        except BaseException:  # WorkerTerminated: the ranks must not outlive the job
            _stop_group(ranks)
            raise
        stored = self.store.get(job.id)
        if code != 0:
            if stored.cancel_requested:
                raise JobCancelled(f"job {job.id} cancelled")
            raise RuntimeError(f"{self.processes} training processes: torchrun exited with {code}")
        return stored.run_id


def _line_writer(file: IO[str]) -> Callable[[str], None]:
    """A job log: each message on a line of its own, stamped with the UTC time."""

    def log(message: str) -> None:
        file.write(f"{utc_now()} {str(message).rstrip()}\n")
        file.flush()

    return log


def _reporter(beat: _Heartbeat, job_id: int) -> Progress:
    """A job's progress callback: report through ``beat``; raise once a cancel is requested."""

    def progress(values: dict[str, Any]) -> None:
        beat.push(values)
        if beat.stop_requested.is_set():
            raise JobCancelled(f"job {job_id} cancelled")

    return progress


def _stop_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM ``process``'s process group, SIGKILL what is left after ``grace`` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def run_job_rank(data_root: str | PathLike, job_id: int, heartbeat: float = 1.0) -> int:
    """One rank of a job that a worker launched under torchrun; returns the exit code.

    Every rank runs the job's runner; rank 0 appends to the job's log and reports heartbeat and
    progress to the store (and raises :class:`~core.jobs.JobCancelled` on a cancel request),
    the other ranks stay silent. The worker records how the job ended.
    """
    root = DataRoot(Path(data_root).resolve())
    store = JobStore.for_runs(root.runs)
    job = store.get(job_id)
    runner = JOB_RUNNERS[job.kind]
    config = {**job.config, "data": str(root.root)}
    if os.environ.get("RANK", "0") != "0":
        runner(config, lambda message: None, lambda values: None)
        return 0
    with open(store.log_path(job.id), "a", encoding="utf-8") as file:
        beat = _Heartbeat(store, job.id, heartbeat, _say)
        beat.start()
        try:
            runner(config, _line_writer(file), _reporter(beat, job.id))
        finally:
            beat.close()
    return 0


def run_worker(
    data_root: str | PathLike,
    *,
    exit_when_idle: float | None = None,
    poll: float = 1.0,
    stale_after: float = 30.0,
    once: bool = False,
    processes: int = 1,
) -> int:
    """Run the job queue of ``data_root`` (see the module docstring); returns the exit code.

    Args:
        data_root: the data root; its jobs are in ``runs/jobs.sqlite``.
        exit_when_idle: exit after this many seconds with nothing queued (None: never).
        poll: seconds between looks at an empty queue.
        stale_after: a running job with no heartbeat for this long belongs to a dead worker.
        once: run at most one job, then exit.
        processes: ranks per job; above 1 each job runs under torchrun.
    """
    return Worker(data_root, processes=processes).loop(
        exit_when_idle=exit_when_idle, poll=poll, stale_after=stale_after, once=once
    )
