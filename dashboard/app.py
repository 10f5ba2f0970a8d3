"""Stadsbeeld dashboard: the 100 m grid of Amsterdam coloured by its Leefbaarometer score.

Started by ``make demo``. Reads a data root (``STADSBEELD_DATA``, default the demo city) and
never imports torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `streamlit run` puts only dashboard/ on the path

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pydeck as pdk  # noqa: E402
import streamlit as st  # noqa: E402

from core.sources.lbm import SCORE_COLUMNS  # noqa: E402
from dashboard.data import data_root, load_cells, load_fusion_runs, load_labels, load_predictions  # noqa: E402

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


def diverging(values: np.ndarray) -> np.ndarray:
    """Blue (negative) .. white .. red (positive) colours, symmetric around zero."""
    limit = max(float(np.nanpercentile(np.abs(values), 98)), 1e-9)
    t = np.clip(values / limit, -1, 1)[:, None]
    white, blue, red = np.array([247, 247, 247]), np.array([33, 102, 172]), np.array([178, 24, 43])
    return np.where(t < 0, white + (blue - white) * -t, white + (red - white) * t).astype(int)


def run_title(run: pd.Series) -> str:
    tau = run.get("metrics.test_kendall_tau", float("nan"))
    return f"{run['config.label']} · {run['config.target']} · test tau {tau:.3f} · {run['run_id']}"


def main() -> None:
    st.set_page_config(page_title="Stadsbeeld", layout="wide")
    root = data_root()
    st.title("Stadsbeeld: Amsterdam on the 100 m Leefbaarometer grid")
    if not (root / "grid.parquet").exists():
        st.error(f"No data in {root}. Build the demo city with `make demo` or "
                 f"`python -m train demo --out {root}`, or point STADSBEELD_DATA at a data root.")
        return
    cells, labels = load_cells(str(root)), load_labels(str(root))
    runs = load_fusion_runs(str(root))
    with st.sidebar:
        source = st.radio("Show", ["Leefbaarometer labels", "Model run"] if len(runs) else ["Leefbaarometer labels"])
        if source == "Model run":
            run = runs.iloc[st.selectbox("Run", range(len(runs)), format_func=lambda i: run_title(runs.iloc[i]))]
            column = st.selectbox("Layer", ["predicted", "true", "residual"],
                                  format_func=lambda c: f"{c} {run['config.target']}" if c != "residual"
                                  else "residual (predicted - true)")
            split = st.selectbox("Cells", ["all", "test", "val", "train"])
        else:
            years = sorted(labels["jaar"].unique())
            year = st.selectbox("Year", years, index=len(years) - 1)
            column = st.selectbox("Layer", [*SCORE_COLUMNS, "lbm_class"], format_func=LAYER_NAMES.get)
        st.caption(f"Data root: `{root}`")

    if source == "Model run":
        values = load_predictions(str(run["path"]))
        if split != "all":
            values = values[values["split"] == split]
        values = values[["cell_id", column]]
        described = f"{column} {run['config.target']} of run {run['run_id']} ({run['config.label']})"
        provenance = f"`{Path(run['path']) / 'predictions.parquet'}`"
    else:
        values = labels[labels["jaar"] == year][["cell_id", column]]
        described = LAYER_NAMES[column]
        provenance = f"`{root / 'labels' / 'lbm_scores.csv'}`, year {year}"
    shown = cells.merge(values, on="cell_id").dropna(subset=[column])  # LBM leaves some scores empty
    data = shown[column].to_numpy(dtype=float)
    shown["fill"] = (diverging(data) if column == "residual" else colours(data)).tolist()
    shown["value"] = shown[column].round(3)
    left, right = st.columns([3, 1])
    with left:
        layer = pdk.Layer("PolygonLayer", shown[["polygon", "fill", "cell_id", "buurt_naam", "district", "value"]],
                          get_polygon="polygon", get_fill_color="fill", opacity=0.8, stroked=False,
                          pickable=True)
        view = pdk.ViewState(latitude=52.37, longitude=4.90, zoom=10.6)
        st.pydeck_chart(pdk.Deck(layers=[layer], initial_view_state=view, map_style=None,
                                 tooltip={"text": "cell {cell_id}\n{buurt_naam} ({district})\n"
                                                  f"{column}: {{value}}"}), height=640)
        if column == "residual":
            st.caption(f"Colour: {described}; blue = predicted too low, red = predicted too high.")
        else:
            lo, hi = np.nanpercentile(data, [2, 98])
            st.caption(f"Colour: {described}; red = {lo:.3f} or lower, green = {hi:.3f} or higher.")
    with right:
        st.metric("Cells shown", f"{len(shown):,}")
        if source == "Model run":
            for name in ("test_kendall_tau", "test_spearman", "test_r2", "test_mae"):
                value = run.get(f"metrics.{name}")
                if value is not None and not pd.isna(value):
                    st.metric(name.replace("test_", "test ").replace("_", " "), f"{value:.3f}")
        else:
            st.metric(f"Mean {column}", f"{shown[column].mean():.3f}")
        per_district = shown.groupby("district")[column].agg(["count", "mean"]).round(3)
        st.dataframe(per_district, width="stretch")
        st.caption(f"Source: {provenance}.")


main()
