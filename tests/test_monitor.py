"""Monitoring: change between two predictions, its uncertainty, and the held-out-year validation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import kendalltau

from core.configs import ChangeValidationConfig
from core.dataroot import DataRoot
from core.monitor import change, comparable, pairs, to_look_at
from core.runs import RunWriter, list_runs, load_run
from core.sources.lbm import read_lbm
from train.change_validation import validate_change

CELLS = np.arange(100, 110, dtype=np.int64)


def _prediction(runs: Path, year: int, members: np.ndarray, member_ids=("a", "b", "c")):
    """A prediction folder of ``members`` (members x cells) for ``year``."""
    table = pd.DataFrame(
        {
            "cell_id": CELLS,
            "split": "test",
            "true": np.linspace(3.9, 4.3, len(CELLS)),
            "predicted": members.mean(axis=0),
            "uncertainty": members.std(axis=0, ddof=1),
            "year": year,
            **{f"member_{i}": row for i, row in enumerate(members)},
        }
    )
    config = {"data": "root", "year": year, "members": [{"run_id": m} for m in member_ids]}
    with RunWriter(runs, "prediction", config) as run:
        run.write_metrics({"cells": len(CELLS)})
        run.write_predictions(table)
    return load_run(runs / run.run_id)


def test_a_model_that_predicts_constants_predicts_no_change(tmp_path):
    constant = np.full((3, len(CELLS)), 4.1) + np.array([[0.0], [0.2], [-0.1]])
    before = _prediction(tmp_path, 2022, constant)
    after = _prediction(tmp_path, 2024, constant)
    changes = change(before, after)
    np.testing.assert_array_equal(changes["change"], 0.0)
    np.testing.assert_array_equal(
        changes["change_uncertainty"], 0.0
    )  # members disagree, changes do not
    assert not to_look_at(changes, threshold=0.01).any()


def test_the_change_uncertainty_is_the_spread_of_the_members_changes(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.normal(4.1, 0.2, (3, len(CELLS)))
    moves = rng.normal(0.05, 0.03, (3, len(CELLS)))
    before = _prediction(tmp_path, 2022, base)
    after = _prediction(tmp_path, 2024, base + moves)
    changes = change(before, after)
    np.testing.assert_allclose(changes["change"], moves.mean(axis=0))
    expected = [np.std(moves[:, j], ddof=1) for j in range(len(CELLS))]  # per cell, by hand
    np.testing.assert_allclose(changes["change_uncertainty"], expected)
    # larger disagreement between the members' changes, larger uncertainty
    wider = change(
        before, _prediction(tmp_path, 2024, base + 3 * (moves - moves.mean(0)) + moves.mean(0))
    )
    assert (wider["change_uncertainty"] > changes["change_uncertainty"]).all()
    sure = to_look_at(changes, threshold=0.04)
    size = changes["change"].abs()
    assert sure.equals((size >= 0.04) & (size >= 2 * changes["change_uncertainty"]))
    assert [(b.run_id, a.run_id) for b, a in pairs([before, after])] == [
        (before.run_id, after.run_id)
    ]


def test_predictions_of_other_members_or_the_wrong_order_make_no_change(tmp_path):
    values = np.ones((3, len(CELLS)))
    a = _prediction(tmp_path, 2022, values)
    b = _prediction(tmp_path, 2024, values, member_ids=("a", "b", "d"))
    c = _prediction(tmp_path, 2024, values)
    assert "other runs" in comparable(a, b)
    assert "not earlier" in comparable(c, a)
    with pytest.raises(ValueError, match="other runs"):
        change(a, b)
    assert [(x.run_id, y.run_id) for x, y in pairs([a, b, c])] == [(a.run_id, c.run_id)]


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tiny_demo):
    root = tmp_path_factory.mktemp("validate") / "city"
    shutil.copytree(tiny_demo, root, ignore=shutil.ignore_patterns("runs"))
    config = ChangeValidationConfig(
        data=str(root),
        seeds=[0, 1],
        epochs=2,
        fusion={"batch_size": 64, "block_size": 300.0, "aerial_px": 32},
    )
    return root, validate_change(config, log=lambda _: None)


def test_the_held_out_year_validation_compares_change_with_the_labels(validated):
    root, report = validated
    assert (report["train_year"], report["test_year"]) == (2020, 2022)
    labels = read_lbm(DataRoot(root).scores, DataRoot(root).lbm_grid)
    true = labels.pivot(index="cell_id", columns="jaar", values="won")
    for name in ("aerial+gsv", "aerial"):
        summary = report["configurations"][name]
        after = load_run(DataRoot(root).runs / summary["runs"]["after"])
        before = load_run(DataRoot(root).runs / summary["runs"]["before"])
        assert (after.config["year"], before.config["year"]) == (2022, 2020)
        members = [load_run(DataRoot(root).runs / m["run_id"]) for m in after.config["members"]]
        assert [m.config["year"] for m in members] == [
            2020,
            2020,
        ]  # learnt the earlier release only
        assert all(m.config["label_year"] == 2020 for m in members)
        p_after, p_before = (r.predictions().set_index("cell_id") for r in (after, before))
        test = p_after.index[p_after["split"] == "test"]
        carry = np.abs(true.loc[test, 2020] - true.loc[test, 2022]).mean()
        assert summary["ensemble"]["mae_carry_forward"] == pytest.approx(carry)
        assert summary["ensemble"]["cells"] == len(test)
        change = (p_after["predicted"] - p_before["predicted"]).loc[test]
        if name == "aerial":  # no aerial change in this extent: the mosaics are the same
            assert (change == 0).all() and np.isnan(summary["ensemble"]["tau_change"])
            continue
        tau = kendalltau(change, true.loc[test, 2022] - true.loc[test, 2020]).statistic
        assert summary["ensemble"]["tau_change"] == pytest.approx(tau, abs=1e-9)
        assert np.isfinite(summary["std"]["tau_change"])  # two seeds, a spread
    folder = DataRoot(root).reports
    written = json.loads((folder / "change_validation.json").read_text())
    assert written["configurations"].keys() == {"aerial+gsv", "aerial"}
    per_district = pd.read_csv(folder / "change_validation.csv")
    assert set(per_district["configuration"]) == {"aerial+gsv", "aerial"}
    assert "| aerial+gsv |" in (folder / "change_validation.md").read_text()
    assert (list_runs(DataRoot(root).runs, kind="prediction")["run_id"].size) == 4


def test_validation_needs_two_label_years(tmp_path, tiny_demo):
    with pytest.raises(ValueError, match="train_year 2022 must be before test_year 2022"):
        validate_change(ChangeValidationConfig(data=str(tiny_demo), train_year=2022))


def test_the_monitor_page_shows_the_validation_it_rests_on(validated, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from tests.test_dashboard import APP

    root, report = validated
    monkeypatch.setenv("STADSBEELD_DATA", str(root))
    monkeypatch.setenv("STADSBEELD_START_WORKER", "0")
    st.cache_data.clear()
    app = AppTest.from_file(APP, default_timeout=120)
    app.run()
    app.switch_page("views/monitor.py").run()
    assert not app.exception, app.exception
    assert len(app.selectbox(key="monitor_pair").options) == 2  # one pair per configuration
    trust = app.dataframe[-1].value
    assert list(trust.index) == ["aerial+gsv", "aerial"]
    ensemble = report["configurations"]["aerial+gsv"]["ensemble"]
    assert trust.loc["aerial+gsv", "MAE carry forward"] == pytest.approx(
        ensemble["mae_carry_forward"], abs=1e-3
    )
    sources = [c.value for c in app.main.caption if c.value.startswith("Source:")]
    assert "change_validation.json" in sources[-1]
