"""City map: the 100 m grid coloured by a score, a prediction, a residual, a class or the split."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import streamlit as st

from core import layers
from core.dataroot import DataRoot
from core.grid import CELL_SIZE
from core.runs import PREDICTIONS_FILE
from dashboard import common, data, maps


@dataclass(frozen=True)
class MapLayer:
    """One layer as the page shows it: the map records and what the side panel says."""

    payload: maps.Records
    legend: maps.Legend
    description: str
    sources: list[str]
    block: float  # the size of the squares drawn: 100 m, or coarser blocks
    cells: int  # cells with a value
    mean: float | None  # of the numeric values; None for classes
    per_district: pd.DataFrame  # count and mean of the numeric values per district


@st.cache_resource(show_spinner="Colouring the map ...", max_entries=64)
def layer(
    root: str,
    run_path: str | None,
    layer_name: str,
    year: int | None,
    year_from: int | None,
    split: str = "all",
    unit: str = common.CELLS,
) -> MapLayer:
    """One layer of labels (``run_path`` None) or of a run's predictions, with the numbers the
    side panel shows, computed once: squares of 100 m, or coarser blocks when the view holds
    more than ``maps.MAX_MAP_CELLS`` cells, or planners' units (``unit``: buurt, wijk or
    stadsdeel; the mean over their scored cells, or the most common class). A run's layer
    shows the cells of one ``split`` or all. Shared between reruns and sessions: do not
    modify."""
    cells, coverage = data.load_cells(root), data.load_coverage(root)
    if run_path is None:
        labels = data.load_labels(root)
        source = DataRoot(root).scores
        values, description, _ = layers.label_values(labels, layer_name, year, year_from, source)
        this_year = labels[labels["jaar"] == year].set_index("cell_id")
        details = this_year[["lbm"]].rename(columns={"lbm": "true"})
        sources = [str(source)]
    else:
        predictions = data.load_predictions(run_path)
        run_name = run_path.rsplit("/", 1)[-1]
        values, description, _ = layers.run_values(predictions, layer_name, split, run_name)
        details = predictions.set_index("cell_id")[["true", "predicted", "residual"]]
        sources = [f"{run_path}/{PREDICTIONS_FILE}"]
    values = values.set_index("cell_id")["value"]
    shown = cells.merge(values, left_on="cell_id", right_index=True)
    shown = shown.merge(details, left_on="cell_id", right_index=True, how="left")
    shown = shown.merge(coverage[["cell_id", "gsv", "flickr"]], on="cell_id", how="left")
    numbers = pd.to_numeric(shown["value"], errors="coerce").rename("value")
    per_district = numbers.groupby(shown["district"]).agg(["count", "mean"]).round(3)
    cells_shown = len(shown)
    categorical = layer_name in layers.CATEGORICAL
    block = CELL_SIZE if unit != common.CELLS else maps.view_block_size(shown["cell_id"].to_numpy())
    if unit != common.CELLS:
        shown = common.per_unit(shown, unit, categorical)
        description += f", {'most common' if categorical else 'mean'} per {unit}"
        per_district = common.unit_table(shown, {"value": "most common" if categorical else "mean"})
    elif block > CELL_SIZE:
        shown = maps.aggregate_blocks(shown, block, categorical)
        description += f", {'most common' if categorical else 'mean'} per {block:g} m block"
    colours, legend = layers.layer_colours(layer_name, shown["value"], description)
    payload = common.map_payload(shown, colours, shown["value"], unit)
    mean = float(numbers.mean()) if numbers.notna().any() else None
    return MapLayer(payload, legend, description, sources, block, cells_shown, mean, per_district)


def main() -> None:
    root = common.root_or_stop()
    st.title("City map")
    runs = common.prediction_runs(root)
    years = data.label_years(root)
    controls = st.columns([2, 2, 1, 1, 1])
    with controls[4]:
        unit = common.unit_picker(root, "map_units")
    run = None
    with controls[0]:
        run = common.run_picker(runs, "Scores from", key="map_run", optional=True)
    year = year_from = None
    if run is None:
        options = [c for c in layers.LABEL_LAYERS if c != "change" or len(years) > 1]
        layer_name = controls[1].selectbox(
            "Layer", options, key="map_layer", format_func=layers.LABEL_LAYERS.get
        )
        year = controls[2].selectbox("Year", years, index=len(years) - 1, key="map_year")
        if layer_name == "change":
            earlier = [y for y in years if y < year] or years[:1]
            year_from = controls[3].selectbox("From year", earlier, key="map_year_from")
    else:
        layer_name = controls[1].selectbox(
            "Layer",
            list(layers.RUN_LAYERS),
            key="map_run_layer",
            format_func=lambda c: (
                f"{layers.RUN_LAYERS[c]} ({run['config.target']})"
                if c in ("predicted", "true")
                else layers.RUN_LAYERS[c]
            ),
        )
        split = controls[2].selectbox("Cells", ["all", "test", "val", "train"], key="map_split")
    shown = layer(
        root,
        None if run is None else str(run["path"]),
        layer_name,
        year,
        year_from,
        "all" if run is None else split,
        unit,
    )

    selected = common.selected_cell()
    per_cell = shown.block == CELL_SIZE and unit == common.CELLS
    left, right = st.columns([3, 1])
    context = data.load_context(root)
    with left:
        chart = maps.city_deck(
            shown.payload,
            context,
            shown.description.split(",")[0],
            [] if selected is None else [selected],
            cell_size=shown.block,
            units=unit != common.CELLS,
        )
        event = st.pydeck_chart(
            chart,
            height=620,
            on_select="rerun" if per_cell else "ignore",  # a block is not a cell
            selection_mode="single-object",
            key="city_map",
        )
        picked = maps.selected_cells(event) if per_cell else []
        if picked and picked[0] != selected:
            common.select_cell(picked[0])
            st.rerun()
        st.markdown(shown.legend.html(), unsafe_allow_html=True)
        st.caption(common.basemap_note(context["basemap"]))
        if per_cell:
            st.caption(
                "Hover a cell for its scores and image counts; click it to open its details below."
            )
        elif unit != common.CELLS:
            st.caption(
                f"Each {unit} shows the "
                f"{'most common value' if layer_name in layers.CATEGORICAL else 'mean'} "
                f"of its scored cells; hover one for its numbers. Faint ones have fewer than "
                f"{layers.MIN_UNIT_CELLS} scored cells, too few to trust."
            )
        else:
            st.caption(
                f"{shown.cells:,} cells are more than one view sends "
                f"({maps.MAX_MAP_CELLS:,}), so the map shows {shown.block:g} m blocks: hover one "
                "for its cell count and mean values. Find a cell by its id on the Embedding "
                "neighbours page to see it at 100 m."
            )
    with right:
        st.metric("Cells shown", f"{shown.cells:,}")
        if shown.block > CELL_SIZE:
            st.metric(f"{shown.block:g} m blocks drawn", f"{len(shown.payload):,}")
        if run is not None:
            for name in ("test_kendall_tau", "test_spearman", "test_r2", "test_mae"):
                value = run.get(f"metrics.{name}")
                if value is not None and not pd.isna(value):
                    st.metric(name.replace("test_", "test ").replace("_", " "), f"{value:.3f}")
        elif shown.mean is not None:
            st.metric("Mean", f"{shown.mean:.3f}")
        if shown.mean is not None:
            st.dataframe(shown.per_district, width="stretch")
        common.provenance(*shown.sources)
    if selected is not None:
        common.cell_detail(root, selected, run)
    else:
        st.info("Click a cell on the map to see its aerial patch, street-level images and scores.")


main()
