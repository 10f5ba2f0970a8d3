"""Bad inputs for the dashboard and its access rules: one bad file or one stranger never breaks a
page, and browsing never changes what is stored.

Each case asserts the class of outcome (every page renders, with a note naming the file, or a
clear refusal) and that nothing stored changed (the bytes and mtimes of every file under the data
root, and no new files or folders), except where a job is queued on purpose.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
import yaml
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

from core.dataroot import DataRoot
from core.experiments import AERIAL_GSV
from core.grid import read_grid
from core.jobs import DB_FILE, JobStore, QueueFull
from core.runs import EMBEDDINGS_FILE, PREDICTIONS_FILE, load_run
from tests.bad_inputs.damage import (
    png_header,
    snapshot,
    street_images_of_a_cell,
    truncate,
    write_prediction,
    write_run,
)

REPO = Path(__file__).resolve().parents[2]
APP = str(REPO / "dashboard" / "app.py")
PAGES = [
    "views/city_map.py",
    "views/predicted.py",
    "views/sources.py",
    "views/coverage.py",
    "views/monitor.py",
    "views/neighbours.py",
    "views/runs.py",
]


#: The years of the base root's prediction folders (the Monitor page pairs them).
PREDICTED_YEARS = (2020, 2022, 2024)


@pytest.fixture(scope="module")
def base_root(tmp_path_factory, tiny_demo):
    """The tiny demo city with two runs (``older``, then ``newest``) and, made by those two, a
    prediction folder of each of :data:`PREDICTED_YEARS`, so that every visit of the Monitor page
    draws a change: (root, older, newest, {year: prediction folder's id})."""
    root = tmp_path_factory.mktemp("bad_dash") / "city"
    shutil.copytree(tiny_demo, root)
    runs = DataRoot(root).runs
    ids = read_grid(DataRoot(root).grid)["cell_id"].to_numpy()
    older = write_run(runs, ids, AERIAL_GSV)
    newest = write_run(runs, ids, "aerial")
    predictions = {y: write_prediction(runs, ids, y, [older, newest]) for y in PREDICTED_YEARS}
    return root, older, newest, predictions


@pytest.fixture
def city(base_root, tmp_path):
    """A private copy of the demo root: (root, older run id, newest run id)."""
    source, older, newest, _ = base_root
    root = tmp_path / "city"
    shutil.copytree(source, root)
    return root, older, newest


@pytest.fixture
def predictions(base_root) -> dict[int, str]:
    """The id of the prediction folder of each year in :data:`PREDICTED_YEARS` (in ``city`` too)."""
    return base_root[3]


@pytest.fixture
def env(monkeypatch):
    """Dashboard environment: retraining off, no worker, loopback address; returns a setter."""
    monkeypatch.delenv("STADSBEELD_RETRAIN", raising=False)
    monkeypatch.delenv("STADSBEELD_RETRAIN_SECRET", raising=False)
    monkeypatch.setenv("STADSBEELD_START_WORKER", "0")
    before = st_config.get_option("server.address")
    st_config.set_option("server.address", "127.0.0.1")
    yield monkeypatch
    st_config.set_option("server.address", before)


def open_app(root: Path, env, **variables: str) -> AppTest:
    env.setenv("STADSBEELD_DATA", str(root))
    for name, value in variables.items():
        env.setenv(name, value)
    st.cache_data.clear()
    st.cache_resource.clear()
    return AppTest.from_file(APP, default_timeout=120)


def visit_every_page(app: AppTest) -> None:
    app.run()
    assert not app.exception, app.exception
    for page in PAGES:
        app.switch_page(page).run()
        assert not app.exception, (page, app.exception)
        assert app.title or app.error, f"{page} shows nothing"


def sidebar_warnings(app: AppTest) -> list[str]:
    return [w.value for w in app.sidebar.warning]


def texts(app: AppTest) -> str:
    """Every note, caption and message on the current page, one per line."""
    parts = [
        e.value for kind in ("warning", "info", "error", "caption") for e in getattr(app, kind)
    ]
    return "\n".join(parts)


# -- the job store ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(b"this is not a database\n" * 200), id="garbage"),
        pytest.param(lambda p: p.write_bytes(b""), id="empty-file"),
        pytest.param(lambda p: p.mkdir(), id="a-folder"),
        pytest.param(
            lambda p: (
                __import__("sqlite3").connect(p).execute("CREATE TABLE t (x)").connection.commit()
            ),
            id="foreign-sqlite",
        ),
    ],
)
def test_a_broken_job_store_leaves_every_page_working(city, env, damage):
    root, _, _ = city
    path = DataRoot(root).runs / DB_FILE
    damage(path)
    before = snapshot(root)
    app = open_app(root, env)
    visit_every_page(app)
    notes = [w for w in sidebar_warnings(app) if "job store" in w]
    assert len(notes) == 1 and notes[0].startswith(f"job store unreadable: {path}: "), notes
    assert snapshot(root) == before


