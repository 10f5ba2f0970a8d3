"""The Monitor page in a real browser, and a map page at buurt level.

A copy of the tiny demo city with two fusion seeds that predicted the last release (2022) and
a later imagery year (2024), served by ``stadsbeeld dashboard`` and opened in headless Chromium
(see ``tests/test_browser.py`` for how the server and the browser run).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from core.configs import FusionConfig, PredictConfig
from core.dataroot import DataRoot
from core.monitor import change
from core.runs import load_run
from tests.test_browser import browser, map_pixels, new_page, open_page, serve, settle  # noqa: F401
from train.fusion import train_fusion
from train.predict import predict

QUICK = {"epochs": 2, "batch_size": 64, "block_size": 300.0, "aerial_px": 32, "split_seed": 0}


@pytest.fixture(scope="module")
def monitored(tmp_path_factory, tiny_demo):
    root = tmp_path_factory.mktemp("monitor") / "city"
    shutil.copytree(tiny_demo, root, ignore=shutil.ignore_patterns("runs"))
    seeds = [
        train_fusion(FusionConfig(data=str(root), seed=s, **QUICK), log=lambda _: None)
        for s in (0, 1)
    ]
    years = [
        predict(PredictConfig(run=seeds, data=str(root), year=y, window_years=1), lambda _: None)
        for y in (2022, 2024)
    ]
    runs = [load_run(DataRoot(root).runs / r) for r in years]
    with serve(root, tmp_path_factory, retrain=False) as dashboard:
        yield dashboard, change(*runs)


def _choose(page, label: str, option: str) -> None:
    """Choose ``option`` in the main area's selectbox labelled ``label``."""
    page.locator('[data-testid="stMain"]').get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option, exact=True).click()
    settle(page, 2)


def test_the_monitor_page_shows_change_and_a_buurt_table(
    browser,  # noqa: F811 (the fixture imported from test_browser)
    monitored,
):
    dashboard, changes = monitored
    with new_page(browser, dashboard) as page:
        page.goto(dashboard.url)
        settle(page)
        open_page(page, "Monitor", 2)
        main = page.locator('[data-testid="stMain"]')
        text = main.inner_text()
        assert "Mean change 2022→2024" in text and f"{changes['change'].mean():+.4f}" in text
        chosen = main.get_by_role("combobox", name="Predictions").input_value()
        assert "2024 vs 2022" in chosen, chosen
        page.locator('[data-testid="stDeckGlJsonChart"] canvas').first.wait_for()
        page.wait_for_timeout(1500)
        predicted = map_pixels(page)
        main.get_by_text("change", exact=True).first.click()  # the layer radio
        settle(page, 2)
        changed = map_pixels(page)
        assert np.abs(predicted - changed).sum(1).astype(bool).mean() > 0.01  # recoloured
        assert "Per buurt" in main.inner_text()
        buurt_table = main.locator('[data-testid="stDataFrame"]').first
        assert buurt_table.get_by_text("mean change", exact=True).count() == 1
        # the same layer per buurt: the map draws units, not cells
        _choose(page, "Show", "buurt")
        assert "mean per buurt" in main.inner_text()
        per_buurt = map_pixels(page)
        assert np.abs(per_buurt - changed).sum(1).astype(bool).mean() > 0.01
        assert not page.locator('[data-testid="stException"]').count()
        page.screenshot(path=str(dashboard.log.parent / "monitor.png"))
    assert not [m for m in dashboard.console if m.startswith("pageerror")], dashboard.console
