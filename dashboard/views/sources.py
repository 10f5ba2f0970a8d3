"""GSV vs Flickr: the experiment matrix, the gap filtered Flickr closes, and where each errs more."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from core.dataroot import DataRoot
from core.experiments import AERIAL_FLICKR_BUILDING, AERIAL_GSV, summarise_matrix
from core.runs import PREDICTIONS_FILE
from core.sources.boundaries import cell_units
from dashboard import common, data, maps


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


def main() -> None:
    root = common.root_or_stop()
    st.title("GSV vs Flickr")
    st.markdown(
        "Does scene-filtered Flickr stand in for Google Street View where GSV is missing? "
        "Each configuration adds one kind of ground imagery to the aerial model."
    )
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

    st.subheader("Where each source's model errs more")
    runs = common.prediction_runs(root)
    runs = runs[runs["kind"] == "fusion"].reset_index(drop=True)
    left, right, split_column = st.columns([3, 3, 1])
    with left:
        gsv_run = common.run_picker(runs, "GSV model", key="sources_gsv", default_label=AERIAL_GSV)
    with right:
        flickr_run = common.run_picker(
            runs, "Flickr model", key="sources_flickr", default_label=AERIAL_FLICKR_BUILDING
        )
    split = split_column.selectbox("Cells", ["test", "all"], key="sources_split")
    with split_column:
        unit = common.unit_picker(root, "sources_units")
    if gsv_run is None or flickr_run is None:
        return
    first = data.on_grid(root, data.load_predictions(str(gsv_run["path"])))
    second = data.load_predictions(str(flickr_run["path"]))
    both = first.merge(
        second[["cell_id", "predicted", "residual"]], on="cell_id", suffixes=("_gsv", "_flickr")
    )
    if split != "all":
        both = both[both["split"] == split]
    if both.empty:
        st.warning("The two runs share no cells here.")
        return
    both["difference"] = both["residual_flickr"].abs() - both["residual_gsv"].abs()
    shown = both.assign(
        value=both["difference"], predicted=both["predicted_gsv"], residual=both["residual_gsv"]
    )
    title = "|error| of the Flickr model minus |error| of the GSV model"
    payload, legend, shown = common.value_map(shown, title, unit)
    st.pydeck_chart(
        maps.city_deck(
            payload,
            data.load_context(root),
            "Flickr |error| - GSV |error|",
            units=unit != common.CELLS,
        ),
        height=520,
        key="sources_map",
    )
    st.markdown(
        legend.html() + " <small>red: the Flickr model errs more; blue: the GSV model errs more"
        "</small>",
        unsafe_allow_html=True,
    )
    share = (both["difference"] > 0).mean()
    st.markdown(
        f"The GSV model is closer to the truth in **{100 * share:.0f}%** of {len(both):,} cells; "
        f"mean |error| GSV {both['residual_gsv'].abs().mean():.3f}, "
        f"Flickr {both['residual_flickr'].abs().mean():.3f}."
    )
    where = both["district"] if unit == common.CELLS else cell_units(both, unit).rename(unit)
    per_district = (
        both.assign(flickr_worse=both["difference"] > 0)[where != ""]
        .groupby(where[where != ""])
        .agg(
            cells=("cell_id", "size"),
            gsv_abs_error=("residual_gsv", lambda r: r.abs().mean()),
            flickr_abs_error=("residual_flickr", lambda r: r.abs().mean()),
            flickr_worse=("flickr_worse", "mean"),
        )
    )
    st.dataframe(per_district.round(3), width="stretch")
    common.provenance(
        f"{gsv_run['path']}/{PREDICTIONS_FILE}", f"{flickr_run['path']}/{PREDICTIONS_FILE}"
    )


main()
