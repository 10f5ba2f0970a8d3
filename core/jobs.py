"""Training jobs: a SQLite queue beside the runs, and how the dashboard starts a worker.

The dashboard enqueues jobs in ``runs_root/jobs.sqlite``; one worker process per data root
(``python -m train worker``, :mod:`train.worker`) claims them oldest first and runs them one at a
time. A job moves ``queued -> running -> done | failed | cancelled``. While it runs, the worker
reports a heartbeat about every second together with the training progress (epoch, loss, the run
id, ...), so a crashed worker shows up as a stale heartbeat that :meth:`JobStore.reap` turns into
a failed job.

Beside the database, ``runs_root/.jobs/`` holds each job's log ``<id>.log``, the worker's
``worker.log`` and ``worker.lock``, which the live worker holds an exclusive ``flock`` on.

This module never imports torch (the dashboard imports it); only the worker does.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from core.dataroot import DataRoot
from core.io import jsonable, move_folder, utc_now

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
#: The states a job never leaves.
FINAL_STATES = ("done", "failed", "cancelled")
#: The kinds a worker can run (:data:`train.worker.JOB_RUNNERS` has one runner for each).
JOB_KINDS = ("fusion", "contrastive", "uge", "predict")
DB_FILE = "jobs.sqlite"
JOBS_DIR = ".jobs"
LOCK_FILE = "worker.lock"
WORKER_LOG = "worker.log"

# Marks the file as ours, so a foreign SQLite database is refused rather than extended.
_APPLICATION_ID = 0x53544A42  # "STJB"
_SCHEMA_VERSION = 1
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN {JOB_STATES!r}),
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    pid INTEGER,
    host TEXT,
    heartbeat REAL,
    progress TEXT NOT NULL DEFAULT '{{}}',
    run_id TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, id);
"""
_COLUMNS = (
    "id, kind, config, status, created, started, finished, pid, heartbeat, progress, "
    "run_id, error, cancel_requested"
)
_BUSY_TIMEOUT_S = 10.0


class JobCancelled(Exception):
    """Raised inside a running job (from its progress callback) to stop it on request."""


