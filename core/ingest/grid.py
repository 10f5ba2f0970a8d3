"""The grid step of a fetch: ``grid.parquet``, the municipality's 100 m cells."""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.dataroot import DataRoot
from core.grid import grid_for_boundary, to_geodataframe, write_grid
from core.ingest.area import FetchArea
from core.sources.lbm import read_lbm

#: The grid's step name in ``fetch.json``.
GRID_STEP = "grid"
AMSTERDAM_CODE = "0363"


def build_grid(root: DataRoot, area: FetchArea) -> int:
    """Write ``grid.parquet``: the area's cells with buurt, district and ``labelled``.

    The cells are those whose centre lies in the outline, and every cell the root's labels
    score (flagged ``labelled``). Amsterdam's cells get their buurt and stadsdeel from
    ``assets/``; elsewhere (and in Amsterdam's cells outside every buurt) the district is the
    municipality's name.

    Returns:
        The number of cells.
    """
    ids = grid_for_boundary(area.outline)
    labelled = np.zeros(len(ids), bool)
    if root.scores.is_file() and root.lbm_grid.is_file():
        label_ids = read_lbm(root.scores, root.lbm_grid)["cell_id"].unique()
        ids = np.union1d(ids, label_ids)
        labelled = np.isin(ids, label_ids)
    if area.code.removeprefix("GM") == AMSTERDAM_CODE:
        from core.sources.boundaries import assign_buurten  # reads the assets' buurten only here

        places = assign_buurten(ids)
    else:
        places = pd.DataFrame(
            {c: "" for c in ("buurt_code", "buurt_naam", "cbs_code", "district")},
            index=range(len(ids)),
        )
    places["district"] = places["district"].replace("", area.name)
    write_grid(
        to_geodataframe(ids, **{c: places[c].to_numpy() for c in places}, labelled=labelled),
        root.grid,
    )
    return len(ids)
