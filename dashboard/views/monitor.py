"""Monitor: the latest predicted scores, the change since the last release, how sure it is, and
the cells to look at; every number from two prediction folders of one ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from core.dataroot import DataRoot
from core.monitor import LOOK_Z, VALIDATION_FILE, change, pairs, to_look_at, unusable
from core.runs import load_run
from core.sources.boundaries import cell_units
from dashboard import common, data, maps

LAYERS = {
    "after": "predicted score",
    "change": "change",
    "change_uncertainty": "uncertainty of the change",
    "look": "cells to look at",
}
LOOK_PALETTE = {
    "rising": [178, 24, 43],
    "falling": [33, 102, 172],
    "no sure change": [220, 220, 220],
}


@st.cache_data(show_spinner=False)
def prediction_pairs(
    folders: tuple[str, ...],
) -> tuple[list[tuple[str, str, int, int, str, str]], list[str]]:
    """Every two of the prediction ``folders`` made by one ensemble, latest year first, each
    folder read once: ``(before folder, after folder, first year, last year, target, title)``
    (plain tuples: the cache pickles them, and a class of this page script would not pickle),
    and a note for each folder left out because it cannot make a change.

    Keyed by the folders the root lists (re-listed every few seconds), so a new prediction
    appears and a folder that became unreadable drops out without a restart.
    """
    loaded, notes = [], []
    for path in folders:
        try:
            run = load_run(path)
        except (OSError, ValueError) as error:
            problem = str(error) if path in str(error) else f"{path}: {error}"
        else:
            problem = unusable(run)
        if problem is None:
            loaded.append(run)
        else:
            notes.append(f"skipping prediction {Path(path).name}: {problem}")
    options = [
        (
            str(a.path),
            str(b.path),
            int(a.config["year"]),
            int(b.config["year"]),
            b.config.get("target", "score"),
            f"{b.config['year']} vs {a.config['year']} · {b.config.get('label', b.run_id)} · "
            f"{b.run_id} / {a.run_id}",
        )
        for a, b in pairs(loaded)
    ]
    return options, notes


@st.cache_data(show_spinner="Comparing the two years ...")
def changes_on_grid(root: str, before: str, after: str) -> pd.DataFrame:
    """:func:`core.monitor.change` of two prediction folders, joined to the grid."""
    return data.on_grid(root, change(load_run(before), load_run(after)))


def validation(root: str) -> None:
    """The held-out-year validation of change (``validate-change``), where the root has one:
    how far the page's change can be trusted."""
    path = DataRoot(root).reports / VALIDATION_FILE
    if not path.is_file():
        st.caption(
            "No held-out-year validation of change for this root yet: "
            "`stadsbeeld validate-change` measures how well predicted change matches the "
            "labels' change (README, Monitoring)."
        )
        return
    try:
        report = json.loads(path.read_text())
        rows = {
            name: {
                "tau of change": c["ensemble"]["tau_change"],
                "sign right (large changes)": c["ensemble"]["sign_agreement"],
                "MAE carry forward": c["ensemble"]["mae_carry_forward"],
                "MAE carry forward + change": c["ensemble"]["mae_carry_forward_plus_change"],
                "change inside its 90% interval": c["calibration_change"]["coverage_90"],
            }
            for name, c in report["configurations"].items()
        }
    except (ValueError, KeyError, TypeError) as error:
        st.warning(f"{path}: not a validation report ({error}); skipped")
        return
    st.subheader("How far to trust the change")
    st.caption(
        f"Trained on {report['train_year']}, predicting {report['train_year']}→"
        f"{report['test_year']} on held-out cells: a model beats the planner's default only "
        "where 'MAE carry forward + change' is below 'MAE carry forward'."
    )
    st.dataframe(pd.DataFrame(rows).T.round(3), width="stretch")
    common.provenance(path)


