"""Street-level sources compared: their coverage maps, the experiment matrix, and where each
source's model errs more (any two or more catalog sources: GSV, Flickr, the city's panoramas,
Mapillary, own photos)."""

from __future__ import annotations

import functools

import pandas as pd
import plotly.express as px
import streamlit as st

from core.dataroot import DataRoot
from core.experiments import AERIAL_FLICKR_BUILDING, AERIAL_GSV, summarise_matrix
from core.runs import PREDICTIONS_FILE
from core.sources.boundaries import cell_units
from dashboard import common, data, maps

#: Coverage maps side by side per row.
MAPS_PER_ROW = 3


def matrix_results(root: str) -> tuple[pd.DataFrame, str]:
    """The matrix's per-run rows: the ``fusion-matrix`` report, else the latest run per label."""
    report = data.load_matrix_report(root)
    if report is not None:
        return report, str(DataRoot(root).reports / "fusion_matrix.csv")
    runs = common.prediction_runs(root)
    runs = runs[runs["kind"] == "fusion"].drop_duplicates("config.label")
    results = pd.DataFrame(
        {
            "configuration": runs["config.label"],
            "seed": 0,
            "run_id": runs["run_id"],
            "test_kendall_tau": runs.get("metrics.test_kendall_tau"),
            "test_spearman": runs.get("metrics.test_spearman"),
            "test_r2": runs.get("metrics.test_r2"),
        }
    )
    return results, f"the newest fusion run of each configuration in {DataRoot(root).runs}"


@st.cache_data(show_spinner=False)
def source_table(root: str, sources: tuple[str, ...]) -> pd.DataFrame:
    """Per source: images, cells covered (and covered by no other chosen source), images per
    covered cell, capture years, share with a heading, and licences."""
    images, coverage = data.load_images(root), data.load_coverage(root)
    rows = {}
    for source in sources:
        mine = images[images["source"] == source]
        covered = coverage[source] > 0
        others = coverage[[s for s in sources if s != source]].sum(axis=1) > 0
        years = pd.to_datetime(mine["captured_at"]).dt.year.dropna()
        licences = mine["license"].dropna().unique() if "license" in mine else []
        rows[common.source_title(source)] = {
            "images": len(mine),
            "cells covered": float(covered.mean()),
            "only this source": float((covered & ~others).mean()),
            "images per covered cell": float(coverage.loc[covered, source].median())
            if covered.any()
            else 0.0,
            "captured": f"{years.min():.0f}..{years.max():.0f}" if len(years) else "",
            "median year": float(years.median()) if len(years) else float("nan"),
            "with heading": float(mine["heading"].notna().mean()) if len(mine) else 0.0,
            "licence": "; ".join(sorted(map(str, licences))),
        }
    return pd.DataFrame.from_dict(rows, orient="index").round(3)


@st.cache_resource(show_spinner=False, max_entries=32)
def coverage_layer(root: str, source: str, unit: str) -> tuple[maps.Records, maps.Legend]:
    """One source's images per cell (or the mean per planner's unit) as map records and legend.
    Shared between reruns: do not modify."""
    shown = data.on_grid(root, data.load_coverage(root))
    shown["value"] = shown[source].astype(float)
    # counts have a long tail per cell; a unit's mean count does not
    scale = functools.partial(
        maps.sequential, palette=maps.SIMILARITY_PALETTE, log=unit == common.CELLS
    )
    title = f"{common.source_title(source)} images per cell"
    payload, legend, _ = common.value_map(shown, title, unit, scale)
    return payload, legend


def coverage_maps(root: str, sources: list[str], unit: str) -> None:
    """One coverage map per source, :data:`MAPS_PER_ROW` to a row."""
    for start in range(0, len(sources), MAPS_PER_ROW):
        row = sources[start : start + MAPS_PER_ROW]
        for column, source in zip(st.columns(MAPS_PER_ROW), row, strict=False):
            payload, legend = coverage_layer(root, source, unit)
            with column:
                st.markdown(f"**{common.source_title(source)}**")
                st.pydeck_chart(
                    maps.city_deck(
                        payload,
                        data.load_context(root),
                        f"{common.source_title(source)} images",
                        units=unit != common.CELLS,
                    ),
                    height=360,
                    key=f"sources_coverage_{source}",
                )
                st.markdown(legend.html(), unsafe_allow_html=True)


def run_name(run: pd.Series) -> str:
    """A short name of a run's imagery for column names: its ground sources (``gsv``,
    ``amsterdam_panorama+mapillary``), or ``aerial``."""
    ground = run.get("config.ground")
    return str(ground).replace(",", "+") if isinstance(ground, str) and ground else "aerial"


