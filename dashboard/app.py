"""Stadsbeeld dashboard: the 100 m grid of Amsterdam coloured by its Leefbaarometer score.

Started by ``make demo``. Reads a data root (``STADSBEELD_DATA``, default the demo city) and
never imports torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `streamlit run` puts only dashboard/ on the path

import numpy as np  # noqa: E402
import pydeck as pdk  # noqa: E402
import streamlit as st  # noqa: E402

from core.sources.lbm import SCORE_COLUMNS  # noqa: E402
from dashboard.data import data_root, load_cells, load_labels  # noqa: E402

LAYER_NAMES = {
    "lbm": "overall score (lbm)", "afw": "deviation from national mean (afw)",
    "fys": "physical environment (fys)", "onv": "nuisance and safety (onv)",
    "soc": "social cohesion (soc)", "vrz": "amenities (vrz)", "won": "housing stock (won)",
    "lbm_class": "class 1..9",
}
# Leefbaarometer-like diverging palette: red (low) .. yellow .. green (high).
PALETTE = np.array([[165, 0, 38], [244, 109, 67], [254, 224, 139], [166, 217, 106], [26, 152, 80]])


def colours(values: np.ndarray) -> np.ndarray:
    """RGB colours for values, stretched between their 2nd and 98th percentile."""
    lo, hi = np.nanpercentile(values, [2, 98])
    t = np.clip((values - lo) / max(hi - lo, 1e-9), 0, 1) * (len(PALETTE) - 1)
    i = np.minimum(t.astype(int), len(PALETTE) - 2)
    return (PALETTE[i] + (PALETTE[i + 1] - PALETTE[i]) * (t - i)[:, None]).astype(int)


def main() -> None:
    st.set_page_config(page_title="Stadsbeeld", layout="wide")
    root = data_root()
    st.title("Stadsbeeld: Amsterdam on the 100 m Leefbaarometer grid")
    if not (root / "grid.parquet").exists():
        st.error(f"No data in {root}. Build the demo city with `make demo` or "
                 f"`python -m train demo --out {root}`, or point STADSBEELD_DATA at a data root.")
        return
    cells, labels = load_cells(str(root)), load_labels(str(root))
    years = sorted(labels["jaar"].unique())
    with st.sidebar:
        year = st.selectbox("Year", years, index=len(years) - 1)
        column = st.selectbox("Layer", [*SCORE_COLUMNS, "lbm_class"], format_func=LAYER_NAMES.get)
        st.caption(f"Data root: `{root}`")
    shown = cells.merge(labels[labels["jaar"] == year][["cell_id", column]], on="cell_id")
    shown["fill"] = colours(shown[column].to_numpy(dtype=float)).tolist()
    shown["value"] = shown[column].round(3)
    lo, hi = shown[column].quantile([0.02, 0.98])
    left, right = st.columns([3, 1])
    with left:
        layer = pdk.Layer("PolygonLayer", shown[["polygon", "fill", "cell_id", "buurt_naam", "district", "value"]],
                          get_polygon="polygon", get_fill_color="fill", opacity=0.8, stroked=False,
                          pickable=True)
        view = pdk.ViewState(latitude=52.37, longitude=4.90, zoom=10.6)
        st.pydeck_chart(pdk.Deck(layers=[layer], initial_view_state=view, map_style=None,
                                 tooltip={"text": "cell {cell_id}\n{buurt_naam} ({district})\n"
                                                  f"{column}: {{value}}"}), height=640)
        st.caption(f"Colour: {LAYER_NAMES[column]}, red = {lo:.3f} or lower, green = {hi:.3f} or higher.")
    with right:
        st.metric("Scored cells", f"{len(shown):,}")
        st.metric(f"Mean {column}", f"{shown[column].mean():.3f}")
        per_district = shown.groupby("district")[column].agg(["count", "mean"]).round(3)
        st.dataframe(per_district, width="stretch")
        st.caption(f"Source: `{root / 'labels' / 'lbm_scores.csv'}`, year {year}.")


main()
