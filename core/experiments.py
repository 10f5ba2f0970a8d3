"""Summaries of the fusion experiment matrix, without torch (the dashboard shows them)."""

from __future__ import annotations

import numpy as np
import pandas as pd

#: The configurations the paper's derived figures compare.
AERIAL, AERIAL_GSV, AERIAL_FLICKR_BUILDING = "aerial", "aerial+gsv", "aerial+flickr(building)"


def summarise_matrix(results: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per-configuration mean/std of the test metrics, and the paper's derived figures.

    Args:
        results: one row per (configuration, seed) with ``test_kendall_tau``, ``test_spearman``
            and ``test_r2``, as ``python -m train fusion-matrix`` writes them.

    Returns:
        The table (indexed by configuration, in first-seen order) and the derived figures: the
        gain of aerial+GSV over aerial, and the share of that gap closed by building-filtered
        Flickr (each computed per seed, then mean and std); empty when a configuration is missing.
    """
    order = list(dict.fromkeys(results["configuration"]))
    table = (
        results.groupby("configuration", sort=False)
        .agg(
            tau_mean=("test_kendall_tau", "mean"),
            tau_std=("test_kendall_tau", "std"),
            spearman_mean=("test_spearman", "mean"),
            r2_mean=("test_r2", "mean"),
            seeds=("seed", "nunique"),
        )
        .reindex(order)
    )
    wide = results.pivot_table(index="seed", columns="configuration", values="test_kendall_tau")
    derived: dict[str, float] = {}
    if {AERIAL, AERIAL_GSV, AERIAL_FLICKR_BUILDING} <= set(wide.columns):
        gain = (wide[AERIAL_GSV] - wide[AERIAL]) / wide[AERIAL]
        gap = (wide[AERIAL_GSV] - wide[AERIAL]).replace(0.0, np.nan)  # no gap, nothing to close
        closed = (wide[AERIAL_FLICKR_BUILDING] - wide[AERIAL]) / gap
        derived = {
            "gsv_gain_over_aerial_mean": float(gain.mean()),
            "gsv_gain_over_aerial_std": float(gain.std()),
            "gap_closed_by_building_flickr_mean": float(closed.mean()),
            "gap_closed_by_building_flickr_std": float(closed.std()),
        }
    return table, derived
