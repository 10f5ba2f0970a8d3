"""Positive-pair rules of the contrastive pretraining on hand-built catalogs and the tiny demo."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from core.pairs import (
    DAYS_PER_MONTH,
    NoTemporalPairs,
    PairConfig,
    pair_statistics,
    require_temporal,
    spatial_pairs,
    temporal_pairs,
)
from core.sources.catalog import read_catalog

T0 = pd.Timestamp("2018-01-01", tz="UTC")


def images(*rows: tuple[float, float, float, pd.Timestamp]) -> pd.DataFrame:
    """Images from ``(x, y, heading, captured_at)`` rows, in RD New metres near Amsterdam."""
    frame = pd.DataFrame(rows, columns=["x", "y", "heading", "captured_at"])
    frame["x"] += 121000.0
    frame["y"] += 485000.0
    frame["captured_at"] = pd.to_datetime(frame["captured_at"], utc=True)
    return frame


def months(n: float) -> pd.Timestamp:
    return T0 + pd.Timedelta(days=n * DAYS_PER_MONTH)


def pair_set(pairs: pd.DataFrame) -> set[tuple[int, int]]:
    return set(zip(pairs["a"].tolist(), pairs["b"].tolist(), strict=True))


@pytest.mark.parametrize(("dx", "pairs"), [(4.9, 1), (5.0, 0), (5.1, 0)])  # "< 5 m" in the paper
def test_temporal_distance_threshold(dx: float, pairs: int) -> None:
    found = temporal_pairs(images((0, 0, 90, T0), (dx, 0, 90, months(24))))
    assert len(found) == pairs
    if pairs:
        assert found["distance_m"].iloc[0] == pytest.approx(dx)


@pytest.mark.parametrize(
    ("first", "second", "diff"),
    [
        (90, 110, 20.0),
        (90, 130, None),
        (350, 10, 20.0),
        (10, 350, 20.0),
        (math.nan, 90, None),
        (math.nan, math.nan, None),
    ],
)
def test_temporal_heading_is_circular_and_nan_never_pairs(first, second, diff) -> None:
    found = temporal_pairs(images((0, 0, first, T0), (1, 0, second, months(24))))
    if diff is None:
        assert found.empty
    else:
        assert found["heading_diff_deg"].tolist() == [pytest.approx(diff)]


@pytest.mark.parametrize(("gap_months", "pairs"), [(13, 1), (11, 0)])
def test_temporal_date_gap(gap_months: float, pairs: int) -> None:
    found = temporal_pairs(images((0, 0, 90, T0), (0, 0, 90, months(gap_months))))
    assert len(found) == pairs
    if pairs:
        assert found["gap_days"].iloc[0] == pytest.approx(13 * DAYS_PER_MONTH)


def test_same_date_and_missing_date_never_pair_even_without_a_gap() -> None:
    config = PairConfig(temporal_min_gap_months=0)
    frame = images((0, 0, 90, T0), (0, 0, 90, T0 + pd.Timedelta(hours=3)), (0, 0, 90, pd.NaT))
    assert temporal_pairs(frame, config).empty
    frame.loc[1, "captured_at"] = T0 + pd.Timedelta(days=1)
    assert pair_set(temporal_pairs(frame, config)) == {(0, 1)}


def test_temporal_pairs_are_row_positions_whatever_the_index() -> None:
    frame = images((0, 0, 90, T0), (500, 0, 0, T0), (1, 1, 95, months(30)), (0, 1, 270, months(30)))
    frame.index = [40, 30, 20, 10]
    found = temporal_pairs(frame)
    assert pair_set(found) == {(0, 2)}
    assert found.dtypes[["a", "b"]].tolist() == [np.dtype("int64")] * 2
    assert list(found.columns) == ["a", "b", "distance_m", "heading_diff_deg", "gap_days"]


@pytest.mark.parametrize(("dy", "pairs"), [(100.0, 1), (101.0, 0)])
def test_spatial_buffer(dy: float, pairs: int) -> None:
    found = spatial_pairs(images((0, 0, 0, T0), (0, dy, 0, T0)))
    assert len(found) == pairs


def test_spatial_pairs_are_other_places_no_self_pairs() -> None:
    # 0 and 1: one panorama, two headings (the same place: not a spatial pair by default).
    frame = images((0, 0, 0, T0), (0, 0, 90, T0), (50, 0, 0, T0), (0, 4.9, 0, T0))
    found = spatial_pairs(frame)
    assert pair_set(found) == {(0, 2), (1, 2), (2, 3)}
    assert (found["a"] < found["b"]).all()
    assert found["distance_m"].tolist() == pytest.approx([50.0, 50.0, np.hypot(50, 4.9)])
    anywhere = spatial_pairs(frame, PairConfig(spatial_min_distance_m=0))
    assert pair_set(anywhere) == {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)}


def test_spatial_cap_holds_is_maximal_and_deterministic_per_seed() -> None:
    rng = np.random.default_rng(3)
    frame = images(*[(x, y, 0, T0) for x, y in rng.uniform(0, 150, (60, 2))])
    every = pair_set(spatial_pairs(frame, PairConfig(spatial_max_per_image=None)))
    runs = {
        seed: spatial_pairs(frame, PairConfig(spatial_max_per_image=3, seed=seed))
        for seed in (0, 0, 1)
    }
    capped = runs[0]
    partners = np.bincount(capped[["a", "b"]].to_numpy().ravel(), minlength=len(frame))
    assert partners.max() == 3
    assert pair_set(capped) < every
    # a dropped pair always had one full image: the cap never discards a pair it had room for
    assert all(partners[a] == 3 or partners[b] == 3 for a, b in every - pair_set(capped))
    pd.testing.assert_frame_equal(capped, spatial_pairs(frame, PairConfig(spatial_max_per_image=3)))
    assert pair_set(runs[1]) != pair_set(capped)


def test_single_capture_date_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "catalog.csv"
    pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "source": "gsv",
            "path": ["a.jpg", "b.jpg", "c.jpg"],
            "x": [121000.0, 121000.0, 121300.0],
            "y": 485000.0,
            "heading": 90.0,
            "captured_at": "2019-06-01T10:00:00Z",
        }
    ).to_csv(path, index=False)
    frame = read_catalog(path, check_files=False).images
    config = PairConfig()
    pairs = temporal_pairs(frame, config, source=str(path))
    with pytest.raises(NoTemporalPairs, match="single capture date") as error:
        require_temporal(pairs, frame, config, source=str(path))
    message = str(error.value)
    assert str(path) in message and "3 images" in message and "2019-06-01" in message
    assert "< 5 m" in message and "12 months" in message and "30 deg" in message
    assert isinstance(error.value, ValueError)


def test_no_temporal_pairs_names_the_rule_that_stops_them() -> None:
    frame = images((0, 0, 90, T0), (0, 0, 90, months(11)))
    expected = r"2 distinct capture dates.*longest gap .* 11\.0 months"
    with pytest.raises(NoTemporalPairs, match=expected):
        require_temporal(temporal_pairs(frame), frame, PairConfig(), "hand")
    found = temporal_pairs(frame, PairConfig(temporal_min_gap_months=10))
    assert require_temporal(found, frame, PairConfig(), "hand") is found


def test_statistics_on_a_hand_case() -> None:
    pairs = pd.DataFrame(
        {
            "a": [0, 0, 1, 2],
            "b": [1, 2, 2, 3],
            "distance_m": [0.0, 1.0, 2.0, 4.0],
            "gap_days": [400.0, 800.0, 800.0, 1200.0],
        }
    )
    stats = pair_statistics(pairs, n_images=5)
    assert json.loads(json.dumps(stats)) == stats
    assert stats["count"] == 4 and stats["n_images"] == 5
    assert stats["images_with_a_partner"] == pytest.approx(4 / 5)
    assert stats["partners_per_image"] == {"mean": pytest.approx(8 / 5), "max": 3}
    assert stats["distance_m"] == {"min": 0.0, "p25": 0.75, "median": 1.5, "p75": 2.5, "max": 4.0}
    assert stats["gap_days"]["median"] == 800.0
    assert "heading_diff_deg" not in stats
    empty = pair_statistics(pairs.iloc[:0], n_images=5)
    assert empty["count"] == 0 and empty["distance_m"]["median"] is None


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"hand: missing columns \['heading'\]"):
        temporal_pairs(images((0, 0, 0, T0)).drop(columns="heading"), source="hand")
    with pytest.raises(ValueError, match="hand: 1 images without a finite position"):
        spatial_pairs(images((0, 0, 0, T0), (math.nan, 0, 0, T0)), source="hand")
    with pytest.raises(ValueError, match="not a number"):
        temporal_pairs(images((0, 0, 0, T0)).assign(heading=["north"]))
    with pytest.raises(ValueError, match="spatial_max_per_image=0"):
        PairConfig(spatial_max_per_image=0)
    with pytest.raises(ValueError, match="outside"):
        pair_statistics(pd.DataFrame({"a": [0], "b": [5], "distance_m": [1.0]}), n_images=5)


def test_tiny_demo_has_temporal_and_capped_spatial_pairs(tiny_demo) -> None:
    catalog = read_catalog(tiny_demo / "street" / "catalog.parquet", check_files=False).images
    gsv = catalog[catalog["source"] == "gsv"].reset_index(drop=True)
    found = temporal_pairs(gsv, source="tiny demo gsv")
    assert len(found) > 0
    assert (found["gap_days"] >= 12 * DAYS_PER_MONTH).all()
    assert (found["distance_m"] < 5).all() and (found["heading_diff_deg"] <= 30).all()
    years = gsv["captured_at"].dt.year.to_numpy()
    assert (years[found["a"]] != years[found["b"]]).all()
    near = spatial_pairs(gsv)
    assert (near["distance_m"] <= 100).all() and (near["a"] < near["b"]).all()
    assert np.bincount(near[["a", "b"]].to_numpy().ravel()).max() <= 8
    stats = pair_statistics(found, len(gsv))
    assert stats["images_with_a_partner"] > 0.5