def test_a_broken_job_store_with_retraining_on_refuses_the_form(city, env):
    root, _, _ = city
    path = DataRoot(root).runs / DB_FILE
    path.write_bytes(b"\x00garbage" * 512)
    before = snapshot(root)
    app = open_app(root, env, STADSBEELD_RETRAIN="1")
    visit_every_page(app)
    assert not [b for b in app.button if b.key == "retrain_submit"]
    notes = [w for w in sidebar_warnings(app) if "job store" in w]
    assert len(notes) == 1 and notes[0].startswith(f"job store unreadable: {path}: "), notes
    assert snapshot(root) == before


def test_browsing_never_creates_the_job_store(city, env):
    # A read-only runs/ (as a non-root user sees it) works because browsing writes nothing.
    root, _, _ = city
    runs = DataRoot(root).runs
    runs.chmod(0o555)
    try:
        before = snapshot(root)
        app = open_app(root, env)
        visit_every_page(app)
        assert not (runs / DB_FILE).exists()
        assert any("No training jobs yet" in c.value for c in app.sidebar.caption)
        assert snapshot(root) == before
    finally:
        runs.chmod(0o755)


def test_browsing_reads_an_existing_store_without_writing(city, env):
    root, _, _ = city
    store = JobStore.for_runs(DataRoot(root).runs)
    job_id = store.enqueue("fusion", {"target": "won", "epochs": 2})
    before = snapshot(root)
    app = open_app(root, env)
    visit_every_page(app)
    assert any(f"#{job_id}" in c.value for c in app.sidebar.caption)
    assert not [b for b in app.button if b.key == f"cancel_{job_id}"]
    assert snapshot(root) == before


# -- runs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        (PREDICTIONS_FILE, lambda p: p.write_bytes(b"PAR1 not really parquet")),
        (PREDICTIONS_FILE, truncate),
        (PREDICTIONS_FILE, lambda p: pd.DataFrame({"cell_id": [1]}).to_parquet(p)),
        (EMBEDDINGS_FILE, lambda p: p.write_bytes(b"\x00" * 100)),
        (EMBEDDINGS_FILE, lambda p: pd.DataFrame({"x": ["a"]}).to_parquet(p)),
    ],
    ids=[
        "predictions-garbage",
        "predictions-truncated",
        "predictions-missing-columns",
        "embeddings-zeros",
        "embeddings-wrong-layout",
    ],
)
def test_an_unreadable_run_is_skipped_with_a_note(city, env, name, damage):
    root, older, newest = city
    bad = DataRoot(root).runs / newest / name
    damage(bad)
    before = snapshot(root)
    app = open_app(root, env)
    visit_every_page(app)
    notes = [w for w in sidebar_warnings(app) if newest in w]
    assert len(notes) == 1 and str(bad) in notes[0], sidebar_warnings(app)
    app.switch_page("views/predicted.py").run()
    run_choice = app.selectbox(key="pvt_run")
    assert not any(newest in str(option) for option in run_choice.options)
    assert any(older in str(option) for option in run_choice.options)
    assert older in str(run_choice.options[run_choice.index])
    assert snapshot(root) == before


