"""The dashboard end to end in a real browser: ``stadsbeeld dashboard`` driven by Chromium (Playwright).

The server runs on a copy of the tiny demo city with retraining on; the test checks that the
city map renders, trains a small fusion model from the sidebar form and waits for the worker to
finish it, then screenshots every page. A few of the dashboard's bad-input cases
(``tests/bad_inputs/test_dashboard_cases.py``) run here too, on damaged copies of the tiny city
served with retraining off: a corrupt job store, an unreadable run, bad street images and a
data root without ``runs/``; every page renders with its note, and nothing stored changes. Chromium is Debian's (``apt-get install chromium``, as
``.ci/run`` does); Playwright never downloads a browser here.

Screenshots go to ``$STADSBEELD_SCREENSHOTS`` when set (the README's come from
``docs/screenshots``), else to a temporary folder. ``$STADSBEELD_E2E_DATA`` points the server at
an existing data root instead of the tiny copy (screenshots only, no training), e.g. the README
screenshots of the whole demo city::

    STADSBEELD_E2E_DATA=data/demo STADSBEELD_SCREENSHOTS=docs/screenshots \\
        .venv/bin/python -m pytest tests/test_browser.py
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.dataroot import DataRoot
from core.experiments import AERIAL_GSV
from core.grid import read_grid
from core.jobs import DB_FILE, LOCK_FILE, JobStore, worker_alive
from core.runs import PREDICTIONS_FILE
from tests.bad_inputs.damage import (
    png_header,
    snapshot,
    street_images_of_a_cell,
    truncate,
    write_prediction,
    write_run,
)

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 1000}
#: Sidebar link -> screenshot file, in the order of the navigation.
PAGES = {
    "City map": "city-map.png",
    "Predicted vs true": "predicted-vs-true.png",
    "Sources compared": "gsv-vs-flickr.png",
    "Coverage gaps": "coverage-gaps.png",
    "Monitor": "monitor.png",
    "Embedding neighbours": "embedding-neighbours.png",
    "Runs": "runs.png",
}
#: Console noise of an offline machine: the base-map style and icon fonts cannot load.
OFFLINE_NOISE = (
    "ERR_NAME_NOT_RESOLVED",
    "Failed to fetch",
    "ERR_INTERNET_DISCONNECTED",
    "GPU stall due to ReadPixels",
)


@dataclass
class Dashboard:
    url: str
    root: Path
    trains: bool  # False on an existing data root: screenshots only
    log: Path
    console: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.read().decode().strip() == "ok"
    except OSError:
        return False


def _worker_pids(root: Path) -> set[int]:
    """Pids of the training workers of ``root``: the lock holder and the running jobs' pids."""
    runs = DataRoot(root).runs
    pids: set[int] = set()
    if worker_alive(runs):
        text = (JobStore.for_runs(runs).log_dir / LOCK_FILE).read_text().strip()
        if text.isdigit():
            pids.add(int(text))
    if (runs / "jobs.sqlite").is_file():
        pids |= {job.pid for job in JobStore.for_runs(runs).jobs(["running"], limit=500) if job.pid}
    return pids


