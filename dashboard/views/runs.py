"""Runs: every complete run with its config and metrics, and its predictions for download."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st
import yaml

from core.exports import FORMATS, export_bytes
from core.layers import MapLayer, map_layer
from core.runs import CONFIG_FILE, EPOCHS_FILE, METRICS_FILE, PREDICTIONS_FILE, load_run
from dashboard import common, data, retrain

SUMMARY_COLUMNS = [
    "run_id",
    "kind",
    "created",
    "config.label",
    "config.target",
    "config.epochs",
    "config.seed",
    "metrics.test_kendall_tau",
    "metrics.test_spearman",
    "metrics.test_r2",
    "metrics.test_mae",
]


@st.cache_resource(show_spinner="Preparing the downloads ...", max_entries=4)
def prediction_layer(root: str, run_path: str) -> MapLayer:
    """The run's predicted scores per cell, coloured as the city map colours them (shared
    between reruns: do not modify)."""
    counts = data.load_coverage(root)[["cell_id", "gsv", "flickr"]]
    return map_layer(root, "predicted", run=run_path, image_counts=counts)


@st.cache_data(show_spinner="Preparing the download ...", max_entries=8)
def prediction_file(
    root: str, run_path: str, fmt: str, basemap: str | None, attribution: str
) -> bytes:
    """The run's predictions as ``fmt``; an HTML map over the dashboard's base map (the URL
    template ``basemap``, None for none)."""
    return export_bytes(prediction_layer(root, run_path), fmt, basemap, attribution or None)


def main() -> None:
    root = common.root_or_stop()
    st.title("Runs")
    runs = data.load_runs(root)
    if runs.empty:
        st.info("No complete runs yet.")
    else:
        kinds = sorted(runs["kind"].unique())
        chosen = st.multiselect("Kinds", kinds, default=kinds, key="runs_kinds")
        runs = runs[runs["kind"].isin(chosen)].reset_index(drop=True)
        columns = [c for c in SUMMARY_COLUMNS if c in runs]
        st.dataframe(
            runs[columns],
            width="stretch",
            hide_index=True,
            column_config={
                c: st.column_config.NumberColumn(format="%.3f")
                for c in columns
                if c.startswith("metrics.")
            },
        )
        run = common.run_picker(runs, "Run", key="runs_run")
    if not runs.empty and run is not None:
        details = load_run(run["path"])
        left, right = st.columns(2)
        with left:
            st.markdown(f"**Config** (`{CONFIG_FILE}`)")
            st.code(yaml.safe_dump(details.config, sort_keys=False), language="yaml")
        with right:
            st.markdown(f"**Final metrics** (`{METRICS_FILE}`)")
            scalars = {k: v for k, v in details.metrics.items() if not isinstance(v, list | dict)}
            st.dataframe(pd.Series(scalars, name="value").astype(str), width="stretch")
            if not details.epochs.empty and "epoch" in details.epochs:
                curves = [
                    c
                    for c in details.epochs.columns
                    if c not in ("epoch", "seconds", "aerial_frozen")
                ]
                chart = px.line(
                    details.epochs,
                    x="epoch",
                    y=curves,
                    markers=True,
                    title=f"Per epoch ({EPOCHS_FILE})",
                )
                st.plotly_chart(chart, key="runs_epochs")
        if (run["path"] / PREDICTIONS_FILE).is_file():
            st.markdown(
                "**Predictions** per cell, as 100 m squares in EPSG:28992 (RD New): the "
                "GeoPackage opens in QGIS coloured as the city map, the HTML map in any browser "
                "(`stadsbeeld export` writes any other layer)"
            )
            buttons = st.columns(len(FORMATS))
            names = {
                "gpkg": "GeoPackage",
                "parquet": "GeoParquet",
                "csv": "CSV",
                "html": "HTML map",
            }
            basemap = data.basemap(root)
            for column, (fmt, mime) in zip(buttons, FORMATS.items(), strict=True):
                column.download_button(
                    f"{names[fmt]} (.{fmt})",
                    prediction_file(root, str(run["path"]), fmt, basemap.url, basemap.attribution),
                    file_name=f"{run['run_id']}-predictions.{fmt}",
                    mime=mime,
                    key=f"download_{fmt}",
                    on_click="ignore",
                )
        common.provenance(run["path"])
    st.subheader("Training jobs")
    jobs = retrain.jobs_table(root)
    if jobs.empty:
        st.caption("No jobs yet.")
    else:
        st.dataframe(jobs, width="stretch", hide_index=True)


main()