def test_an_unreadable_metrics_file_is_skipped_with_a_note(city, env):
    root, older, newest = city
    bad = DataRoot(root).runs / newest / "metrics.json"
    bad.write_text("{not json", encoding="utf-8")
    before = snapshot(root)
    app = open_app(root, env)
    visit_every_page(app)
    assert any(newest in w and "metrics.json" in w for w in sidebar_warnings(app))
    assert snapshot(root) == before


def test_a_data_root_without_runs(city, env):
    root, _, _ = city
    shutil.rmtree(DataRoot(root).runs)
    before = snapshot(root)
    app = open_app(root, env)
    visit_every_page(app)
    app.switch_page("views/sources.py").run()
    assert any("No fusion runs yet" in i.value for i in app.info)
    assert not DataRoot(root).runs.exists()
    assert snapshot(root) == before


@pytest.mark.parametrize("retrain", ["0", "1"])
def test_a_folder_that_is_not_a_data_root_is_left_alone(tmp_path, env, retrain):
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n", encoding="utf-8")
    before = snapshot(folder)
    app = open_app(folder, env, STADSBEELD_RETRAIN=retrain)
    visit_every_page(app)
    assert "make demo" in app.error[0].value
    assert any("is not a data root" in i.value for i in app.sidebar.info)
    assert not (folder / "runs").exists()
    assert snapshot(folder) == before


def test_an_invalid_cap_in_the_settings_is_reported(city, env):
    root, _, _ = city
    (root / "dashboard.yaml").write_text("retraining: true\nmax_jobs_queued: lots\n", "utf-8")
    before = snapshot(root)
    app = open_app(root, env)
    visit_every_page(app)
    assert any("max_jobs_queued" in e.value for e in app.sidebar.error)
    assert not [b for b in app.button if b.key == "retrain_submit"]
    assert snapshot(root) == before


# -- prediction folders (the Monitor page) -----------------------------------------------------


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    path.write_text(yaml.safe_dump(config | changes), encoding="utf-8")


def _keep_columns(folder: Path, drop: Callable[[str], bool]) -> None:
    path = folder / PREDICTIONS_FILE
    table = pd.read_parquet(path)
    table[[c for c in table.columns if not drop(c)]].to_parquet(path)


def monitor_options(app: AppTest) -> list[str]:
    """The Monitor page's choice of two predictions (each option names both folders)."""
    return [str(option) for option in app.selectbox(key="monitor_pair").options]


def test_the_monitor_page_pairs_every_two_predictions(city, predictions, env):
    """Good input still passes: three years of one ensemble make three changes, latest first."""
    root, _, _ = city
    before = snapshot(root)
    app = open_app(root, env)
    visit_every_page(app)
    app.switch_page("views/monitor.py").run()
    assert not app.exception, app.exception
    ids = predictions
    expected = [(2024, 2022), (2024, 2020), (2022, 2020)]
    options = monitor_options(app)
    assert len(options) == 3, options
    for option, (after, earlier) in zip(options, expected, strict=True):
        assert option.startswith(f"{after} vs {earlier}") and option.endswith(
            f"{ids[after]} / {ids[earlier]}"
        ), option
    assert [m.label for m in app.metric][0] == "Cells predicted"
    assert not app.warning
    assert snapshot(root) == before