def _dumps(value: Mapping[str, Any], what: str) -> str:
    try:
        return json.dumps(jsonable(value), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: not JSON-serialisable plain values ({exc})") from exc


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (a zombie, exited but not yet waited for, is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust kill()
    return state not in ("Z", "X")


@dataclass(frozen=True)
class Job:
    """One job as stored; times are ISO UTC strings, ``heartbeat`` is unix time."""

    id: int
    kind: str
    config: dict
    status: str
    created: str
    started: str | None
    finished: str | None
    pid: int | None
    heartbeat: float | None
    progress: dict
    run_id: str | None
    error: str | None
    cancel_requested: bool

    @classmethod
    def _from_row(cls, row: tuple) -> Job:
        (
            id_,
            kind,
            config,
            status,
            created,
            started,
            finished,
            pid,
            heartbeat,
            progress,
            run_id,
            error,
            cancel,
        ) = row
        return cls(
            id_,
            kind,
            json.loads(config),
            status,
            created,
            started,
            finished,
            pid,
            heartbeat,
            json.loads(progress),
            run_id,
            error,
            bool(cancel),
        )


class QueueFull(ValueError):
    """A job was refused because a cap on waiting and running jobs is reached."""


class JobStore:
    """The job queue of one runs folder, in SQLite (WAL mode, so readers never block the worker).

    Every call opens its own short connection, so one store may be shared between threads and
    any number of processes may use the same file.

    Args:
        path: the database file; its folder (the runs root) and the schema are created if missing.
        readonly: open an existing database read-only (SQLite ``mode=ro``): nothing is created
            or written, and every writing method fails with ``sqlite3.OperationalError``.

    Raises:
        ValueError: if ``path`` exists but is not a job database (or, read-only, is missing or
            cannot be read).
    """

    def __init__(self, path: str | PathLike, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if readonly:
            self._check_readonly()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("BEGIN IMMEDIATE")
                application_id = db.execute("PRAGMA application_id").fetchone()[0]
                version = db.execute("PRAGMA user_version").fetchone()[0]
                tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if tables and application_id != _APPLICATION_ID:
                    raise ValueError(f"{self.path}: an SQLite database, but not a job database")
                if version > _SCHEMA_VERSION:
                    raise ValueError(
                        f"{self.path}: job database schema {version} is newer than "
                        f"this code's ({_SCHEMA_VERSION}); update Stadsbeeld"
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA application_id={_APPLICATION_ID}")
                db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
                db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:  # "file is not a database", unreadable, a folder
            raise ValueError(f"{self.path}: not a job database ({exc})") from exc

    def _check_readonly(self) -> None:
        if not self.path.is_file():
            raise ValueError(f"{self.path}: no job database here")
        try:
            with self._connect() as db:
                application_id = db.execute("PRAGMA application_id").fetchone()[0]
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if application_id != _APPLICATION_ID:
                    raise ValueError(f"{self.path}: an SQLite database, but not a job database")
                if version > _SCHEMA_VERSION:
                    raise ValueError(
                        f"{self.path}: job database schema {version} is newer than "
                        f"this code's ({_SCHEMA_VERSION}); update Stadsbeeld"
                    )
                db.execute("SELECT count(*) FROM jobs").fetchone()
        except sqlite3.Error as exc:  # not a database, unreadable, locked
            raise ValueError(f"{self.path}: not a job database ({exc})") from exc

    @classmethod
    def for_runs(cls, runs_root: str | PathLike, *, readonly: bool = False) -> JobStore:
        """The store of a runs folder: ``runs_root/jobs.sqlite`` (see the class for ``readonly``)."""
        return cls(Path(runs_root) / DB_FILE, readonly=readonly)

    @property
    def runs_root(self) -> Path:
        """The runs folder the jobs write into: the database's folder."""
        return self.path.parent

    @property
    def log_dir(self) -> Path:
        """``runs_root/.jobs/``: job logs ``<id>.log``, ``worker.log``, ``worker.lock``."""
        return self.runs_root / JOBS_DIR

    def log_path(self, job_id: int) -> Path:
        """The log file of job ``job_id`` (it may not exist yet)."""
        return self.log_dir / f"{int(job_id)}.log"

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # Autocommit mode: transactions are explicit BEGIN IMMEDIATE, so a read-then-write
        # (claim, report) holds the write lock from its first read.
        if self.readonly:
            # A read-only connection to a WAL database creates the -wal and -shm files when they
            # are missing; they are missing only when no writer is connected and everything is
            # checkpointed into the main file, which then can be read as immutable instead.
            wal = self.path.with_name(self.path.name + "-wal").exists()
            uri = f"{self.path.resolve().as_uri()}?mode=ro" + ("" if wal else "&immutable=1")
            db = sqlite3.connect(uri, timeout=_BUSY_TIMEOUT_S, isolation_level=None, uri=True)
        else:
            db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        try:
            if not self.readonly:
                # Durable across process crashes in WAL mode, without an fsync per heartbeat.
                db.execute("PRAGMA synchronous=NORMAL")
            yield db
        except BaseException:
            if db.in_transaction:
                with suppress(sqlite3.Error):  # keep the original error, not the rollback's
                    db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")

    def _row(self, db: sqlite3.Connection, job_id: int) -> Job:
        row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise KeyError(f"job {job_id} not found in {self.path}")
        return Job._from_row(row)

    def enqueue(
        self,
        kind: str,
        config: Mapping[str, Any],
        *,
        max_active: int | None = None,
        mine: Iterable[int] = (),
        max_mine: int | None = None,
    ) -> int:
        """Queue a job; returns its id.

        The caps count active jobs (queued or running) and are checked in the same transaction
        as the insert, so concurrent callers cannot overshoot them.

        Args:
            kind: one of :data:`JOB_KINDS`.
            config: the job's options (JSON-serialisable).
            max_active: refuse when this many jobs are already active (None: no cap).
            mine: the ids of the jobs the caller queued before (e.g. one dashboard session's).
            max_mine: refuse when this many of ``mine`` are still active (None: no cap).

        Raises:
            ValueError: for an unknown kind or a config that is not a JSON-serialisable mapping.
            QueueFull: when a cap is reached.
        """
        if kind not in JOB_KINDS:
            raise ValueError(f"job kind {kind!r}: expected one of {JOB_KINDS}")
        if not isinstance(config, Mapping):
            raise ValueError(f"job config: expected a mapping, got {type(config).__name__}")
        text = _dumps(config, "job config")
        mine = [int(i) for i in mine]
        with self._write() as db:
            active = "status IN ('queued', 'running')"
            if max_active is not None:
                count = db.execute(f"SELECT count(*) FROM jobs WHERE {active}").fetchone()[0]
                if count >= max_active:
                    raise QueueFull(
                        f"{count} jobs are already queued or running (at most {max_active})"
                    )
            if max_mine is not None and mine:
                count = db.execute(
                    f"SELECT count(*) FROM jobs WHERE {active} AND id IN "
                    f"({', '.join('?' * len(mine))})",
                    mine,
                ).fetchone()[0]
                if count >= max_mine:
                    raise QueueFull(
                        f"{count} of your jobs are already queued or running (at most {max_mine})"
                    )
            cursor = db.execute(
                "INSERT INTO jobs (kind, config, status, created) VALUES (?, ?, 'queued', ?)",
                (kind, text, utc_now("milliseconds")),
            )
            return int(cursor.lastrowid)

    def get(self, job_id: int) -> Job:
        """Job ``job_id``.

        Raises:
            KeyError: if there is no such job.
        """
        with self._connect() as db:
            return self._row(db, job_id)

    def jobs(self, statuses: Iterable[str] | None = None, limit: int = 50) -> list[Job]:
        """The newest ``limit`` jobs, newest first, optionally only those in ``statuses``.

        Raises:
            ValueError: for a status not in :data:`JOB_STATES`.
        """
        query, params = f"SELECT {_COLUMNS} FROM jobs", []
        if statuses is not None:
            wanted = [statuses] if isinstance(statuses, str) else list(statuses)
            unknown = [s for s in wanted if s not in JOB_STATES]
            if unknown:
                raise ValueError(f"job statuses {unknown}: expected some of {JOB_STATES}")
            query += f" WHERE status IN ({', '.join('?' * len(wanted))})"
            params += wanted
        query += " ORDER BY id DESC LIMIT ?"
        with self._connect() as db:
            return [Job._from_row(row) for row in db.execute(query, [*params, int(limit)])]

    def claim(self, pid: int) -> Job | None:
        """Atomically move the oldest queued job to running for worker ``pid``; None if none."""
        with self._write() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET status = 'running', started = ?, pid = ?, host = ?, heartbeat = ?"
                " WHERE id = ?",
                (utc_now("milliseconds"), int(pid), socket.gethostname(), time.time(), row[0]),
            )
            return self._row(db, row[0])

    def report(self, job_id: int, progress: Mapping[str, Any] | None = None) -> bool:
        """Heartbeat of a running job, merging ``progress`` into the stored progress.

        A ``run_id`` in ``progress`` also sets the job's run id.

        Returns:
            True when the job should stop: a cancel was requested, or the job is no longer
            running (e.g. :meth:`reap` gave it up).

        Raises:
            KeyError: if there is no such job.
        """
        with self._write() as db:
            job = self._row(db, job_id)
            if job.status != "running":
                return True
            merged = {**job.progress, **(progress or {})}
            run_id = merged.get("run_id", job.run_id)
            db.execute(
                "UPDATE jobs SET heartbeat = ?, progress = ?, run_id = ? WHERE id = ?",
                (time.time(), _dumps(merged, f"job {job_id} progress"), run_id, job.id),
            )
            return job.cancel_requested

    def _end(self, job_id: int, status: str, run_id: str | None, error: str | None) -> None:
        with self._write() as db:
            job = self._row(db, job_id)
            if job.status != "running":
                return  # already ended (reaped, or recorded twice): the first word stands
            db.execute(
                "UPDATE jobs SET status = ?, finished = ?, run_id = ?, error = ? WHERE id = ?",
                (status, utc_now("milliseconds"), run_id or job.run_id, error, job.id),
            )

    def finish(self, job_id: int, run_id: str) -> None:
        """Record that running job ``job_id`` completed run ``run_id`` (no-op if not running).

        Raises:
            KeyError: if there is no such job.
        """
        self._end(job_id, "done", run_id, None)

    def fail(self, job_id: int, error: str) -> None:
        """Record that running job ``job_id`` failed with ``error`` (no-op if not running).

        Raises:
            KeyError: if there is no such job.
        """
        self._end(job_id, "failed", None, error)

    def confirm_cancel(self, job_id: int, note: str | None = None) -> None:
        """The worker's side of :meth:`cancel`: running job ``job_id`` stopped, now cancelled.

        Raises:
            KeyError: if there is no such job.
        """
        self._end(job_id, "cancelled", None, note)

    def cancel(self, job_id: int) -> None:
        """Cancel a job: a queued one at once, a running one by asking its worker to stop it.

        A job that has already ended is left as it is.

        Raises:
            KeyError: if there is no such job.
        """
        with self._write() as db:
            job = self._row(db, job_id)
            if job.status == "queued":
                db.execute(
                    "UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ?",
                    (utc_now("milliseconds"), job.id),
                )
            elif job.status == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job.id,))

    def reap(self, stale_after: float = 30.0) -> list[int]:
        """Give up running jobs whose worker died; returns their ids.

        A worker is taken as dead when its last heartbeat is older than ``stale_after`` seconds,
        or when it ran on this host and its pid is gone. Its job becomes failed with the tail of
        its log, and a half-written run folder ``.tmp-<run_id>`` is renamed ``.failed-<run_id>``.
        A job whose run folder is already complete (the worker died just after writing it)
        becomes done instead.
        """
        host, now = socket.gethostname(), time.time()
        with self._connect() as db:
            running = db.execute(
                "SELECT id, pid, host, heartbeat FROM jobs WHERE status = 'running' ORDER BY id"
            ).fetchall()
        reaped = []
        for job_id, pid, job_host, heartbeat in running:
            age = now - (heartbeat or 0.0)
            gone = pid is not None and job_host == host and not _pid_alive(pid)
            if age <= stale_after and not gone:
                continue
            error = (
                f"worker died (pid {pid} is gone; last heartbeat {age:.0f} s ago)"
                if gone
                else f"worker died (stale heartbeat: last one {age:.0f} s ago)"
            )
            tail = log_tail(self.log_path(job_id))
            with self._write() as db:
                current = self._row(db, job_id)
                if current.status != "running" or current.heartbeat != heartbeat:
                    continue  # it reported (or ended) meanwhile: alive after all
                run_id = current.run_id
                complete = run_id is not None and _complete_run(self.runs_root, run_id)
                db.execute(
                    "UPDATE jobs SET status = ?, finished = ?, error = ? WHERE id = ?",
                    (
                        "done" if complete else "failed",
                        utc_now("milliseconds"),
                        None if complete else error + ("\n" + tail if tail else ""),
                        job_id,
                    ),
                )
            if run_id is not None and not complete:
                self._give_up_run(run_id, f"job {job_id}: {error}")
            reaped.append(job_id)
        return reaped

    def _give_up_run(self, run_id: str, message: str) -> None:
        # The same rename RunWriter makes on an exception, so list_runs never sees it.
        from core.runs import FAILED_PREFIX, LOG_FILE, TMP_PREFIX, run_path  # see below

        try:
            partial = run_path(self.runs_root, run_id, prefix=TMP_PREFIX)
            failed = run_path(self.runs_root, run_id, prefix=FAILED_PREFIX)
        except ValueError:  # not a run id: nothing of ours to give up
            return
        if not partial.is_dir() or failed.exists():
            return
        with open(partial / LOG_FILE, "a", encoding="utf-8") as file:
            file.write(f"{utc_now()} {message}\n")
        move_folder(partial, failed)


def _complete_run(runs_root: Path, run_id: str) -> bool:
    # Imported here, not at the top: core.runs loads pandas and pyarrow, and a worker that finds
    # the lock taken must exit at once.
    from core.runs import METRICS_FILE, run_path

    # RunWriter renames a run to its own name only once it is complete.
    try:
        return (run_path(runs_root, run_id) / METRICS_FILE).is_file()
    except ValueError:  # not a run id, or a link out of the runs folder: never complete
        return False


def log_tail(path: str | PathLike, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file; "" if it is missing."""
    try:
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            file.seek(max(0, file.tell() - 200 * max(lines, 1) - 4096))
            text = file.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""


def worker_alive(runs_root: str | PathLike) -> bool:
    """Whether a worker holds ``runs_root/.jobs/worker.lock`` (probed, never held)."""
    path = Path(runs_root) / JOBS_DIR / LOCK_FILE
    try:
        file = open(path, "rb")  # noqa: SIM115 -- closed below, after the probe
    except FileNotFoundError:
        return False
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(file, fcntl.LOCK_UN)
        return False


def start_worker(
    data_root: str | PathLike, *, exit_when_idle: float = 60.0, processes: int = 1
) -> subprocess.Popen:
    """Start ``python -m train worker`` (the installed package) for ``data_root`` in the background, detached.

    It runs the queue of ``data_root/runs`` and exits after ``exit_when_idle`` seconds with
    nothing queued. A worker started while another one holds the lock exits at once, so calling
    this when :func:`worker_alive` is false is enough; its output is appended to
    ``runs/.jobs/worker.log``.

    Args:
        data_root: the data root (not its runs folder); made absolute, as the worker runs in the
            data root.
        exit_when_idle: seconds of empty queue before the worker exits.
        processes: training processes per job (``--processes``; above 1, torchrun).
    """
    root = DataRoot(Path(data_root).resolve())
    log_dir = root.runs / JOBS_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "train",
        "worker",
        "--data",
        str(root.root),
        "--exit-when-idle",
        str(exit_when_idle),
        "--processes",
        str(processes),
    ]
    with open(log_dir / WORKER_LOG, "ab") as log:
        # A new session: the worker outlives the dashboard and gets none of its signals.
        return subprocess.Popen(
            command,
            cwd=root.root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
