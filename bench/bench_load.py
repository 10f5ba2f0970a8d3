"""Load on a live dashboard: many sessions switching layers on the city map at once.

The server is the real one (``python -m train dashboard`` on 127.0.0.1, retraining off) on a
scratch data root that links the demo city's inputs and runs. Each simulated session speaks
Streamlit's own websocket protocol, as the browser does: it opens ``/_stcore/stream``, asks
for a script run, reads the page's widgets from the deltas it gets back, and then, for the
whole duration, picks another layer, year or run the way a user clicks through the map
selectboxes, waiting a think time between clicks. It also answers the sidebar's
auto-refreshing fragment as the browser would. A rerun's time is from sending the widget
change to the server's ``script_finished``, so it includes the map payload's transfer; the
browser's drawing is not included (the real-browser test covers that the map draws).

Server memory is the resident set of the server process tree, sampled every 0.25 s, for one
session and for many: it should be bounded by the layer caches, not grow with the sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import websockets
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

from bench.bench_dashboard import scratch_root
from bench.common import register
from core.dataroot import DataRoot
from core.runs import RunWriter
from core.sources.lbm import read_lbm

#: The city map's selectboxes a user switches, by label (the run picker changes the layers).
SWITCHED = ("Scores from", "Layer", "Year", "Cells")
FINISHED = {
    ForwardMsg.ScriptFinishedStatus.FINISHED_SUCCESSFULLY,
    ForwardMsg.ScriptFinishedStatus.FINISHED_FRAGMENT_RUN_SUCCESSFULLY,
}


@dataclass
class Widget:
    id: str
    options: list[str]
    value: str


@dataclass
class Session:
    """One browser tab: its widgets' current values and what it measured."""

    widgets: dict[str, Widget] = field(default_factory=dict)
    first_page_s: float = 0.0
    fragments: dict[str, float] = field(default_factory=dict)  # fragment id -> interval s
    reruns_s: list[float] = field(default_factory=list)
    fragment_reruns_s: list[float] = field(default_factory=list)
    drawn: set[str] = field(default_factory=set)  # selectbox labels of the last run
    texts: list[str] = field(default_factory=list)  # markdown of the last run
    received_bytes: int = 0
    errors: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(root: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "train", "dashboard", "--data", str(root)]
    command += ["--port", str(port), "--retrain", "false"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"dashboard server exited with {server.returncode}") from None
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("dashboard server did not answer its health check within 120 s")


def _stop_server(server: subprocess.Popen) -> None:
    for process in [*psutil.Process(server.pid).children(recursive=True), server]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()


class MemorySampler(threading.Thread):
    """Resident set size (bytes) of a process and its children, every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.process, self.interval = psutil.Process(pid), interval
        self.samples: list[int] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.samples.append(sum(p.memory_info().rss for p in tree))
            except psutil.NoSuchProcess:
                return
            self._stop_event.wait(self.interval)

    def stop(self) -> list[int]:
        self._stop_event.set()
        self.join()
        return self.samples


def _read_deltas(session: Session, message: ForwardMsg) -> None:
    """Note the selectboxes the page drew and any exception it showed."""
    if message.WhichOneof("type") == "auto_rerun":
        session.fragments[message.auto_rerun.fragment_id] = message.auto_rerun.interval
        return
    if message.WhichOneof("type") != "delta" or message.delta.WhichOneof("type") != "new_element":
        return
    element = message.delta.new_element
    kind = element.WhichOneof("type")
    if kind == "markdown":
        session.texts.append(element.markdown.body)
    elif kind == "exception":
        session.errors.append(f"{element.exception.type}: {element.exception.message}")
    elif kind == "selectbox" and element.selectbox.label in SWITCHED:
        box = element.selectbox
        options = list(box.options)
        current = session.widgets.get(box.label)
        value = (
            current.value
            if current and current.id == box.id and current.value in options
            else options[box.default]
        )
        session.widgets[box.label] = Widget(box.id, options, value)
        session.drawn.add(box.label)


async def _rerun(ws, session: Session, fragment_id: str = "") -> float:
    """Ask for a script run with the session's widget values; seconds until it finished."""
    back = BackMsg()
    state = back.rerun_script
    state.page_name = ""
    if fragment_id:
        state.fragment_id, state.is_auto_rerun = fragment_id, True
    for widget in session.widgets.values():
        entry = state.widget_states.widgets.add()
        entry.id, entry.string_value = widget.id, widget.value
    start = time.perf_counter()
    await ws.send(back.SerializeToString())
    if not fragment_id:
        session.drawn.clear()
        session.texts.clear()
    while True:
        raw = await ws.recv()
        session.received_bytes += len(raw)
        message = ForwardMsg()
        message.ParseFromString(raw)
        _read_deltas(session, message)
        if message.WhichOneof("type") == "script_finished":
            if not fragment_id:  # widgets the page no longer draws are gone
                session.widgets = {k: v for k, v in session.widgets.items() if k in session.drawn}
            status = message.script_finished
            if status not in FINISHED:
                session.errors.append(f"script finished with status {status}")
            return time.perf_counter() - start