def _is_worker_of(pid: int, root: Path) -> bool:
    """Whether ``pid`` is still a ``python -m train worker`` on ``root`` (pids get reused)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"worker" in argv and str(root.resolve()).encode() in argv


def _stop(pids: set[int], alive: Callable[[int], bool], grace: float = 10.0) -> None:
    """SIGTERM each pid that is ``alive``, then SIGKILL what is left after ``grace`` seconds."""
    pids = {pid for pid in pids if alive(pid)}
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.2)
        pids = {pid for pid in pids if alive(pid)}
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


@contextmanager
def serve(root: Path, tmp_path_factory, retrain: bool, trains: bool = False) -> Iterator[Dashboard]:
    """``stadsbeeld dashboard --retrain true|false`` on ``root`` until the block ends.

    The installed command, started outside the repository: no path or directory workaround.
    Stopping it stops the server's process group and, with retraining on, any training worker it
    started (the worker runs in a session of its own, so it would outlive the server by its idle
    timeout). With retraining off no worker can start, and the job store is left unopened.
    """
    workers_before = _worker_pids(root) if retrain else set()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("browser-log") / "streamlit.log"
    env = {**os.environ, "STADSBEELD_DATA": str(root)}
    env.pop("STADSBEELD_START_WORKER", None)
    command = [sys.executable, "-m", "train", "dashboard", "--port", str(port)]
    command += ["--retrain", "true" if retrain else "false"]
    with open(log, "wb") as out:
        server = subprocess.Popen(
            command,
            cwd=tmp_path_factory.mktemp("elsewhere"),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not _healthy(url):
            assert server.poll() is None, (
                f"streamlit exited ({server.returncode}):\n{log.read_text()}"
            )
            assert time.monotonic() < deadline, f"no health answer in 60 s:\n{log.read_text()}"
            time.sleep(0.3)
        yield Dashboard(url, root, trains=trains, log=log)
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
        if retrain:
            _stop(_worker_pids(root) - workers_before, lambda pid: _is_worker_of(pid, root))


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, request) -> Iterator[Dashboard]:
    """``stadsbeeld dashboard --retrain`` on a copy of the tiny demo city (see :func:`serve`)."""
    existing = os.environ.get("STADSBEELD_E2E_DATA")
    if existing:
        root = Path(existing).resolve()
        assert (root / "grid.parquet").is_file(), (
            f"STADSBEELD_E2E_DATA={existing} holds no data root"
        )
    else:
        root = tmp_path_factory.mktemp("browser") / "city"
        shutil.copytree(request.getfixturevalue("tiny_demo"), root)
    with serve(root, tmp_path_factory, retrain=True, trains=not existing) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@contextmanager
def new_page(browser, dashboard: Dashboard) -> Iterator[object]:
    """A fresh browser context on ``dashboard``, collecting its console errors and warnings."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(60_000)
    dashboard.console.clear()
    page.on(
        "console",
        lambda m: (
            dashboard.console.append(f"{m.type}: {m.text}")
            if m.type in ("error", "warning") and not any(n in m.text for n in OFFLINE_NOISE)
            else None
        ),
    )
    page.on("pageerror", lambda error: dashboard.console.append(f"pageerror: {error}"))
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def page(browser, dashboard):
    with new_page(browser, dashboard) as page:
        yield page


def settle(page, seconds: float = 1.5) -> None:
    """Wait until Streamlit has finished running the script, then let WebGL and charts draw."""
    finished = '[data-testid="stApp"][data-test-script-state="notRunning"]'
    page.locator(finished).wait_for(timeout=120_000)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="detached", timeout=120_000)
    page.locator('[data-testid="stSpinner"]').wait_for(state="detached", timeout=120_000)
    page.wait_for_timeout(seconds * 1000)


def open_page(page, title: str, seconds: float = 1.5) -> None:
    """Follow the sidebar link to a page and wait for its title and its script to finish."""
    page.locator('[data-testid="stSidebarNavLink"]', has_text=title).click()
    page.get_by_role("heading", name=title, exact=True).wait_for()
    settle(page, seconds)