@pytest.mark.parametrize(
    ("damage", "where"),
    [
        pytest.param(lambda f: truncate(f / PREDICTIONS_FILE), "sidebar", id="truncated"),
        pytest.param(
            lambda f: (f / PREDICTIONS_FILE).write_bytes(b"PAR1 not parquet"),
            "sidebar",
            id="garbage",
        ),
        pytest.param(
            lambda f: (f / "config.yaml").write_text("year: [2024\n", encoding="utf-8"),
            "sidebar",
            id="config-not-yaml",
        ),
        pytest.param(
            lambda f: _keep_columns(f, lambda c: c.startswith("member_")),
            "page",
            id="without-member-columns",
        ),
        pytest.param(
            lambda f: _keep_columns(f, lambda c: c == "uncertainty"),
            "page",
            id="without-uncertainty",
        ),
        pytest.param(
            lambda f: _keep_columns(f, lambda c: c == "member_1"),
            "page",
            id="a-member-column-missing",
        ),
        pytest.param(
            lambda f: _edit_config(f, year="twenty twenty-four"), "page", id="year-not-a-number"
        ),
        pytest.param(lambda f: _edit_config(f, year=None), "page", id="year-missing"),
        pytest.param(
            lambda f: _edit_config(f, members="all of them"), "page", id="members-not-a-list"
        ),
    ],
)
def test_a_damaged_prediction_folder_is_skipped_with_a_note(city, predictions, env, damage, where):
    """The Monitor page leaves out a prediction folder it cannot read (the sidebar names one
    whose files are unreadable, the page one whose files lack what a change needs) and still
    draws the change of the other two."""
    root, _, _ = city
    bad = DataRoot(root).runs / predictions[2024]
    damage(bad)
    before = snapshot(root)
    app = open_app(root, env)
    visit_every_page(app)
    app.switch_page("views/monitor.py").run()
    assert not app.exception, app.exception
    sidebar = [w for w in sidebar_warnings(app) if predictions[2024] in w]
    page = [w.value for w in app.main.warning if predictions[2024] in w.value]
    notes = sidebar if where == "sidebar" else page
    assert len(notes) == 1 and str(bad) in notes[0], (sidebar, page)
    assert not (page if where == "sidebar" else sidebar), (sidebar, page)
    options = monitor_options(app)
    assert len(options) == 1 and options[0].startswith("2022 vs 2020"), options
    assert predictions[2024] not in options[0]
    assert [m.label for m in app.metric][0] == "Cells predicted"
    assert snapshot(root) == before


def test_the_monitor_page_follows_prediction_folders_as_they_come_and_break(city, predictions, env):
    """A prediction made while a session is open appears, and one damaged meanwhile drops out
    with its note, once the runs are re-listed (every 10 s): no restart, no exception."""
    root, older, newest = city
    app = open_app(root, env)
    app.switch_page("views/monitor.py").run()
    assert len(monitor_options(app)) == 3
    runs = DataRoot(root).runs
    ids = read_grid(DataRoot(root).grid)["cell_id"].to_numpy()
    # as predict on the root the others were made on (the copy's fixture root)
    data = load_run(runs / predictions[2020]).config["data"]
    later = write_prediction(runs, ids, 2026, [older, newest], data=data)
    truncate(runs / predictions[2024] / PREDICTIONS_FILE)
    time.sleep(10.5)  # data.list_readable_runs re-lists the runs after 10 s
    app.run()
    assert not app.exception, app.exception
    options = monitor_options(app)
    assert [o[:12] for o in options] == ["2026 vs 2022", "2026 vs 2020", "2022 vs 2020"], options
    assert all(predictions[2024] not in o for o in options)
    assert any(later in o for o in options)
    assert [w for w in sidebar_warnings(app) if predictions[2024] in w]


# -- street images ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "note"),
    [
        (png_header(30000, 30000), "too large to show"),
        (png_header(8000, 8000), "too large to show"),
        (b"<html>not an image</html>", "not a readable image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "not a readable image"),  # a JPEG cut short
        (None, "missing file"),
    ],
    ids=["bomb-30000", "bomb-8000", "html", "truncated-jpeg", "missing"],
)
def test_a_bad_street_image_shows_a_placeholder(city, env, content, note):
    root, _, _ = city
    cell, bad = street_images_of_a_cell(root)
    for relative in bad:
        path = DataRoot(root).catalog.parent / relative
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)
    before = snapshot(root)
    app = open_app(root, env)
    app.session_state["selected_cell"] = cell
    app.run()
    assert not app.exception, app.exception
    assert any(f"Cell {cell}" in h.value for h in app.subheader)
    placeholders = [c.value for c in app.caption if note in c.value]
    assert len(placeholders) == min(len(bad), 6)
    assert all(any(str(relative) in p for p in placeholders) for relative in bad[:6])
    assert snapshot(root) == before