def main() -> None:
    root = common.root_or_stop()
    st.title("Monitor")
    folders = data.load_runs(root, kind=common.PREDICTION_KIND)["path"]
    options, notes = prediction_pairs(tuple(str(f) for f in folders))
    for note in notes:
        st.warning(note, icon=":material/warning:")
    if not options:
        st.info(
            "No two predictions of one ensemble yet. Predict the last release's year and a later "
            "one with the same runs: `stadsbeeld predict --run A,B,C --year 2022` and "
            "`--year 2024`, or queue **Predict a year** in the sidebar."
        )
        return
    index = st.selectbox(
        "Predictions",
        range(len(options)),
        format_func=lambda i: options[i][-1],
        key="monitor_pair",
    )
    before, after, first, last, target, _ = options[index]
    try:
        frame = changes_on_grid(root, before, after)
    except (OSError, ValueError, KeyError) as error:
        # A folder changed on disk after it was listed and checked: say which, keep the page.
        st.error(f"Cannot compare {Path(before).name} and {Path(after).name}: {error}")
        return
    spread = float(np.nanstd(frame["change"])) or 0.01
    left, middle, right = st.columns(3)
    layer = left.radio(
        "Layer",
        list(LAYERS),
        format_func=lambda k: f"{LAYERS[k]} ({last})" if k == "after" else LAYERS[k],
        key="monitor_layer",
    )
    threshold = middle.number_input(
        f"Large change (in {target})",
        min_value=0.0,
        value=round(spread, 3),
        step=0.005,
        format="%.3f",
        key="monitor_threshold",
    )
    unit = common.unit_picker(root, key="monitor_unit")
    with right:
        st.caption(
            f"A cell to look at changes by {threshold:.3f} or more, at least {LOOK_Z:g} times "
            "the spread of the members' changes."
        )
    frame = frame.assign(
        look=to_look_at(frame, threshold),
        predicted=frame["predicted_after"],
        true=frame["true_after"],
    )
    look = frame["look"]
    columns = st.columns(4)
    columns[0].metric("Cells predicted", f"{len(frame):,}")
    columns[1].metric(f"Mean change {first}→{last}", f"{frame['change'].mean():+.4f}")
    columns[2].metric(
        "Median uncertainty of the change", f"{np.nanmedian(frame['change_uncertainty']):.4f}"
    )
    columns[3].metric("Cells to look at", f"{int(look.sum()):,}")

    if layer == "look" and unit == common.CELLS:
        labels = np.where(
            look, np.where(frame["change"] > 0, "rising", "falling"), "no sure change"
        )
        colours, legend = maps.categorical(pd.Series(labels), LOOK_PALETTE, LAYERS["look"])
        payload = common.map_payload(frame, colours, frame["change"], unit)
        shown = frame
    else:
        value = {"after": "predicted_after", "look": "look"}.get(layer, layer)
        title = (
            f"{LAYERS[layer]} {first}→{last}" if layer != "after" else f"predicted {target} {last}"
        )
        scale = maps.diverging if layer == "change" else maps.sequential
        if layer == "look":
            title = "share of cells to look at"
        payload, legend, shown = common.value_map(
            frame.assign(value=frame[value].astype(float)), title, unit, scale
        )
    st.pydeck_chart(
        maps.city_deck(payload, data.load_context(root), LAYERS[layer], units=unit != common.CELLS),
        height=520,
        key="monitor_map",
    )
    st.markdown(legend.html(), unsafe_allow_html=True)

    if "buurt" in data.unit_levels(root):
        st.subheader("Per buurt")
        per_buurt = common.per_unit(frame.assign(value=frame["change"]), "buurt", categorical=False)
        table = common.unit_table(
            per_buurt, {"predicted": f"predicted {last}", "value": "mean change"}
        )
        names = per_buurt.drop_duplicates("unit").set_index("unit")["name"]
        looks = frame["look"].groupby(cell_units(frame, "buurt").to_numpy()).sum()
        table["cells to look at"] = looks.rename(names).reindex(table.index).fillna(0).astype(int)
        st.dataframe(table.sort_values("mean change"), width="stretch")
    st.subheader("Cells to look at")
    st.dataframe(
        frame.loc[
            look,
            [
                "cell_id",
                "buurt_naam",
                "predicted_before",
                "predicted_after",
                "change",
                "change_uncertainty",
            ],
        ]
        .sort_values("change")
        .round(4),
        width="stretch",
        hide_index=True,
    )
    common.provenance(before, after)
    validation(root)


main()