def capture_pages(page, out_dir: Path) -> list[Path]:
    """Screenshot every page, in the navigation's order, into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shots = []
    for title, name in PAGES.items():
        open_page(page, title)
        if page.locator('[data-testid="stDeckGlJsonChart"]').count():
            page.locator('[data-testid="stDeckGlJsonChart"] canvas').first.wait_for()
            page.wait_for_timeout(1500)  # SwiftShader draws the deck a moment after the DOM
        assert not page.locator('[data-testid="stException"]').count(), f"{title}: exception shown"
        shots.append(out_dir / name)
        page.screenshot(path=shots[-1])
    return shots


def screenshot_dir(tmp_path: Path) -> Path:
    return (
        Path(os.environ["STADSBEELD_SCREENSHOTS"])
        if os.environ.get("STADSBEELD_SCREENSHOTS")
        else tmp_path
    )


def sidebar_text(page) -> str:
    return page.locator('[data-testid="stSidebarUserContent"]').inner_text()


def select(page, label: str, option: str) -> None:
    """Choose ``option`` in the Streamlit selectbox labelled ``label``."""
    combobox = page.locator('[data-testid="stSidebar"]').get_by_role(
        "combobox", name=label, exact=True
    )
    combobox.click()
    page.get_by_role("option", name=option, exact=True).click()
    sync_api.expect(combobox).to_have_value(option)


def map_pixels(page) -> np.ndarray:
    """The first deck.gl map as an ``(n, 3)`` array of RGB pixels."""
    from PIL import Image

    png = page.locator('[data-testid="stDeckGlJsonChart"]').first.screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3).astype(int)


def test_dashboard_in_a_browser_trains_a_model_and_shows_every_page(page, dashboard, tmp_path):
    started = time.monotonic()
    page.goto(dashboard.url)
    page.get_by_role("heading", name="City map", exact=True).wait_for()
    settle(page)

    # The map: deck.gl's canvas with a size (no base-map tiles offline; the app draws its own).
    chart = page.locator('[data-testid="stDeckGlJsonChart"]').first
    canvas = chart.locator("canvas#deckgl-overlay")
    canvas.wait_for()
    box = canvas.bounding_box()
    assert box and box["width"] > 300 and box["height"] > 300, box
    assert page.evaluate("() => document.querySelector('canvas#deckgl-overlay').width") > 0
    main = page.locator('[data-testid="stMain"]')
    assert "Cells shown" in main.inner_text()
    legend = main.locator('[data-testid="stMarkdownContainer"] b', has_text="overall score (lbm)")
    assert legend.count() == 1
    swatches = legend.locator("xpath=..").locator('span[style*="background: rgb"]')
    assert swatches.count() == 5  # the five stops of the score palette
    sidebar = sidebar_text(page)
    assert "Training jobs" in sidebar and "Data root" in sidebar
    assert not page.locator('[data-testid="stException"]').count()
    phases = {"city map": time.monotonic() - started}

    if dashboard.trains:
        store = JobStore.for_runs(DataRoot(dashboard.root).runs)
        before = {job.id for job in store.jobs(limit=500)}
        select(page, "Imagery", "aerial only")
        epochs = page.locator('[data-testid="stNumberInput"]', has_text="Epochs").locator("input")
        epochs.fill("2")
        epochs.press("Tab")
        blocks = page.locator('[data-testid="stNumberInput"]', has_text="Split block size")
        blocks.locator("input").fill("300")  # the tiny city has no test block of 1000 m
        blocks.locator("input").press("Tab")
        page.locator('[data-testid="stFormSubmitButton"] button', has_text="Train").click()

        new: list = []
        deadline = time.monotonic() + 30
        while not new:
            assert time.monotonic() < deadline, "pressing Train queued no job"
            page.wait_for_timeout(250)
            new = [job for job in store.jobs(limit=500) if job.id not in before]
        job = new[0]
        assert job.kind == "fusion" and job.config["ground"] is None and job.config["epochs"] == 2
        assert job.config["block_size"] == 300

        # The queue fragment redraws every 2 s: running with "epoch i/2", then "✓ #id ...".
        done_line, saw_epoch, seen = f"✓ #{job.id} fusion aerial", False, ""
        deadline = time.monotonic() + 120
        while done_line not in seen:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job.id} not done in 120 s: {store.get(job.id)}\n"
                    f"sidebar:\n{seen}\nworker log:\n{_worker_log(dashboard.root)}"
                )
            assert store.get(job.id).status not in ("failed", "cancelled"), store.get(job.id)
            seen = sidebar_text(page)
            saw_epoch = saw_epoch or re.search(r"epoch \d+/2\b", seen) is not None
            page.wait_for_timeout(300)
        job = store.get(job.id)
        assert job.status == "done" and job.run_id
        assert f"run `{job.run_id}`" in seen or job.run_id in seen
        assert (DataRoot(dashboard.root).runs / job.run_id / "metrics.json").is_file()
        print(f"job #{job.id} done as {job.run_id}; progress seen while running: {saw_epoch}")
        phases["training"] = time.monotonic() - started - sum(phases.values())

    shots = capture_pages(page, screenshot_dir(tmp_path))
    phases["screenshots"] = time.monotonic() - started - sum(phases.values())
    assert [p.name for p in shots] == list(PAGES.values()) and all(
        p.stat().st_size > 10_000 for p in shots
    )

    if dashboard.trains:  # the Runs page lists the finished job in its jobs table
        jobs_table = page.locator('[data-testid="stDataFrame"]').last
        assert jobs_table.get_by_text("done", exact=True).count() >= 1, jobs_table.inner_text()
        assert page.locator('[data-testid="stMain"]').get_by_text(job.run_id).count()
    assert not [m for m in dashboard.console if m.startswith("pageerror")], dashboard.console
    print(
        f"browser test took {time.monotonic() - started:.1f} s "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in phases.items())}); screenshots in {shots[0].parent}"
    )


def _worker_log(root: Path) -> str:
    path = JobStore.for_runs(DataRoot(root).runs).log_dir / "worker.log"
    return path.read_text()[-3000:] if path.is_file() else "(no worker log)"


def test_the_city_map_shows_the_coloured_grid(page, dashboard):
    page.goto(dashboard.url)
    page.get_by_role("heading", name="City map", exact=True).wait_for()
    settle(page, 3)
    pixels = map_pixels(page)
    colourful = (pixels.max(1) - pixels.min(1)) > 60  # grid colours; greys and white are not
    not_water = np.abs(pixels - [166, 206, 227]).sum(1) > 40
    grid = int((colourful & not_water).sum())
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    assert grid >= 100, (
        f"{grid} grid-coloured pixels on the map; most common colour "
        f"{colours[counts.argmax()].tolist()} on {counts.max() / len(pixels):.0%} "
        f"of it; console: {dashboard.console}"
    )


def test_clicking_a_cell_opens_its_detail_panel(page, dashboard):
    page.goto(dashboard.url)
    page.get_by_role("heading", name="City map", exact=True).wait_for()
    settle(page, 3)
    canvas = page.locator('[data-testid="stDeckGlJsonChart"] canvas#deckgl-overlay').first
    box = canvas.bounding_box()
    # The map opens on the data root's extent, so its centre lies on a scored cell.
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    heading = page.get_by_role("heading", name=re.compile(r"^Cell \d+$"))
    heading.wait_for(timeout=60_000)
    settle(page)
    main = page.locator('[data-testid="stMain"]').inner_text()
    assert "Street View" in main and "Flickr" in main
    assert page.locator('[data-testid="stMain"] [data-testid="stImage"]').count() >= 1


# -- bad inputs in a browser: a few of tests/bad_inputs/test_dashboard_cases.py, served for real --


@dataclass
class DamagedCity:
    """A damaged copy of the tiny demo city, served with retraining off."""

    dashboard: Dashboard
    before: dict[str, tuple]  # snapshot() of the root after the damage, before the server
    older: str  # a good run
    newest: str  # the run whose predictions.parquet is truncated
    cell: int  # the cell whose street images are an HTML page and an image bomb
    images: dict[str, str]  # those images' catalog paths -> the placeholder the panel shows
    predictions: dict[int, str]  # year -> prediction folder id: 2020, 2022 good; 2024, 2026 not


def visit_every_page(page, dashboard: Dashboard) -> Iterator[str]:
    """Open the dashboard, then each page by its sidebar link; yields each page's title once its
    script has finished and no exception box is shown."""
    page.goto(dashboard.url)  # opens the first page, the city map
    for i, title in enumerate(PAGES):
        if i:
            page.locator('[data-testid="stSidebarNavLink"]', has_text=title).click()
        page.get_by_role("heading", name=title, exact=True).wait_for()
        settle(page, 0)
        exceptions = page.locator('[data-testid="stException"]')
        assert not exceptions.count(), f"{title}: {exceptions.first.inner_text()}"
        yield title


def sidebar_warnings(page) -> list[str]:
    """The text of each warning in the sidebar (without its icon)."""
    return page.locator(
        '[data-testid="stSidebar"] [data-testid="stAlert"] [data-testid="stMarkdownContainer"]'
    ).all_inner_texts()


@pytest.fixture(scope="module")
def damaged_city(tmp_path_factory, tiny_demo) -> Iterator[DamagedCity]:
    """The tiny demo city with four of the corpus's dashboard damages at once: garbage bytes as
    ``runs/jobs.sqlite``, the newer of two runs with a truncated ``predictions.parquet``, one
    cell's GSV images replaced by an HTML page and a 30000x30000 PNG bomb (alternately), and, of
    four predictions by those two runs (2020 to 2026), 2024's with a truncated
    ``predictions.parquet`` and 2026's without its ``uncertainty`` column."""
    root = tmp_path_factory.mktemp("damaged") / "city"
    shutil.copytree(tiny_demo, root)
    runs = DataRoot(root).runs
    ids = read_grid(DataRoot(root).grid)["cell_id"].to_numpy()
    older = write_run(runs, ids, AERIAL_GSV)
    newest = write_run(runs, ids, "aerial")
    predictions = {y: write_prediction(runs, ids, y, [older, newest]) for y in range(2020, 2027, 2)}
    truncate(runs / newest / PREDICTIONS_FILE)
    truncate(runs / predictions[2024] / PREDICTIONS_FILE)
    without = runs / predictions[2026] / PREDICTIONS_FILE
    pd.read_parquet(without).drop(columns="uncertainty").to_parquet(without)
    (runs / DB_FILE).write_bytes(b"this is not a database\n" * 200)
    cell, paths = street_images_of_a_cell(root, at_least=2)
    damages = [
        (b"<html>not an image</html>", "not a readable image"),
        (png_header(30000, 30000), "too large to show"),
    ]
    images = {}
    for i, relative in enumerate(paths):
        content, note = damages[i % 2]
        (DataRoot(root).catalog.parent / relative).write_bytes(content)
        images[relative] = note
    before = snapshot(root)
    with serve(root, tmp_path_factory, retrain=False) as server:
        yield DamagedCity(server, before, older, newest, cell, images, predictions)


