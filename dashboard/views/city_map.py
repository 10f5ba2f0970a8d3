"""City map: the 100 m grid coloured by a score, a prediction, a residual, a class or the split."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from core.dataroot import DataRoot
from core.grid import CELL_SIZE
from core.runs import PREDICTIONS_FILE
from core.sources.lbm import CLASS_NAMES
from dashboard import common, data, maps

LABEL_LAYERS = {
    **common.LAYER_NAMES,
    "lbm_class": "Leefbaarometer class 1..9",
    "change": "change between two years",
}
RUN_LAYERS = {
    "predicted": "predicted score",
    "true": "true score",
    "residual": "residual (predicted - true)",
    "split": "split (train / val / test)",
}


@st.cache_resource(show_spinner="Colouring the map ...", max_entries=32)
def layer(
    root: str, run_path: str | None, layer_name: str, year: int | None, year_from: int | None
) -> tuple[list[dict], pd.DataFrame, maps.Legend, str, list[str], float]:
    """One layer: its map records, the values shown (``cell_id, district, value`` per cell),
    its legend, a description, the files it comes from and the size of the squares drawn
    (100 m, or coarser blocks when the view holds more than ``maps.MAX_MAP_CELLS`` cells).
    Shared between reruns: do not modify."""
    cells, coverage = data.load_cells(root), data.load_coverage(root)
    if run_path is None:
        labels = data.load_labels(root)
        this_year = labels[labels["jaar"] == year].set_index("cell_id")
        if layer_name == "change":
            before = labels[labels["jaar"] == year_from].set_index("cell_id")["lbm"]
            values = (this_year["lbm"] - before).dropna().rename("value")
            description = f"change in lbm from {year_from} to {year}"
        else:
            values = this_year[layer_name].dropna().rename("value")
            description = f"{LABEL_LAYERS[layer_name]}, {year}"
        details = this_year[["lbm"]].rename(columns={"lbm": "true"})
        sources = [str(DataRoot(root).scores)]
    else:
        predictions = data.load_predictions(run_path).set_index("cell_id")
        values = predictions[layer_name].rename("value")
        details = predictions[["true", "predicted", "residual"]]
        description = f"{RUN_LAYERS[layer_name]} of run {run_path.rsplit('/', 1)[-1]}"
        sources = [f"{run_path}/{PREDICTIONS_FILE}"]
    shown = cells.merge(values, left_on="cell_id", right_index=True)
    shown = shown.merge(details, left_on="cell_id", right_index=True, how="left")
    shown = shown.merge(coverage[["cell_id", "gsv", "flickr"]], on="cell_id", how="left")
    values = shown[["cell_id", "district", "value"]]
    block = maps.view_block_size(shown["cell_id"].to_numpy())
    if block > CELL_SIZE:
        categorical = layer_name in ("split", "lbm_class")
        shown = maps.aggregate_blocks(shown, block, categorical)
        description += f", {'most common' if categorical else 'mean'} per {block:g} m block"
    if layer_name == "split":
        colours, legend = maps.categorical(shown["value"], maps.SPLIT_PALETTE, description)
    elif layer_name == "lbm_class":
        colours, legend = maps.categorical(
            shown["value"].astype(int), maps.CLASS_PALETTE, description
        )
        legend = maps.Legend(
            legend.title, [(c, f"{k} {CLASS_NAMES[int(k) - 1]}") for c, k in legend.stops]
        )
    elif layer_name in ("residual", "change"):
        colours, legend = maps.diverging(shown["value"].to_numpy(float), description)
    else:
        colours, legend = maps.sequential(shown["value"].to_numpy(float), description)
    payload = maps.cell_payload(
        shown,
        colours,
        shown["value"],
        shown[[c for c in ("true", "predicted", "residual", "gsv", "flickr") if c in shown]],
    )
    return payload, values, legend, description, sources, block


def main() -> None:
    root = common.root_or_stop()
    st.title("City map")
    labels = data.load_labels(root)
    runs = common.prediction_runs(root)
    years = sorted(int(y) for y in labels["jaar"].unique())
    controls = st.columns([2, 2, 1, 1])
    run = None
    with controls[0]:
        run = common.run_picker(runs, "Scores from", key="map_run", optional=True)
    year = year_from = None
    if run is None:
        options = [c for c in LABEL_LAYERS if c != "change" or len(years) > 1]
        layer_name = controls[1].selectbox(
            "Layer", options, key="map_layer", format_func=LABEL_LAYERS.get
        )
        year = controls[2].selectbox("Year", years, index=len(years) - 1, key="map_year")
        if layer_name == "change":
            earlier = [y for y in years if y < year] or years[:1]
            year_from = controls[3].selectbox("From year", earlier, key="map_year_from")
    else:
        layer_name = controls[1].selectbox(
            "Layer",
            list(RUN_LAYERS),
            key="map_run_layer",
            format_func=lambda c: (
                f"{RUN_LAYERS[c]} ({run['config.target']})"
                if c in ("predicted", "true")
                else RUN_LAYERS[c]
            ),
        )
        split = controls[2].selectbox("Cells", ["all", "test", "val", "train"], key="map_split")
    payload, values, legend, description, sources, block = layer(
        root, None if run is None else str(run["path"]), layer_name, year, year_from
    )
    if run is not None and split != "all":
        kept = set(data.load_predictions(str(run["path"])).query("split == @split")["cell_id"])
        values = values[values["cell_id"].isin(kept)]
        if block == CELL_SIZE:  # blocks mix the splits: they stay whole
            payload = [record for record in payload if record["i"] in kept]

    selected = common.selected_cell()
    left, right = st.columns([3, 1])
    with left:
        chart = maps.city_deck(
            payload,
            data.load_context(root),
            description.split(",")[0],
            [] if selected is None else [selected],
            cell_size=block,
        )
        event = st.pydeck_chart(
            chart,
            height=620,
            on_select="rerun" if block == CELL_SIZE else "ignore",  # a block is not a cell
            selection_mode="single-object",
            key="city_map",
        )
        picked = maps.selected_cells(event) if block == CELL_SIZE else []
        if picked and picked[0] != selected:
            common.select_cell(picked[0])
            st.rerun()
        st.markdown(legend.html(), unsafe_allow_html=True)
        if block == CELL_SIZE:
            st.caption(
                "Hover a cell for its scores and image counts; click it to open its details "
                "below. Water, district lines and the municipal border are drawn without "
                "base-map tiles."
            )
        else:
            st.caption(
                f"{len(values):,} cells are more than one view sends "
                f"({maps.MAX_MAP_CELLS:,}), so the map shows {block:g} m blocks: hover one for "
                "its cell count and mean values. Find a cell by its id on the Embedding "
                "neighbours page to see it at 100 m."
            )
    with right:
        numbers = pd.to_numeric(values["value"], errors="coerce")
        st.metric("Cells shown", f"{len(values):,}")
        if block > CELL_SIZE:
            st.metric(f"{block:g} m blocks drawn", f"{len(payload):,}")
        if run is not None:
            for name in ("test_kendall_tau", "test_spearman", "test_r2", "test_mae"):
                value = run.get(f"metrics.{name}")
                if value is not None and not pd.isna(value):
                    st.metric(name.replace("test_", "test ").replace("_", " "), f"{value:.3f}")
        elif numbers.notna().any():
            st.metric("Mean", f"{numbers.mean():.3f}")
        if numbers.notna().any():
            per_district = (
                values.assign(value=numbers)
                .groupby("district")["value"]
                .agg(["count", "mean"])
                .round(3)
            )
            st.dataframe(per_district, width="stretch")
        common.provenance(*sources)
    if selected is not None:
        common.cell_detail(root, selected, run)
    else:
        st.info("Click a cell on the map to see its aerial patch, street-level images and scores.")


main()