# -- access ---------------------------------------------------------------------------------------


def test_the_repository_config_binds_loopback():
    import tomllib

    config = Path(APP).parents[1] / ".streamlit" / "config.toml"
    assert tomllib.loads(config.read_text(encoding="utf-8"))["server"]["address"] == "127.0.0.1"
    # Streamlit started from the repository root reads it (it looks in the working directory).
    script = "import streamlit; print(streamlit.get_option('server.address'))"
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=config.parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert result.stdout.strip().splitlines()[-1] == "127.0.0.1"


@pytest.mark.parametrize("address", ["0.0.0.0", "", "192.168.1.20"])
def test_retraining_off_loopback_without_a_secret_is_refused(city, env, address):
    root, _, _ = city
    st_config.set_option("server.address", address)
    before = snapshot(root)
    app = open_app(root, env, STADSBEELD_RETRAIN="1")
    visit_every_page(app)
    assert not [b for b in app.button if b.key == "retrain_submit"]
    refusal = [w for w in sidebar_warnings(app) if w.startswith("Retraining refused")]
    assert refusal and "STADSBEELD_RETRAIN_SECRET" in refusal[0]
    assert not (DataRoot(root).runs / DB_FILE).exists()
    assert snapshot(root) == before


def test_retraining_off_loopback_needs_the_secret_typed(city, env):
    root, _, _ = city
    st_config.set_option("server.address", "0.0.0.0")
    before = snapshot(root)
    app = open_app(root, env, STADSBEELD_RETRAIN="1", STADSBEELD_RETRAIN_SECRET="s3cret")
    app.run()
    assert not [b for b in app.button if b.key == "retrain_submit"]
    app.text_input(key="retrain_secret").input("wrong").run()
    assert not [b for b in app.button if b.key == "retrain_submit"]
    assert any(w.startswith("Retraining refused") for w in sidebar_warnings(app))
    assert snapshot(root) == before
    app.text_input(key="retrain_secret").input("s3cret").run()
    app.button(key="retrain_submit").click().run()
    assert not app.exception
    jobs = JobStore.for_runs(DataRoot(root).runs).jobs()
    assert [j.status for j in jobs] == ["queued"]


def test_a_session_may_queue_only_its_share(city, env):
    root, _, _ = city
    (root / "dashboard.yaml").write_text("max_jobs_per_session: 2\n", encoding="utf-8")
    app = open_app(root, env, STADSBEELD_RETRAIN="1")
    app.run()
    for _ in range(3):
        app.button(key="retrain_submit").click().run()
        assert not app.exception
    store = JobStore.for_runs(DataRoot(root).runs)
    assert len(store.jobs()) == 2
    assert any("Job not queued: 2 of your jobs" in w for w in sidebar_warnings(app))
    # another session still has its own share
    other = AppTest.from_file(APP, default_timeout=120).run()
    other.button(key="retrain_submit").click().run()
    assert len(store.jobs()) == 3


def test_the_queue_has_a_global_cap(city, env):
    root, _, _ = city
    (root / "dashboard.yaml").write_text("max_jobs_queued: 2\n", encoding="utf-8")
    store = JobStore.for_runs(DataRoot(root).runs)
    for _ in range(2):
        store.enqueue("fusion", {"target": "won"})
    app = open_app(root, env, STADSBEELD_RETRAIN="1")
    app.run()
    app.button(key="retrain_submit").click().run()
    assert not app.exception
    assert len(store.jobs()) == 2
    assert any("Job not queued: 2 jobs are already queued" in w for w in sidebar_warnings(app))