def test_a_broken_job_store_and_an_unreadable_run_in_a_browser(browser, damaged_city):
    """Every page renders and its sidebar names the unreadable job store and the skipped run; the
    run pickers offer only the good run."""
    city = damaged_city
    runs = DataRoot(city.dashboard.root).runs
    store_note = f"job store unreadable: {runs / DB_FILE}: "
    skip_note = f"skipping run {city.newest}: {runs / city.newest / PREDICTIONS_FILE}"
    with new_page(browser, city.dashboard) as page:
        for title in visit_every_page(page, city.dashboard):
            notes = sidebar_warnings(page)
            store = [n for n in notes if "job store" in n]
            assert len(store) == 1 and store[0].startswith(store_note), (title, notes)
            skipped = [n for n in notes if city.newest in n]
            assert len(skipped) == 1 and skipped[0].startswith(skip_note), (title, notes)
            if title == "Predicted vs true":
                run = page.locator('[data-testid="stMain"]').get_by_role(
                    "combobox", name="Run", exact=True
                )
                assert city.older in run.input_value(), run.input_value()
                run.click()
                page.get_by_role("option").first.wait_for()
                options = page.get_by_role("option").all_inner_texts()
                page.keyboard.press("Escape")
                assert any(city.older in o for o in options), options
                assert not any(city.newest in o for o in options), options
    assert not [m for m in city.dashboard.console if m.startswith("pageerror")], (
        city.dashboard.console
    )
    assert snapshot(city.dashboard.root) == city.before


