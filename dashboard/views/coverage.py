"""Coverage gaps: where street-level imagery is thin, and how a model's error grows there."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from core.dataroot import DataRoot
from core.runs import PREDICTIONS_FILE
from core.sources.boundaries import cell_units
from dashboard import common, data, maps

COUNT_LAYERS = {
    "gsv": "GSV images",
    "flickr": "Flickr photos (all)",
    "flickr_outdoor": "Flickr photos, outdoor",
    "flickr_building": "Flickr photos, building scenes",
    "gap": "cells without a filtered Flickr photo",
}
#: Bins of image counts for the error-vs-coverage chart.
COUNT_BINS = [-0.5, 0.5, 2.5, 5.5, 10.5, np.inf]
COUNT_LABELS = ["0", "1-2", "3-5", "6-10", "> 10"]
GAP_PALETTE = {"no filtered photo": [215, 48, 39], "covered": [210, 210, 210]}


def filtered_column(coverage: pd.DataFrame) -> str:
    """The most selective Flickr count present (building, else outdoor, else all photos)."""
    return next(c for c in ("flickr_building", "flickr_outdoor", "flickr") if c in coverage)


@st.cache_resource(show_spinner=False, max_entries=16)
def coverage_layer(root: str, layer_name: str, unit: str) -> tuple[maps.Records, maps.Legend]:
    """The map records and legend of one coverage layer, per cell or per planner's unit (the
    mean count per cell; for the gap layer, the share of cells without a filtered photo).
    Shared between reruns: do not modify."""
    coverage = data.load_coverage(root)
    shown = data.on_grid(root, coverage)
    filtered = filtered_column(coverage)
    gap = layer_name == "gap"
    if gap and unit == common.CELLS:
        labels = np.where(shown[filtered] == 0, "no filtered photo", "covered")
        colours, legend = maps.categorical(pd.Series(labels), GAP_PALETTE, COUNT_LAYERS["gap"])
        return common.map_payload(shown, colours, shown[filtered], unit), legend
    shown["value"] = (shown[filtered] == 0).astype(float) if gap else shown[layer_name]
    title = (
        "share of cells without a filtered Flickr photo"
        if gap
        else f"{COUNT_LAYERS[layer_name]} per cell"
    )
    # counts have a long tail per cell; a unit's mean count does not
    scale = functools.partial(
        maps.sequential, palette=maps.SIMILARITY_PALETTE, log=unit == common.CELLS
    )
    payload, legend, _ = common.value_map(shown, title, unit, scale)
    return payload, legend


def coverage_map(root: str, layer_name: str, unit: str) -> None:
    payload, legend = coverage_layer(root, layer_name, unit)
    st.pydeck_chart(
        maps.city_deck(
            payload,
            data.load_context(root),
            COUNT_LAYERS[layer_name],
            units=unit != common.CELLS,
        ),
        height=520,
        key="coverage_map",
    )
    st.markdown(legend.html(), unsafe_allow_html=True)


@st.cache_data(show_spinner=False)
def per_district(root: str, unit: str = "stadsdeel") -> pd.DataFrame:
    """Share of cells with GSV, Flickr and filtered Flickr images, and median counts, per
    planner's unit (stadsdeel by default)."""
    coverage = data.load_coverage(root)
    filtered = filtered_column(coverage)
    shown = data.on_grid(root, coverage)
    shown = shown.assign(unit=cell_units(shown, unit))
    shown = shown[shown["unit"] != ""].rename(columns={"unit": unit})
    return (
        shown.groupby(unit)
        .agg(
            cells=("cell_id", "size"),
            with_gsv=("gsv", lambda c: (c > 0).mean()),
            with_flickr=("flickr", lambda c: (c > 0).mean()),
            with_filtered_flickr=(filtered, lambda c: (c > 0).mean()),
            median_gsv=("gsv", "median"),
            median_flickr=("flickr", "median"),
        )
        .round(3)
    )


