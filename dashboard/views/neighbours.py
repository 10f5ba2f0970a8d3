"""Embedding neighbours: the cells a run's embedding finds most similar to a chosen cell."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from core.neighbours import EmbeddingIndex
from core.runs import EMBEDDINGS_FILE, INDEX_FILE, PREDICTIONS_FILE
from dashboard import common, data, maps


@st.cache_resource(show_spinner="Indexing embeddings ...", max_entries=4)
def embedding_index(run_path: str) -> EmbeddingIndex:
    """The run's per-cell embeddings, indexed once per run and shared by all sessions (an
    approximate index of a large run is cached in the run folder; see core.search)."""
    return EmbeddingIndex(*data.load_embeddings(run_path), cache=Path(run_path) / INDEX_FILE)


def embedding_runs(root: str) -> pd.DataFrame:
    """Complete runs that wrote per-cell embeddings (fusion, contrastive, UGE, ...)."""
    runs = data.load_runs(root)
    has = [(p / EMBEDDINGS_FILE).is_file() for p in runs["path"]] if len(runs) else []
    return runs[has].reset_index(drop=True)


def on_grid_table(root: str, run: pd.Series, found: pd.DataFrame) -> pd.DataFrame:
    """Found cells (rank, cell_id, similarity) with where they are and their scores (true and
    predicted when the run has them)."""
    table = data.on_grid(root, found)[["rank", "cell_id", "similarity", "buurt_naam", "district"]]
    predictions_file = run["path"] / PREDICTIONS_FILE
    if predictions_file.is_file():
        predictions = data.load_predictions(str(run["path"]))[["cell_id", "true", "predicted"]]
        table = table.merge(predictions, on="cell_id", how="left")
    return table.sort_values("rank", ignore_index=True)


def main() -> None:
    root = common.root_or_stop()
    st.title("Embedding neighbours")
    runs = embedding_runs(root)
    if runs.empty:
        st.info(
            "No run with per-cell embeddings yet (fusion runs write their penultimate vectors)."
        )
        return
    kinds = sorted(runs["kind"].unique())
    kind_column, run_column, k_column = st.columns([1, 3, 1])
    # Encoders made for embeddings first: the fusion vector is a by-product of regression.
    preferred = next((k for k in ("uge", "contrastive") if k in kinds), kinds[0])
    kind = kind_column.selectbox("Model kind", kinds, index=kinds.index(preferred), key="nb_kind")
    with run_column:
        run = common.run_picker(
            runs[runs["kind"] == kind].reset_index(drop=True), "Embedding of run", key="nb_run"
        )
    k = k_column.slider("k nearest cells", 1, 200, 20, key="nb_k")
    index = embedding_index(str(run["path"]))
    query = ""
    if kind == "uge":  # a VLM run embeds text in the same space as its cells
        query = st.text_input(
            "Text query",
            key="nb_text",
            placeholder="green street near water in Oost",
            help="Ranks the cells by how well their images and street graph match the text",
        )
    if query.strip():
        from dashboard.text_query import text_vector

        table = on_grid_table(root, run, index.search(text_vector(str(run["path"]), query), k))
        cell_id = None
    else:
        common.cell_search(root, key="nb_search", candidates=pd.Series(index.cell_ids))
        cell_id = common.selected_cell()
        if cell_id is None:  # start from the embedded cell nearest the middle of the grid
            cells = data.on_grid(root, pd.DataFrame({"cell_id": index.cell_ids}))
            centre = cells[["center_lon", "center_lat"]].median().to_numpy()
            cell_id = int(
                cells["cell_id"].iloc[
                    ((cells[["center_lon", "center_lat"]] - centre) ** 2).sum(axis=1).argmin()
                ]
            )
            common.select_cell(cell_id)
        if cell_id not in index:
            st.warning(
                f"Cell {cell_id} has no embedding in run {run['run_id']}; choose another cell."
            )
            return
        table = on_grid_table(root, run, index.neighbours(cell_id, k))

    cells = data.load_cells(root)
    chart, legend = neighbour_deck(root, table, cell_id)
    event = st.pydeck_chart(
        chart, height=560, on_select="rerun", selection_mode="single-object", key="nb_map"
    )
    picked = maps.selected_cells(event)
    if picked and cell_id is not None and picked[0] != cell_id and picked[0] in index:
        common.select_cell(picked[0])
        st.rerun()
    if cell_id is None:
        st.markdown(legend.html(), unsafe_allow_html=True)
        st.markdown(
            f"**{len(table)} cells that best match “{query.strip()}”** in the {index.dim}-dimensional "
            f"embedding of `{run['run_id']}`:"
        )
    else:
        st.markdown(
            legend.html() + " <small>magenta outline: the chosen cell</small>",
            unsafe_allow_html=True,
        )
        here = cells[cells["cell_id"] == cell_id].iloc[0]
        st.markdown(
            f"**{len(table)} cells nearest to cell {cell_id}** ({here['buurt_naam'] or '—'}, "
            f"{here['district'] or '—'}) in the {index.dim}-dimensional embedding of `{run['run_id']}`:"
        )
    st.dataframe(table.round(3), width="stretch", hide_index=True)
    common.provenance(f"{run['path']}/{EMBEDDINGS_FILE}")
    if cell_id is not None:
        side_by_side(root, runs, run, table, cell_id, k)


def neighbour_deck(root: str, table: pd.DataFrame, cell_id: int | None) -> tuple:
    """The found cells coloured by similarity, the chosen cell outlined; and the legend."""
    shown = data.on_grid(root, table[["cell_id", "similarity"]])
    colours, legend = maps.sequential(
        shown["similarity"].to_numpy(float), "cosine similarity", maps.SIMILARITY_PALETTE
    )
    payload = maps.cell_payload(shown, colours, shown["similarity"])
    context = data.load_context(root)
    below, above = maps.context_layers(context)
    layers = [*below, maps.cell_layer(payload, opacity=1.0), *above]
    if cell_id is not None:
        layers.append(maps.highlight_layer([cell_id], (255, 0, 160)))
    return maps.deck(layers, "similarity", context["view"], basemap=context["basemap"]), legend


def side_by_side(
    root: str, runs: pd.DataFrame, run: pd.Series, table: pd.DataFrame, cell_id: int, k: int
) -> None:
    """The same cell's k nearest cells under one or two more models, each beside the other,
    with how many of them the models share."""
    others = runs[runs["run_id"] != run["run_id"]].reset_index(drop=True)
    if others.empty:
        return
    chosen = st.multiselect(
        "Compare with other models (the same cell)",
        list(range(len(others))),
        format_func=lambda i: f"{others.loc[i, 'kind']}: {common.run_title(others.loc[i])}",
        max_selections=2,
        key="nb_compare",
    )
    if not chosen:
        return
    first = set(table["cell_id"])
    columns = st.columns(len(chosen))
    for number, (column, i) in enumerate(zip(columns, chosen, strict=True)):
        other = others.loc[i]
        with column:
            st.markdown(f"**{other['kind']}** `{other['run_id']}`")
            index = embedding_index(str(other["path"]))
            if cell_id not in index:
                st.caption(f"Cell {cell_id} has no embedding in this run.")
                continue
            found = on_grid_table(root, other, index.neighbours(cell_id, k))
            st.pydeck_chart(
                neighbour_deck(root, found, cell_id)[0], height=360, key=f"nb_side_{number}"
            )
            shared = len(first & set(found["cell_id"]))
            st.metric(f"shared with {run['kind']} {run['run_id']}", f"{shared} of {k}")
            st.dataframe(found.round(3), width="stretch", hide_index=True, height=240)
            common.provenance(f"{other['path']}/{EMBEDDINGS_FILE}")


main()