def test_damaged_prediction_folders_on_the_monitor_page_in_a_browser(browser, damaged_city):
    """The Monitor page draws the change of the two good predictions; the sidebar names the one
    whose file is unreadable, the page the one that lacks a column a change needs."""
    city = damaged_city
    runs = DataRoot(city.dashboard.root).runs
    truncated, incomplete = (runs / city.predictions[y] for y in (2024, 2026))
    with new_page(browser, city.dashboard) as page:
        page.goto(city.dashboard.url)
        settle(page, 0)
        open_page(page, "Monitor", seconds=0)
        assert not page.locator('[data-testid="stException"]').count()
        skipped = [n for n in sidebar_warnings(page) if truncated.name in n]
        assert len(skipped) == 1 and str(truncated / PREDICTIONS_FILE) in skipped[0], skipped
        main = page.locator('[data-testid="stMain"]')
        notes = main.locator('[data-testid="stAlert"]').all_inner_texts()
        assert [n for n in notes if f"skipping prediction {incomplete.name}: {incomplete}" in n], (
            notes
        )
        assert not [n for n in notes if truncated.name in n], notes  # said once, in the sidebar
        pair = main.get_by_role("combobox", name="Predictions").input_value()
        assert pair.startswith("2022 vs 2020") and pair.endswith(
            f"{city.predictions[2022]} / {city.predictions[2020]}"
        ), pair
        main.locator('[data-testid="stDeckGlJsonChart"]').first.wait_for()
        assert "Cells predicted" in main.inner_text()
    assert not [m for m in city.dashboard.console if m.startswith("pageerror")], (
        city.dashboard.console
    )
    assert snapshot(city.dashboard.root) == city.before


