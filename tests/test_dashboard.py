"""The dashboard script runs against a real demo data root (Streamlit's AppTest, no browser)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from core.demo import DemoConfig, build_demo

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash") / "city"
    build_demo(root, DemoConfig(extent="bbox:121000,486000,122000,487000", flickr_photos=2000, workers=1),
               progress=False)
    return root


def test_map_page_shows_the_scores(demo_root, monkeypatch):
    monkeypatch.setenv("STADSBEELD_DATA", str(demo_root))
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert not app.exception
    scored = next(m for m in app.metric if m.label == "Cells shown")
    assert int(scored.value.replace(",", "")) > 50
    assert app.selectbox[0].value == 2020
    app.selectbox[1].set_value("won").run()
    assert not app.exception
    assert "housing stock" in app.caption[0].value


def test_map_page_never_imports_torch(demo_root):
    # A fresh interpreter: the test process itself may have imported torch elsewhere.
    script = (f"from streamlit.testing.v1 import AppTest; AppTest.from_file({APP!r}).run(); "
              "import sys; print('torch' in sys.modules)")
    env = {**os.environ, "STADSBEELD_DATA": str(demo_root)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=120, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_run_predictions_and_residuals_are_shown(demo_root, monkeypatch):
    from train.fusion import FusionConfig, train_fusion

    run_id = train_fusion(FusionConfig(data=str(demo_root), ground=None, epochs=1, block_size=300.0),
                          log=lambda _: None)
    monkeypatch.setenv("STADSBEELD_DATA", str(demo_root))
    st.cache_data.clear()  # the run list is cached for 10 s, and an earlier test listed none
    app = AppTest.from_file(APP, default_timeout=60).run()
    app.radio[0].set_value("Model run").run()
    assert not app.exception
    assert any(run_id in option for option in app.selectbox[0].options)
    app.selectbox[1].set_value("residual").run()
    assert not app.exception
    assert "blue = predicted too low" in app.caption[0].value
    assert any(m.label == "test kendall tau" for m in app.metric)
    assert f"{run_id}/predictions.parquet" in app.caption[-2].value + app.caption[-1].value


def test_empty_label_values_do_not_break_the_map(demo_root, tmp_path, monkeypatch):
    copy = tmp_path / "root"
    shutil.copytree(demo_root, copy, ignore=shutil.ignore_patterns("images", "runs", "cache"))
    scores = pd.read_csv(copy / "labels" / "lbm_scores.csv")
    scores.loc[scores.index[-3:], "lbm"] = float("nan")  # the Leefbaarometer leaves some cells empty
    scores.to_csv(copy / "labels" / "lbm_scores.csv", index=False)
    monkeypatch.setenv("STADSBEELD_DATA", str(copy))
    st.cache_data.clear()
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert not app.exception
    shown = int(next(m for m in app.metric if m.label == "Cells shown").value.replace(",", ""))
    latest = scores[scores["jaar"] == scores["jaar"].max()]
    assert shown == latest["lbm"].notna().sum()


def test_missing_data_root_explains_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("STADSBEELD_DATA", str(tmp_path / "nothing"))
    app = AppTest.from_file(APP, default_timeout=30).run()
    assert not app.exception
    assert "make demo" in app.error[0].value
