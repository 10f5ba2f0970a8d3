"""``python -m bench national`` at a small size: the synthesised root is a data root the
dashboard's city map page reads, and the numbers it reports are the page's own."""

from __future__ import annotations

import json

import bench.bench_national  # noqa: F401 (registers "national")
from bench.common import run_one


def test_the_city_map_page_runs_on_the_synthesised_root(tmp_path):
    run_one("national", tmp_path, {"cells": 20_000, "scored": 3_000, "years": (2020, 2022)})
    result = json.loads((tmp_path / "national.json").read_text())["results"]
    page = result["page"]
    assert page["errors"] == []
    # every scored cell shown, at 100 m (below the block threshold), with the mean of the
    # latest year's synthesised scores (lbm ~ N(4.1, 0.25))
    assert page["metrics"]["Cells shown"] == "3,000"
    assert "100 m blocks drawn" not in page["metrics"]
    assert abs(float(page["metrics"]["Mean"]) - 4.1) < 0.05
    assert result["label_rows"] == 6_000 and result["cells"] == 20_000
    assert page["deck_cells"] == 3_000  # the deck the page sent: one square per scored cell
    for step in ("first_run", "warm_rerun", "new_layer", "back_to_cached_layer"):
        assert page[step]["s"] > 0
