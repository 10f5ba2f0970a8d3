"""Widgets the pages share: the data-root guard, run pickers, the selected cell and its panel."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
import streamlit.components.v1 as components

from core.basemaps import Basemap
from core.dataroot import DataRoot
from core.grid import CELL_SIZE, cell_center, cell_origin
from core.layers import unit_means
from core.sources.lbm import SCORE_COLUMNS
from core.webmap import cell_map
from dashboard import data, maps

CELL_KEY = "selected_cell"
#: The finest choice of a map: the 100 m grid itself (or its blocks, for a big view).
CELLS = "100 m cells"
#: Units with fewer scored cells than ``MIN_UNIT_CELLS`` (core.layers) are drawn this faint.
FEW_ALPHA = 90
#: The run kind of ``predict``'s folders (train.predict.PREDICTION_KIND; the pages never import
#: train, which imports torch).
PREDICTION_KIND = "prediction"


def basemap_note(basemap: Basemap) -> str:
    """One line saying what the map is drawn on: the base map and its provider, or why none
    (the app then draws water and boundaries itself)."""
    if basemap.tiles:
        return f"Base map: {basemap.name} ({basemap.attribution_text})."
    drawn = "water, district lines and the municipal border are drawn by the app"
    if basemap.note:
        return f"Offline base map: {basemap.note}, so {drawn}."
    return f"No base map (basemap: none): {drawn}."


def root_or_stop() -> str:
    """The data root as a string; stops the page with instructions when it holds no grid."""
    root = data.data_root()
    if not data.is_data_root(root):
        st.error(
            f"No data in `{root}`. Build the demo city with `make demo` (or "
            f"`python -m train demo --out {root}`), or point `STADSBEELD_DATA` at a data root "
            "laid out as in the README."
        )
        st.stop()
    return str(root)


def run_title(run: pd.Series) -> str:
    """One line naming a run: label, target, test tau and id."""
    label = run.get("config.label") or run.get("config.name") or run["kind"]
    target = run.get("config.target")
    tau = run.get("metrics.test_kendall_tau")
    parts = [str(label)]
    if isinstance(target, str):
        parts.append(target)
    if tau is not None and not pd.isna(tau):
        parts.append(f"test tau {tau:.3f}")
    return " · ".join([*parts, run["run_id"]])


def run_picker(
    runs: pd.DataFrame,
    label: str,
    key: str,
    default_label: str | None = None,
    optional: bool = False,
) -> pd.Series | None:
    """A selectbox over runs (newest first); returns the chosen row, or None.

    Args:
        runs: rows of :func:`core.runs.list_runs`.
        default_label: preselect the newest run whose ``config.label`` is this.
        optional: offer "none" first (and return None for it).
    """
    options = ([None] if optional else []) + list(range(len(runs)))
    if not options:
        return None
    index = 0
    if default_label is not None and "config.label" in runs:
        matches = np.flatnonzero(runs["config.label"].to_numpy() == default_label)
        if len(matches):
            index = options.index(int(matches[0]))
    choice = st.selectbox(
        label,
        options,
        index=index,
        key=key,
        format_func=lambda i: "none" if i is None else run_title(runs.iloc[i]),
    )
    return None if choice is None else runs.iloc[choice]


def prediction_runs(root: str) -> pd.DataFrame:
    """Complete runs that hold per-cell predictions against Leefbaarometer labels.

    Prediction folders (``predict``: a year's scores of every cell, mostly without a label) are
    left out; the runs page lists them.
    """
    runs = data.load_runs(root)
    if runs.empty or "config.target" not in runs:
        return runs.iloc[0:0]
    keep = runs["config.target"].notna() & (runs["kind"] != PREDICTION_KIND)
    return runs[keep].reset_index(drop=True)


def selected_cell() -> int | None:
    """The cell selected on any page (map click or search), shared across pages."""
    return st.session_state.get(CELL_KEY)


def select_cell(cell_id: int | None) -> None:
    st.session_state[CELL_KEY] = None if cell_id is None else int(cell_id)


def provenance(*sources: str | Path) -> None:
    """A caption naming the files the numbers above come from."""
    st.caption("Source: " + ", ".join(f"`{s}`" for s in sources))


def cell_search(root: str, key: str, candidates: pd.Series | None = None) -> None:
    """Choose a cell by id or buurt name (the map click does the same)."""
    cells = data.load_cells(root)
    if candidates is not None:
        cells = cells[cells["cell_id"].isin(candidates)]
    left, right = st.columns(2)
    typed = left.text_input("Cell id", key=f"{key}_id", placeholder="e.g. 1210004856")
    buurten = sorted(b for b in cells["buurt_naam"].dropna().unique() if b)
    buurt = right.selectbox(
        "or a buurt",
        [None, *buurten],
        key=f"{key}_buurt",
        format_func=lambda b: "—" if b is None else b,
    )
    if typed.strip():
        if not typed.strip().isdigit() or int(typed) not in set(cells["cell_id"]):
            st.warning(
                f"No cell {typed.strip()!r} here; cell ids are whole numbers from the grid "
                "(hover a cell on the map to see its id)."
            )
        elif int(typed) != selected_cell():
            select_cell(int(typed))
    elif buurt is not None and st.session_state.get(f"{key}_last_buurt") != buurt:
        # The buurt's most central cell stands for it.
        inside = cells[cells["buurt_naam"] == buurt]
        centre = inside[["center_lon", "center_lat"]].mean().to_numpy()
        distance = ((inside[["center_lon", "center_lat"]].to_numpy() - centre) ** 2).sum(1)
        select_cell(int(inside["cell_id"].iloc[int(np.argmin(distance))]))
    st.session_state[f"{key}_last_buurt"] = buurt


def cell_detail(root: str, cell_id: int, run: pd.Series | None = None) -> None:
    """The selected cell: where it is, its scores, its aerial patch and street-level images."""
    cells = data.load_cells(root)
    row = cells[cells["cell_id"] == cell_id]
    if row.empty:
        st.info(f"Cell {cell_id} is not in this data root's grid.")
        return
    row = row.iloc[0]
    st.subheader(f"Cell {cell_id}")
    st.caption(
        f"{row['buurt_naam'] or 'outside the buurten'} · {row['district'] or '—'} · "
        f"lower-left corner {row['lat']:.5f} N, {row['lon']:.5f} E"
    )
    labels = data.load_labels(root)
    scores = labels[labels["cell_id"] == cell_id].set_index("jaar")[list(SCORE_COLUMNS)]
    local, facts = st.columns([1, 1])
    with local:
        components.html(local_map(root, cell_id, data.basemap(root)), height=LOCAL_MAP_PX)
        st.caption(
            "Aerial, 300 m around the cell"
            + (
                ""
                if data.aerial_patch(root, cell_id, LOCAL_PATCH_M) is not None
                else " (none here)"
            )
            + "; arrows are Street View images along their heading, dots photos without "
            "one (blue GSV, pink Flickr): click one for the photo."
        )
    with facts:
        if scores.empty:
            st.caption("No Leefbaarometer score for this cell (too few residents).")
        else:
            st.dataframe(scores.round(3), width="stretch")
        if run is not None:
            predictions = data.load_predictions(str(run["path"]))
            mine = predictions[predictions["cell_id"] == cell_id]
            if len(mine):
                p = mine.iloc[0]
                st.markdown(
                    f"Run `{run['run_id']}` ({run_title(run).split(' · ')[0]}), {p['split']} "
                    f"cell: predicted **{p['predicted']:.3f}**, true {p['true']:.3f}, "
                    f"residual {p['predicted'] - p['true']:+.3f}"
                )
    street_images(root, cell_id)


#: The cell panel's local map: its height, and the aerial patch it shows around the cell.
LOCAL_MAP_PX = 360
LOCAL_PATCH_M = 300.0


@st.cache_data(show_spinner=False, max_entries=32)
def local_map(root: str, cell_id: int, basemap: Basemap) -> str:
    """The cell panel's folium map (:func:`core.webmap.cell_map`) as a standalone HTML page:
    the aerial patch over ``basemap``, the cell's square and its street images as markers."""
    x0, y0 = cell_origin(np.array([cell_id]))
    cx, cy = cell_center(np.array([cell_id]))
    half = LOCAL_PATCH_M / 2
    images = data.load_images(root)
    mine = images[images["cell_id"] == cell_id].copy()
    mine["lon"], mine["lat"] = maps.to_lon_lat(mine["x"].to_numpy(), mine["y"].to_numpy())
    catalog_dir = DataRoot(root).catalog.parent
    mine["thumbnail"] = [data.thumbnail_uri(str(catalog_dir / p)) for p in mine["path"]]
    shown = cell_map(
        _lonlat_bounds(x0[0], y0[0], x0[0] + CELL_SIZE, y0[0] + CELL_SIZE),
        mine.to_dict("records"),
        data.aerial_patch(root, cell_id, LOCAL_PATCH_M),
        _lonlat_bounds(cx[0] - half, cy[0] - half, cx[0] + half, cy[0] + half),
        basemap,
    )
    return shown.get_root().render()


def _lonlat_bounds(west: float, south: float, east: float, north: float) -> tuple:
    """RD New bounds as lon/lat (west, south, east, north)."""
    lon, lat = maps.to_lon_lat(np.array([west, east]), np.array([south, north]))
    return (float(lon[0]), float(lat[0]), float(lon[1]), float(lat[1]))


#: Display names of the street-level sources; others show their catalog name.
SOURCE_TITLES = {
    "gsv": "Street View",
    "flickr": "Flickr",
    "amsterdam_panorama": "Amsterdam panoramas",
    "mapillary": "Mapillary",
    "other": "Own photos",
}


def source_title(source: str) -> str:
    """A source's display name (:data:`SOURCE_TITLES`, else its catalog name)."""
    return SOURCE_TITLES.get(source, source)


def street_images(root: str, cell_id: int, per_source: int = 6) -> None:
    """A cell's images of every source (GSV and Flickr always), Flickr ones with their scene
    and the filter's verdict, the others with their heading."""
    images = data.load_images(root)
    mine = images[images["cell_id"] == cell_id]
    catalog_dir = DataRoot(root).catalog.parent
    for source in data.catalog_sources(root, always=("gsv", "flickr")):
        title = source_title(source)
        shown = mine[mine["source"] == source].head(per_source)
        total = int((mine["source"] == source).sum())
        st.markdown(
            f"**{title}**: {total} image{'s' if total != 1 else ''}"
            + (f" (showing {len(shown)})" if total > len(shown) else "")
        )
        if shown.empty:
            continue
        columns = st.columns(min(per_source, len(shown)))
        for column, image in zip(columns, shown.itertuples(), strict=False):
            path = catalog_dir / image.path
            caption = str(image.captured_at)[:10]
            if source == "flickr" and isinstance(getattr(image, "scene", None), str):
                verdict = "kept" if image.building else "dropped"
                caption = f"{image.scene} ({image.scene_p:.2f}), building filter: {verdict}"
            elif source != "flickr" and not pd.isna(getattr(image, "heading", np.nan)):
                caption += f", heading {image.heading:.0f}°"
            shown_image = data.street_thumbnail(str(path))
            if isinstance(shown_image, str):
                column.caption(f"{image.path}: {shown_image}. {caption}")
            else:
                column.image(shown_image, caption=caption, width="stretch")


def unit_picker(root: str, key: str) -> str:
    """A selectbox: the 100 m cells (:data:`CELLS`) or a level of planners' units the root's
    grid names (buurt, wijk, stadsdeel)."""
    return st.selectbox("Show", [CELLS, *data.unit_levels(root)], key=key)


def per_unit(shown: pd.DataFrame, level: str, categorical: bool) -> pd.DataFrame:
    """``core.layers.unit_means`` of the cells in ``shown`` with each unit's map polygons: one
    row per polygon part of each unit; units without cells in ``shown`` are left out."""
    means = unit_means(shown, level, categorical)
    return data.load_units(level).merge(means, left_on="unit", right_index=True)


#: The columns a map's tooltip shows beside the value, where the rows have them.
DETAIL_COLUMNS = ("true", "predicted", "residual", "gsv", "flickr")


def map_payload(
    shown: pd.DataFrame, colours: np.ndarray, values: pd.Series, unit: str
) -> maps.Records:
    """The map's records of cells (``unit`` is :data:`CELLS`) or of :func:`per_unit` rows,
    with the :data:`DETAIL_COLUMNS` they have; units with too few cells to trust are drawn
    faint, not hidden."""
    details = shown[[c for c in DETAIL_COLUMNS if c in shown]]
    if unit == CELLS:
        return maps.cell_payload(shown, colours, values, details)
    alpha = np.where(shown["few"], FEW_ALPHA, 255)[:, None]
    return maps.unit_payload(shown, np.hstack([colours, alpha]), values, details)


def value_map(
    shown: pd.DataFrame,
    title: str,
    unit: str,
    scale: Callable[[np.ndarray, str], tuple[np.ndarray, maps.Legend]] = maps.diverging,
) -> tuple[maps.Records, maps.Legend, pd.DataFrame]:
    """A map of the cells' ``value`` coloured by ``scale`` (diverging: residuals, differences
    of errors), per cell or as the mean per planner's unit: its records, its legend and the
    rows drawn.

    Args:
        shown: one row per cell, as :func:`data.on_grid` gives it, with ``value`` and any of
            :data:`DETAIL_COLUMNS` for the tooltip.
    """
    if unit != CELLS:
        shown = per_unit(shown, unit, categorical=False)
        title += f", mean per {unit}"
    colours, legend = scale(shown["value"].to_numpy(float), title)
    return map_payload(shown, colours, shown["value"], unit), legend, shown


def unit_table(units: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """One row per unit of :func:`per_unit` rows: its name, ``cells``, ``few`` and ``columns``
    (renamed as given)."""
    table = units.drop_duplicates("unit").set_index("name")
    return table[["cells", *columns, "few"]].rename(columns=columns).round(3)