def test_two_sessions_queueing_at_once_share_the_caps(city, env, tmp_path):
    """Two dashboard sessions, each in a process of its own, click "Queue" at the same time:
    together they queue exactly the global cap, each within its share, every job once, and
    each refused click says why."""
    root, _, _ = city
    (root / "dashboard.yaml").write_text(
        "max_jobs_per_session: 3\nmax_jobs_queued: 4\n", encoding="utf-8"
    )
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "STADSBEELD_DATA": str(root),
        "STADSBEELD_RETRAIN": "1",
        "STADSBEELD_START_WORKER": "0",
    }
    environment.pop("STADSBEELD_RETRAIN_SECRET", None)
    go, ready = tmp_path / "go", [tmp_path / f"ready-{i}" for i in range(2)]
    sessions = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.bad_inputs.session", str(r), str(go), "4"],
            cwd=REPO,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    try:
        deadline = time.monotonic() + 180
        while not all(r.exists() for r in ready):
            assert all(s.poll() is None for s in sessions), [s.communicate() for s in sessions]
            assert time.monotonic() < deadline, "the sessions did not render in 180 s"
            time.sleep(0.1)
        go.touch()
        results = []
        for session in sessions:
            out, err = session.communicate(timeout=180)
            assert session.returncode == 0, err
            results.append(json.loads(out.splitlines()[-1]))
    finally:
        for session in sessions:
            if session.poll() is None:
                session.kill()
                session.communicate()
    mine = [set(r["mine"]) for r in results]
    assert not mine[0] & mine[1] and all(len(m) <= 3 for m in mine)
    jobs = JobStore.for_runs(DataRoot(root).runs).jobs()
    assert sorted(j.id for j in jobs) == sorted(mine[0] | mine[1])  # none lost, none twice
    assert len(jobs) == 4 and {j.status for j in jobs} == {"queued"}
    refusals = [note for r in results for note in r["refusals"]]
    assert sum(note is None for note in refusals) == 4  # one click, one job
    assert all(
        note.startswith(("Job not queued: 4 jobs are already", "Job not queued: 3 of your jobs"))
        for note in refusals
        if note is not None
    ), refusals


def test_the_caps_are_checked_where_jobs_are_enqueued(tmp_path):
    store = JobStore(tmp_path / DB_FILE)
    first = store.enqueue("fusion", {}, max_active=2, mine=[], max_mine=1)
    with pytest.raises(QueueFull, match="1 of your jobs"):
        store.enqueue("fusion", {}, mine=[first], max_mine=1)
    store.enqueue("fusion", {}, max_active=2)
    with pytest.raises(QueueFull, match="2 jobs are already queued or running"):
        store.enqueue("fusion", {}, max_active=2)
    store.cancel(first)
    assert store.enqueue("fusion", {}, max_active=2, mine=[first], max_mine=1)
    assert len(store.jobs()) == 3


def test_only_the_owner_or_the_secret_may_cancel(city, env):
    root, _, _ = city
    store = JobStore.for_runs(DataRoot(root).runs)
    foreign = store.enqueue("fusion", {"target": "won"})
    app = open_app(root, env, STADSBEELD_RETRAIN="1", STADSBEELD_RETRAIN_SECRET="s3cret")
    app.run()
    assert not [b for b in app.button if b.key == f"cancel_{foreign}"]
    app.button(key="retrain_submit").click().run()
    own = store.jobs()[0].id
    assert own != foreign
    assert [b for b in app.button if b.key == f"cancel_{own}"]
    assert not [b for b in app.button if b.key == f"cancel_{foreign}"]
    app.text_input(key="retrain_secret").input("s3cret").run()
    app.button(key=f"cancel_{foreign}").click().run()
    assert store.get(foreign).status == "cancelled"