def test_bad_street_images_show_placeholders_in_a_browser(browser, damaged_city):
    """The cell panel shows a placeholder naming each bad image and why it is not shown."""
    city = damaged_city
    with new_page(browser, city.dashboard) as page:
        # Choose the cell on the neighbours page (typed, as a user would), then open the map.
        page.goto(f"{city.dashboard.url}/neighbours")
        page.get_by_role("heading", name="Embedding neighbours", exact=True).wait_for()
        settle(page, 0)
        main = page.locator('[data-testid="stMain"]')
        typed = main.get_by_role("textbox", name="Cell id")
        typed.fill(str(city.cell))
        typed.press("Enter")
        main.get_by_text(f"cells nearest to cell {city.cell}").wait_for()
        settle(page, 0)
        open_page(page, "City map", seconds=0)
        page.get_by_role("heading", name=f"Cell {city.cell}", exact=True).wait_for()
        settle(page, 0)
        assert not page.locator('[data-testid="stException"]').count()
        captions = main.locator('[data-testid="stCaptionContainer"]').all_inner_texts()
        shown = list(city.images.items())[:6]  # the panel shows six images per source
        for relative, note in shown:
            assert len([c for c in captions if c.startswith(f"{relative}: {note}")]) == 1, (
                relative,
                captions,
            )
    assert snapshot(city.dashboard.root) == city.before


def test_a_data_root_without_runs_in_a_browser(browser, tiny_demo, tmp_path_factory):
    """Every page renders on a city that has trained nothing, and browsing creates no ``runs/``
    (so no job store either)."""
    root = tmp_path_factory.mktemp("runless") / "city"
    shutil.copytree(tiny_demo, root)
    assert not DataRoot(root).runs.exists()  # the tiny demo city has trained nothing yet
    before = snapshot(root)
    with serve(root, tmp_path_factory, retrain=False) as server, new_page(browser, server) as page:
        for title in visit_every_page(page, server):
            assert "No training jobs yet." in sidebar_text(page), title
            if title == "Sources compared":
                info = page.locator('[data-testid="stMain"] [data-testid="stAlert"]')
                assert any("No fusion runs yet" in t for t in info.all_inner_texts()), title
    assert not DataRoot(root).runs.exists()
    assert snapshot(root) == before


def test_the_html_export_draws_its_layer_offline(browser, tiny_demo, tmp_path):
    from core.exports import write_layer
    from core.layers import map_layer

    layer = map_layer(tiny_demo, "lbm")
    path = write_layer(layer, tmp_path / "lbm.html")
    context = browser.new_context(viewport=VIEWPORT, offline=True)
    page = context.new_page()
    problems = []
    page.on("pageerror", lambda error: problems.append(f"pageerror: {error}"))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    try:
        page.goto(path.as_uri())
        shapes = page.locator(".leaflet-overlay-pane path")
        shapes.first.wait_for()
        assert shapes.count() == len(layer.table), problems
        drawn = shapes.evaluate_all("paths => paths.map(p => p.getAttribute('fill'))")
        expected = ["#{:02x}{:02x}{:02x}".format(*c) for c in layer.colours]
        assert sorted(drawn) == sorted(expected)
        shapes.first.dispatch_event("mouseover")
        tooltip = page.locator(".leaflet-tooltip")
        tooltip.wait_for()
        assert "overall score (lbm)" in tooltip.inner_text()
        assert layer.legend.title in page.locator("#legend").inner_text()
        assert str(DataRoot(tiny_demo).scores) in page.locator("#sources").inner_text()
        assert not problems
    finally:
        context.close()
