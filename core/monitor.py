"""Monitoring: the change between two years' predictions of one ensemble, and its uncertainty.

Contract:

- A change compares two prediction folders (``stadsbeeld predict``, kind ``prediction``) made by
  the same members on the same data root: the earlier year ``before`` and the later ``after``.
  Anything else is refused with the reason (other members, another root, the same year).
- Per cell: ``change`` is the ensemble mean of ``after`` minus that of ``before``. Its
  ``change_uncertainty`` is the standard deviation over the members of each member's own change
  (``ddof=1``): a member's bias that is the same in both years cancels in its change, so the
  spread of the members' changes, not the two years' spreads added, says how sure the change
  is. NaN with one member.
- A cell to look at has a change of at least ``threshold`` (in the target's units) that is at
  least ``z`` times its uncertainty.
- A prediction folder whose config or predictions lack what a change needs (a whole-number
  year, a list of member run ids, ``uncertainty`` and one ``member_<i>`` column per member) is
  not usable (:func:`unusable` says why): the Monitor page leaves it out with that note rather
  than crash or show a change without its uncertainty.
- Nothing here imports torch: the dashboard's Monitor page reads it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.runs import CONFIG_FILE, PREDICTION_COLUMNS, PREDICTIONS_FILE, Run

#: A cell to look at: its change is this many times its uncertainty, or more.
LOOK_Z = 2.0
#: The held-out-year validation's report in a root's ``reports/`` (``validate-change``).
VALIDATION_FILE = "change_validation.json"


def member_columns(predictions: pd.DataFrame) -> list[str]:
    """The per-member score columns of a prediction (``member_0``, ``member_1``, ...)."""
    return [c for c in predictions.columns if c.startswith("member_")]


def unusable(prediction: Run) -> str | None:
    """Why a prediction folder cannot make a change (None when it can), naming the file.

    Its config must give ``year`` as a whole number and ``members`` as a list of ``{run_id:
    ...}``; its ``predictions.parquet`` must hold the run columns, ``uncertainty`` and
    ``member_0`` ... ``member_<n-1>`` for its n members. Reads only the Parquet footer, so a
    page can check every folder it lists.
    """
    config = prediction.path / CONFIG_FILE
    year = prediction.config.get("year")
    if isinstance(year, bool) or not isinstance(year, int):
        return f"{config}: year {year!r} is not a year"
    members = prediction.config.get("members")
    if (
        not isinstance(members, list)
        or not members
        or not all(isinstance(m, dict) and isinstance(m.get("run_id"), str) for m in members)
    ):
        return f"{config}: members {members!r} is not a list of runs ({{run_id: ...}})"
    path = prediction.path / PREDICTIONS_FILE
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as exc:
        return f"{path}: not a readable Parquet file ({exc})"
    wanted = [*PREDICTION_COLUMNS, "uncertainty", *(f"member_{i}" for i in range(len(members)))]
    missing = [c for c in wanted if c not in names]
    if missing:
        return f"{path}: missing column(s) {missing} of a prediction of {len(members)} member(s)"
    return None


def comparable(before: Run, after: Run) -> str | None:
    """Why two predictions cannot make a change (None when they can)."""
    members = [[m["run_id"] for m in run.config.get("members", [])] for run in (before, after)]
    if not members[0] or members[0] != members[1]:
        return f"{before.run_id} and {after.run_id} were made by other runs ({members[0]} vs {members[1]})"
    if before.config.get("data") != after.config.get("data"):
        return f"{before.run_id} and {after.run_id} predict other data roots"
    if int(before.config["year"]) >= int(after.config["year"]):
        return f"{before.run_id} ({before.config['year']}) is not earlier than {after.run_id} ({after.config['year']})"
    return None


def change(before: Run, after: Run) -> pd.DataFrame:
    """Per cell: both years' predictions, their change and its uncertainty.

    Returns:
        One row per cell of both: ``cell_id``, ``predicted_before``, ``predicted_after``,
        ``uncertainty_after``, ``change``, ``change_uncertainty``, ``true_before`` and
        ``true_after`` (NaN where the year has no labels).

    Raises:
        ValueError: if the two cannot be compared (:func:`comparable`).
    """
    problem = comparable(before, after)
    if problem:
        raise ValueError(problem)
    a = before.predictions().set_index("cell_id")
    b = after.predictions().set_index("cell_id")
    cells = a.index.intersection(b.index)
    a, b = a.loc[cells], b.loc[cells]
    members = member_columns(b)
    per_member = b[members].to_numpy(np.float64) - a[members].to_numpy(np.float64)
    spread = per_member.std(axis=1, ddof=1) if len(members) > 1 else np.full(len(cells), np.nan)
    return pd.DataFrame(
        {
            "cell_id": cells.to_numpy(np.int64),
            "predicted_before": a["predicted"].to_numpy(np.float64),
            "predicted_after": b["predicted"].to_numpy(np.float64),
            "uncertainty_after": b["uncertainty"].to_numpy(np.float64),
            "change": b["predicted"].to_numpy(np.float64) - a["predicted"].to_numpy(np.float64),
            "change_uncertainty": spread,
            "true_before": a["true"].to_numpy(np.float64),
            "true_after": b["true"].to_numpy(np.float64),
        }
    )


def to_look_at(changes: pd.DataFrame, threshold: float, z: float = LOOK_Z) -> pd.Series:
    """Whether each cell's change is large (``threshold`` or more) and sure (``z`` times its
    uncertainty or more); a change without an uncertainty is never sure."""
    size = changes["change"].abs()
    return (size >= threshold) & (size >= z * changes["change_uncertainty"])


def pairs(predictions: Iterable[Run]) -> list[tuple[Run, Run]]:
    """Every (earlier, later) pair of ``predictions`` that makes a change, latest first."""
    runs = sorted(predictions, key=lambda r: int(r.config["year"]), reverse=True)
    return [
        (before, after)
        for i, after in enumerate(runs)
        for before in runs[i + 1 :]
        if comparable(before, after) is None
    ]
