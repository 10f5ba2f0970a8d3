"""Predicted vs true: how well a run ranks the cells, where it errs, and two runs side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from core.metrics import grouped_metrics, score_metrics
from core.runs import PREDICTIONS_FILE
from dashboard import common, data, maps

METRIC_NAMES = {"kendall_tau": "Kendall's tau", "spearman": "Spearman", "r2": "R²", "mae": "MAE"}


def split_predictions(root: str, run: pd.Series, split: str) -> pd.DataFrame:
    """The run's predictions with buurt and district, limited to one split (or all)."""
    predictions = data.load_predictions(str(run["path"]))
    if split != "all":
        predictions = predictions[predictions["split"] == split]
    return data.on_grid(root, predictions)


def metric_row(predictions: pd.DataFrame) -> dict[str, float]:
    metrics = score_metrics(predictions["predicted"], predictions["true"])
    for column, (name, title) in zip(
        st.columns(len(METRIC_NAMES)), METRIC_NAMES.items(), strict=True
    ):
        column.metric(title, f"{metrics[name]:.3f}")
    return metrics


def scatter(predictions: pd.DataFrame, target: str, title: str) -> go.Figure:
    figure = px.scatter(
        predictions,
        x="true",
        y="predicted",
        color="district",
        opacity=0.6,
        hover_data=["cell_id", "buurt_naam", "split"],
        title=title,
        labels={"true": f"true {target}", "predicted": f"predicted {target}"},
    )
    lo = float(np.nanmin(predictions[["true", "predicted"]].to_numpy()))
    hi = float(np.nanmax(predictions[["true", "predicted"]].to_numpy()))
    figure.add_trace(
        go.Scatter(
            x=[lo, hi],
            y=[lo, hi],
            mode="lines",
            name="predicted = true",
            line={"color": "black", "dash": "dash"},
        )
    )
    figure.update_layout(height=480, legend={"orientation": "h", "y": -0.2})
    return figure


def residual_map(root: str, predictions: pd.DataFrame, title: str, unit: str) -> None:
    """The residuals on the map, per cell or as the mean per planner's unit (with its table)."""
    shown = data.on_grid(root, predictions[["cell_id", "true", "predicted", "residual"]])
    payload, legend, shown = common.value_map(shown.assign(value=shown["residual"]), title, unit)
    context = data.load_context(root)
    chart = maps.city_deck(payload, context, "residual", units=unit != common.CELLS)
    st.pydeck_chart(chart, height=420)
    st.markdown(legend.html(), unsafe_allow_html=True)
    if unit != common.CELLS:
        means = {"value": "mean residual", "true": "mean true", "predicted": "mean predicted"}
        st.dataframe(common.unit_table(shown, means), width="stretch")


def main() -> None:
    root = common.root_or_stop()
    st.title("Predicted vs true")
    runs = common.prediction_runs(root)
    if runs.empty:
        st.info(
            "No runs with predictions yet: `make demo` trains the default runs, or train one "
            "from the sidebar."
        )
        return
    left, middle, right, units = st.columns([3, 3, 1, 1])
    with left:
        run = common.run_picker(runs, "Run", key="pvt_run")
    with middle:
        other = common.run_picker(
            runs[runs["run_id"] != run["run_id"]].reset_index(drop=True),
            "Compare with",
            key="pvt_other",
            optional=True,
        )
    split = right.selectbox("Cells", ["test", "val", "train", "all"], key="pvt_split")
    with units:
        unit = common.unit_picker(root, "pvt_units")
    predictions = split_predictions(root, run, split)
    if predictions.empty:
        st.warning(f"Run {run['run_id']} has no {split} cells.")
        return
    target = str(run["config.target"])

    if other is None:
        metric_row(predictions)
        plot, histogram = st.columns([3, 2])
        plot.plotly_chart(
            scatter(predictions, target, f"{common.run_title(run)} ({split})"), key="pvt_scatter"
        )
        residuals = px.histogram(
            predictions, x="residual", nbins=40, title="Residuals (predicted - true)"
        )
        residuals.update_layout(height=480)
        histogram.plotly_chart(residuals, key="pvt_histogram")
        st.subheader("Per district")
        table = grouped_metrics(predictions, "district").set_index("district").round(3)
        st.dataframe(table, width="stretch")
        st.subheader("Residual map")
        residual_map(root, predictions, f"residual of {run['run_id']} ({split} cells)", unit)
    else:
        second = split_predictions(root, other, split)
        columns = st.columns(2)
        for column, (this, frame) in zip(
            columns, ((run, predictions), (other, second)), strict=True
        ):
            with column:
                st.markdown(f"**{common.run_title(this)}**")
                metric_row(frame)
                residual_map(root, frame, f"residual of {this['run_id']} ({split} cells)", unit)
        both = predictions.merge(
            second[["cell_id", "residual"]], on="cell_id", suffixes=("", "_other")
        )
        better = (both["residual"].abs() < both["residual_other"].abs()).mean()
        st.markdown(
            f"On the {len(both):,} {split} cells both runs predict, **{common.run_title(run).split(' · ')[0]}** "
            f"has the smaller error in **{100 * better:.0f}%** of cells."
        )
        per_district = pd.concat(
            [
                grouped_metrics(frame, "district").set_index("district")["kendall_tau"]
                for frame in (predictions, second)
            ],
            axis=1,
        )
        per_district.columns = [f"tau {run['run_id']}", f"tau {other['run_id']}"]
        st.dataframe(per_district.round(3), width="stretch")
    common.provenance(*(f"{r['path']}/{PREDICTIONS_FILE}" for r in (run, other) if r is not None))


main()
