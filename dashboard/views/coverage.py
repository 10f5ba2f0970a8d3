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

#: Layers beside each source's images (:func:`layer_title`).
COUNT_LAYERS = {
    "gsv": "GSV images",
    "flickr": "Flickr photos (all)",
    "flickr_outdoor": "Flickr photos, outdoor",
    "flickr_building": "Flickr photos, building scenes",
    "gap": "cells without a filtered Flickr photo",
}


def layer_title(name: str) -> str:
    """A count layer's title: :data:`COUNT_LAYERS`, else the source's images."""
    return COUNT_LAYERS.get(name) or f"{common.source_title(name)} images"


def count_layers(root: str, coverage: pd.DataFrame) -> list[str]:
    """The count columns of ``coverage`` to offer: every source of the catalog (GSV and Flickr
    first), the filtered Flickr subsets present, and the gap layer."""
    sources = data.catalog_sources(root, always=("gsv", "flickr"))
    subsets = [c for c in ("flickr_outdoor", "flickr_building") if c in coverage]
    return [*sources[:2], *subsets, *sources[2:], "gap"]


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
        colours, legend = maps.categorical(pd.Series(labels), GAP_PALETTE, layer_title("gap"))
        return common.map_payload(shown, colours, shown[filtered], unit), legend
    shown["value"] = (shown[filtered] == 0).astype(float) if gap else shown[layer_name]
    title = (
        "share of cells without a filtered Flickr photo"
        if gap
        else f"{layer_title(layer_name)} per cell"
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
            layer_title(layer_name),
            units=unit != common.CELLS,
        ),
        height=520,
        key="coverage_map",
    )
    st.markdown(legend.html(), unsafe_allow_html=True)


@st.cache_data(show_spinner=False)
def per_district(root: str, unit: str = "stadsdeel") -> pd.DataFrame:
    """Share of cells with images of each source and with filtered Flickr photos, and the
    median counts, per planner's unit (stadsdeel by default)."""
    coverage = data.load_coverage(root)
    filtered = filtered_column(coverage)
    sources = data.catalog_sources(root, always=("gsv", "flickr"))
    shown = data.on_grid(root, coverage)
    shown = shown.assign(unit=cell_units(shown, unit))
    shown = shown[shown["unit"] != ""].rename(columns={"unit": unit})

    def covered(counts: pd.Series) -> float:
        return (counts > 0).mean()

    shares = {f"with_{s}": (s, covered) for s in sources}
    shares["with_filtered_flickr"] = (filtered, covered)
    medians = {f"median_{s}": (s, "median") for s in sources}
    return shown.groupby(unit).agg(cells=("cell_id", "size"), **shares, **medians).round(3)


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
    sources = data.catalog_sources(root, always=("gsv", "flickr"))
    shares = {f"with {common.source_title(s)}": coverage[s] for s in sources}
    if filtered != "flickr":
        shares[f"with {layer_title(filtered).lower()}"] = coverage[filtered]
    counts = st.columns(1 + len(shares))
    counts[0].metric("Cells", f"{len(coverage):,}")
    for column, (label, values) in zip(counts[1:], shares.items(), strict=True):
        column.metric(label, f"{100 * (values > 0).mean():.0f}%")
    if scene_run is None:
        st.info(
            "No scene filter run yet, so Flickr photos are not filtered: "
            "`python -m train scene-filter` scores them."
        )
    options = count_layers(root, coverage)
    layer_name = st.selectbox(
        "Layer",
        options,
        index=options.index("gap"),
        key="coverage_layer",
        format_func=layer_title,
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
        counted = [c for c in options if c in coverage]
        first = str(run.get("config.ground") or "gsv").split(",")[0]
        default = filtered if first == "flickr" else first if first in counted else "gsv"
        count = right.selectbox(
            "Count",
            counted,
            index=counted.index(default),
            key="coverage_count",
            format_func=layer_title,
        )
        table = error_by_coverage(root, coverage, run, count)
        chart = px.bar(
            table,
            x="images",
            y="mean_abs_error",
            text="cells",
            labels={
                "images": f"{layer_title(count)} in the cell",
                "mean_abs_error": "mean |residual|",
            },
            title=f"{common.run_title(run)}: test error by coverage (bar labels: cells)",
        )
        st.plotly_chart(chart, key="coverage_error")
        common.provenance(f"{run['path']}/{PREDICTIONS_FILE}")
    sources = [str(DataRoot(root).catalog)] + ([f"scene run {scene_run}"] if scene_run else [])
    common.provenance(*sources)


main()