def error_comparison(root: str, unit: str) -> None:
    """Two fusion runs' absolute errors per cell: a map of their difference and a table per
    district or unit."""
    st.subheader("Where each source's model errs more")
    runs = common.prediction_runs(root)
    runs = runs[runs["kind"] == "fusion"].reset_index(drop=True)
    left, right, split_column = st.columns([3, 3, 1])
    with left:
        first_run = common.run_picker(runs, "Model A", key="sources_gsv", default_label=AERIAL_GSV)
    labels = list(runs.get("config.label", pd.Series(dtype=str)).dropna())
    others = [label for label in labels if first_run is None or label != first_run["config.label"]]
    default = (
        AERIAL_FLICKR_BUILDING if AERIAL_FLICKR_BUILDING in labels or not others else others[0]
    )
    with right:
        second_run = common.run_picker(runs, "Model B", key="sources_flickr", default_label=default)
    split = split_column.selectbox("Cells", ["test", "all"], key="sources_split")
    if first_run is None or second_run is None:
        return
    a, b = run_name(first_run), run_name(second_run)
    if a == b:
        a, b = f"{a}_a", f"{b}_b"
    first = data.on_grid(root, data.load_predictions(str(first_run["path"])))
    second = data.load_predictions(str(second_run["path"]))
    both = first.merge(
        second[["cell_id", "predicted", "residual"]], on="cell_id", suffixes=(f"_{a}", f"_{b}")
    )
    if split != "all":
        both = both[both["split"] == split]
    if both.empty:
        st.warning("The two runs share no cells here.")
        return
    both["difference"] = both[f"residual_{b}"].abs() - both[f"residual_{a}"].abs()
    shown = both.assign(
        value=both["difference"], predicted=both[f"predicted_{a}"], residual=both[f"residual_{a}"]
    )
    title = f"|error| of the {b} model minus |error| of the {a} model"
    payload, legend, shown = common.value_map(shown, title, unit)
    st.pydeck_chart(
        maps.city_deck(
            payload,
            data.load_context(root),
            f"{b} |error| - {a} |error|",
            units=unit != common.CELLS,
        ),
        height=520,
        key="sources_map",
    )
    st.markdown(
        legend.html()
        + f" <small>red: the {b} model errs more; blue: the {a} model errs more</small>",
        unsafe_allow_html=True,
    )
    share = (both["difference"] > 0).mean()
    st.markdown(
        f"The {a} model is closer to the truth in **{100 * share:.0f}%** of {len(both):,} cells; "
        f"mean |error| {a} {both[f'residual_{a}'].abs().mean():.3f}, "
        f"{b} {both[f'residual_{b}'].abs().mean():.3f}."
    )
    where = both["district"] if unit == common.CELLS else cell_units(both, unit).rename(unit)
    per_district = (
        both.assign(worse=both["difference"] > 0)[where != ""]
        .groupby(where[where != ""])
        .agg(
            cells=("cell_id", "size"),
            **{
                f"{a}_abs_error": (f"residual_{a}", lambda r: r.abs().mean()),
                f"{b}_abs_error": (f"residual_{b}", lambda r: r.abs().mean()),
                f"{b}_worse": ("worse", "mean"),
            },
        )
    )
    st.dataframe(per_district.round(3), width="stretch")
    common.provenance(
        f"{first_run['path']}/{PREDICTIONS_FILE}", f"{second_run['path']}/{PREDICTIONS_FILE}"
    )


def matrix(root: str) -> None:
    """The experiment matrix: test tau per configuration, and the GSV/Flickr gap figures."""
    results, source = matrix_results(root)
    if results.empty:
        st.info("No fusion runs yet: `python -m train fusion-matrix` runs the whole matrix.")
        return
    table, derived = summarise_matrix(results)
    table = table.reset_index()
    chart = px.bar(
        table,
        x="configuration",
        y="tau_mean",
        error_y="tau_std",
        labels={"tau_mean": "test Kendall's tau", "configuration": ""},
        title=f"Kendall's tau per configuration (mean ± std over {int(table['seeds'].max())} seed(s))",
        color="configuration",
    )
    chart.update_layout(showlegend=False, height=420)
    st.plotly_chart(chart, key="matrix_chart")
    if derived:
        gain, closed = st.columns(2)
        gain.metric(
            "aerial+GSV over aerial",
            f"{100 * derived['gsv_gain_over_aerial_mean']:+.0f}% tau",
            help="(tau(aerial+GSV) - tau(aerial)) / tau(aerial), per seed, then averaged",
        )
        closed.metric(
            "Gap closed by building-filtered Flickr",
            f"{100 * derived['gap_closed_by_building_flickr_mean']:.0f}%",
            help="(tau(aerial+Flickr building) - tau(aerial)) / (tau(aerial+GSV) - tau(aerial))",
        )
    st.dataframe(table.set_index("configuration").round(3), width="stretch")
    common.provenance(source)


def main() -> None:
    root = common.root_or_stop()
    st.title("Sources compared")
    st.markdown(
        "Where each source has images, how old they are, and what each adds to the aerial "
        "model: Google Street View, Flickr, the City of Amsterdam's panoramas, Mapillary, "
        "your own photos, whichever the catalog holds."
    )
    present = data.catalog_sources(root)
    picked, unit_column = st.columns([5, 1])
    sources = picked.multiselect(
        "Sources to compare",
        present,
        default=present,
        key="sources_chosen",
        format_func=common.source_title,
    )
    with unit_column:
        unit = common.unit_picker(root, "sources_units")
    if len(sources) < 2:
        st.info(f"Choose two sources or more (the catalog has {len(present)}).")
    else:
        st.dataframe(source_table(root, tuple(sources)), width="stretch")
        coverage_maps(root, sources, unit)
        common.provenance(str(DataRoot(root).catalog))
    st.subheader("Each source in the fusion model")
    matrix(root)
    error_comparison(root, unit)


main()
