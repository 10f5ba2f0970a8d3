"""What ``make demo`` shows a new user, in a real browser, on a small demo root.

``stadsbeeld demo-runs --queue-embeddings true`` (what ``make demo`` runs) trains the default
runs, queues a default contrastive and UGE run and starts the worker; the dashboard is served
at once, and when the two jobs finish the neighbours page offers all three kinds of embedding.
On a small demo root (3 x 2 km) with the default schedules.
Slow: the UGE job builds UGData and pretrains the tiny VLM (minutes on two cores).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.dataroot import DataRoot
from core.demo import DemoConfig, build_demo
from core.jobs import JobStore
from tests.test_browser import (  # noqa: F401
    browser,
    new_page,
    open_page,
    serve,
    settle,
    sync_api,
)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


#: Six 1 km blocks, so that the default runs' spatial split (1 km blocks) has test cells.
EXTENT = "bbox:120000,485000,123000,487000"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("make-demo") / "city"
    build_demo(root, DemoConfig(extent=EXTENT, flickr_photos=3000, workers=1), show_progress=False)
    return root


def test_the_queued_embedding_runs_appear_on_the_neighbours_page(
    browser,  # noqa: F811 (the fixture imported from test_browser)
    demo_root,
    tmp_path_factory,
):
    started = time.monotonic()
    command = [sys.executable, "-m", "train", "demo-runs", "--data", str(demo_root)]
    done = subprocess.run(
        [*command, "--queue-embeddings", "true", "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "queued a default contrastive run" in done.stdout
    assert "queued a default uge run" in done.stdout
    store = JobStore.for_runs(DataRoot(demo_root).runs)
    with serve(demo_root, tmp_path_factory, retrain=True) as dashboard:
        ready = time.monotonic()
        with new_page(browser, dashboard) as page:  # the sidebar shows the two jobs training
            page.goto(dashboard.url)
            settle(page)
            jobs = page.locator('[data-testid="stSidebarUserContent"]')
            sync_api.expect(jobs).to_contain_text("#1 contrastive temporal, 8 epochs")
            sync_api.expect(jobs).to_contain_text("#2 uge, 600 + 1000 steps")
        deadline = ready + 2400
        while {job.status for job in store.jobs()} != {"done"}:
            failed = [job for job in store.jobs() if job.status in ("failed", "cancelled")]
            assert not failed, failed[0].error
            assert time.monotonic() < deadline, [(j.kind, j.status) for j in store.jobs()]
            time.sleep(2)
        finished = time.monotonic()
        assert {job.kind for job in store.jobs()} == {"contrastive", "uge"}
        with new_page(browser, dashboard) as page:
            page.goto(dashboard.url)
            settle(page)
            open_page(page, "Embedding neighbours", 2)
            main = page.locator('[data-testid="stMain"]')
            main.get_by_role("combobox", name="Model kind").click()
            kinds = page.get_by_role("option").all_inner_texts()
            assert sorted(kinds) == ["contrastive", "fusion", "uge"], kinds
            page.keyboard.press("Escape")
            assert not page.locator('[data-testid="stException"]').count()
    print(
        f"default runs {ready - started:.0f} s; contrastive and UGE done "
        f"{finished - ready:.0f} s after the dashboard was up"
    )