async def _browse(
    url: str, session: Session, duration_s: float, think_s: float, rng: random.Random
) -> None:
    """One tab: open the city map, then switch selectboxes for ``duration_s``."""
    origin = url.replace("ws://", "http://").split("/_stcore")[0]
    async with websockets.connect(
        url, subprotocols=["streamlit"], max_size=None, origin=origin
    ) as ws:
        session.first_page_s = await _rerun(ws, session)
        until = time.monotonic() + duration_s
        last_fragment = time.monotonic()
        while time.monotonic() < until:
            label = rng.choice([label for label in SWITCHED if label in session.widgets])
            widget = session.widgets[label]
            others = [o for o in widget.options if o != widget.value] or widget.options
            widget.value = rng.choice(others)
            session.reruns_s.append(await _rerun(ws, session))
            pause_until = time.monotonic() + rng.uniform(0.5, 1.5) * think_s
            while time.monotonic() < pause_until:
                for fragment, interval in list(session.fragments.items()):
                    if time.monotonic() - last_fragment >= interval:
                        session.fragment_reruns_s.append(await _rerun(ws, session, fragment))
                        last_fragment = time.monotonic()
                await asyncio.sleep(min(0.1, max(0.0, pause_until - time.monotonic())))


async def _load(port: int, sessions: int, duration_s: float, think_s: float) -> list[Session]:
    url = f"ws://127.0.0.1:{port}/_stcore/stream"
    tabs = [Session() for _ in range(sessions)]
    await asyncio.gather(
        *(_browse(url, tab, duration_s, think_s, random.Random(i)) for i, tab in enumerate(tabs))
    )
    return tabs


def _prediction_runs(root: Path, count: int) -> None:
    """``count`` fusion-like runs whose predictions are the latest labels plus noise, so the
    run picker and the run layers have something to switch between (training them is not
    what this benchmark measures)."""
    paths = DataRoot(root)
    labels = pd.DataFrame(read_lbm(paths.scores, paths.lbm_grid).drop(columns="geometry"))
    latest = labels[labels["jaar"] == labels["jaar"].max()].dropna(subset=["lbm"])
    rng = np.random.default_rng(0)
    splits = rng.choice(["train", "val", "test"], len(latest), p=[0.7, 0.15, 0.15])
    for index in range(count):
        predicted = latest["lbm"].to_numpy() + rng.normal(0, 0.1, len(latest))
        config = {
            "label": f"load probe {index}",
            "target": "lbm",
            "year": int(latest["jaar"].max()),
        }
        with RunWriter(paths.runs, "fusion", config) as run:
            run.write_metrics({"label": config["label"]})
            run.write_predictions(
                pd.DataFrame(
                    {
                        "cell_id": latest["cell_id"].to_numpy(),
                        "split": splits,
                        "true": latest["lbm"].to_numpy(),
                        "predicted": predicted,
                        "residual": predicted - latest["lbm"].to_numpy(),
                    }
                )
            )


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if values else 0.0


def _level(root: Path, sessions: int, duration_s: float, think_s: float) -> dict[str, Any]:
    """One server, ``sessions`` tabs for ``duration_s``; rerun times and server memory."""
    port = _free_port()
    server = _start_server(root, port)
    try:
        sampler = MemorySampler(server.pid)
        sampler.start()
        idle_rss = None
        while idle_rss is None:  # the first sample: the server before any session
            time.sleep(0.05)
            idle_rss = sampler.samples[0] if sampler.samples else None
        tabs = asyncio.run(_load(port, sessions, duration_s, think_s))
        samples = sampler.stop()
    finally:
        _stop_server(server)
    reruns = [t for tab in tabs for t in tab.reruns_s]
    fragments = [t for tab in tabs for t in tab.fragment_reruns_s]
    errors = [e for tab in tabs for e in tab.errors]
    return {
        "sessions": sessions,
        "first_page_max_s": max(tab.first_page_s for tab in tabs),
        "reruns": len(reruns),
        "rerun_p50_s": _percentile(reruns, 50),
        "rerun_p95_s": _percentile(reruns, 95),
        "rerun_max_s": max(reruns, default=0.0),
        "fragment_reruns": len(fragments),
        "fragment_rerun_p95_s": _percentile(fragments, 95),
        "errors": len(errors),
        "first_errors": errors[:5],
        "received_mb": sum(tab.received_bytes for tab in tabs) / 2**20,
        "server_rss_idle_mb": idle_rss / 2**20,
        "server_rss_peak_mb": max(samples) / 2**20,
        "server_rss_end_mb": samples[-1] / 2**20,
    }


@register(
    "dashboard_load", city="data/demo", sessions=(1, 20, 40), duration_s=60.0, think_s=1.0, runs=2
)
def bench_dashboard_load(
    city: str, sessions: tuple[int, ...], duration_s: float, think_s: float, runs: int
) -> dict[str, Any]:
    """Sessions that switch the city map's run, layer, year and cells for ``duration_s`` each
    (a fresh server per level): rerun p50/p95/max, errors, and the server's resident memory."""
    with tempfile.TemporaryDirectory() as folder:
        root = scratch_root(Path(city), Path(folder))
        _prediction_runs(root, runs)
        load_before = os.getloadavg()[0]
        levels = {f"sessions_{n}": _level(root, n, duration_s, think_s) for n in sessions}
        levels["load_average_before"] = load_before
    return {
        **levels,
        "load_average_after": os.getloadavg()[0],  # the machine is shared: read with it
        "targets": {"rerun_p95_s_max": 2.0, "errors": 0},
    }