def error_by_coverage(
    root: str, coverage: pd.DataFrame, run: pd.Series, count: str
) -> pd.DataFrame:
    """Mean |residual| of a run's test cells per bin of image count."""
    predictions = data.load_predictions(str(run["path"]))
    predictions = predictions[predictions["split"] == "test"].drop(
        columns=["district"], errors="ignore"
    )
    joined = data.on_grid(root, predictions.merge(coverage[["cell_id", count]], on="cell_id"))
    joined["images"] = pd.cut(joined[count], COUNT_BINS, labels=COUNT_LABELS)
    return (
        joined.groupby("images", observed=False)
        .agg(cells=("cell_id", "size"), mean_abs_error=("residual", lambda r: r.abs().mean()))
        .reset_index()
    )


def main() -> None:
    root = common.root_or_stop()
    st.title("Coverage gaps")
    coverage = data.load_coverage(root)
    images = data.load_images(root)
    scene_run = images.attrs.get("scene_run")
    filtered = filtered_column(coverage)
    counts = st.columns(4)
    counts[0].metric("Cells", f"{len(coverage):,}")
    counts[1].metric("with GSV", f"{100 * (coverage['gsv'] > 0).mean():.0f}%")
    counts[2].metric("with Flickr", f"{100 * (coverage['flickr'] > 0).mean():.0f}%")
    counts[3].metric(
        f"with {COUNT_LAYERS[filtered].lower()}", f"{100 * (coverage[filtered] > 0).mean():.0f}%"
    )
    if scene_run is None:
        st.info(
            "No scene filter run yet, so Flickr photos are not filtered: "
            "`python -m train scene-filter` scores them."
        )
    options = [k for k in COUNT_LAYERS if k in coverage or k == "gap"]
    layer_name = st.selectbox(
        "Layer",
        options,
        index=options.index("gap"),
        key="coverage_layer",
        format_func=COUNT_LAYERS.get,
    )
    unit = common.unit_picker(root, "coverage_units")
    coverage_map(root, layer_name, unit)
    level = "stadsdeel" if unit == common.CELLS else unit
    st.subheader(f"Coverage per {level}")
    st.dataframe(per_district(root, level), width="stretch")

    st.subheader("Error where coverage is thin")
    st.markdown(
        "The paper found the Flickr models weakest north of the IJ, where few photos are "
        "taken. Mean absolute error of a run's test cells by how many images a cell has:"
    )
    runs = common.prediction_runs(root)
    runs = (
        runs[runs.get("config.ground").notna()].reset_index(drop=True)
        if "config.ground" in runs
        else runs.iloc[0:0]
    )
    if runs.empty:
        st.caption("No run with ground imagery yet.")
    else:
        left, right = st.columns([3, 2])
        with left:
            run = common.run_picker(
                runs, "Run", key="coverage_run", default_label="aerial+flickr(building)"
            )
        source = "flickr" if run.get("config.ground") == "flickr" else "gsv"
        count = right.selectbox(
            "Count",
            [c for c in COUNT_LAYERS if c in coverage],
            index=[c for c in COUNT_LAYERS if c in coverage].index(
                filtered if source == "flickr" else "gsv"
            ),
            key="coverage_count",
            format_func=COUNT_LAYERS.get,
        )
        table = error_by_coverage(root, coverage, run, count)
        chart = px.bar(
            table,
            x="images",
            y="mean_abs_error",
            text="cells",
            labels={
                "images": f"{COUNT_LAYERS[count]} in the cell",
                "mean_abs_error": "mean |residual|",
            },
            title=f"{common.run_title(run)}: test error by coverage (bar labels: cells)",
        )
        st.plotly_chart(chart, key="coverage_error")
        common.provenance(f"{run['path']}/{PREDICTIONS_FILE}")
    sources = [str(DataRoot(root).catalog)] + ([f"scene run {scene_run}"] if scene_run else [])
    common.provenance(*sources)


main()
