"""The grid step of a fetch: ``grid.parquet``, the 100 m cells of the area's municipalities."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import shapely

from core.dataroot import DataRoot
from core.grid import cell_center, grid_for_boundary, to_geodataframe, write_grid
from core.ingest.area import FetchArea
from core.sources.lbm import read_lbm
from core.sources.pdok_boundaries import Municipality

#: The grid's step name in ``fetch.json``.
GRID_STEP = "grid"
AMSTERDAM_CODE = "0363"


def build_grid(root: DataRoot, area: FetchArea) -> int:
    """Write ``grid.parquet``: the area's cells with their municipality, buurt, district and
    ``labelled``.

    The cells are those whose centre lies in the outline (the union, for several
    municipalities), and every cell the root's labels score (flagged ``labelled``). Each cell
    records its municipality (``gemeente_code``, ``gemeente_naam``). Amsterdam's cells get
    their buurt and stadsdeel from ``assets/``; elsewhere (and in Amsterdam's cells outside
    every buurt) the district is the municipality's name.

    Returns:
        The number of cells.
    """
    ids = grid_for_boundary(area.outline)
    labelled = np.zeros(len(ids), bool)
    if root.scores.is_file() and root.lbm_grid.is_file():
        label_ids = read_lbm(root.scores, root.lbm_grid)["cell_id"].unique()
        ids = np.union1d(ids, label_ids)
        labelled = np.isin(ids, label_ids)
    municipalities = area.municipalities
    which = cell_municipalities(ids, municipalities)
    codes = np.array([m.code for m in municipalities], dtype=object)[which]
    names = np.array([m.name for m in municipalities], dtype=object)[which]
    places = pd.DataFrame(
        {c: "" for c in ("buurt_code", "buurt_naam", "cbs_code", "district")},
        index=range(len(ids)),
    )
    amsterdam = np.array([str(c).removeprefix("GM") == AMSTERDAM_CODE for c in codes], bool)
    if amsterdam.any():
        from core.sources.boundaries import assign_buurten  # reads the assets' buurten only here

        buurten = assign_buurten(ids[amsterdam])
        places.loc[amsterdam, list(buurten.columns)] = buurten.to_numpy()
    places["district"] = places["district"].where(places["district"] != "", names)
    write_grid(
        to_geodataframe(
            ids,
            gemeente_code=codes.astype(str),
            gemeente_naam=names.astype(str),
            **{c: places[c].to_numpy() for c in places},
            labelled=labelled,
        ),
        root.grid,
    )
    return len(ids)


def cell_municipalities(ids: np.ndarray, municipalities: Sequence[Municipality]) -> np.ndarray:
    """The index into ``municipalities`` of each cell: the first whose outline holds the cell's
    centre, else (a labelled cell just outside every outline) the nearest."""
    if len(municipalities) == 1:
        return np.zeros(len(ids), int)
    points = shapely.points(*cell_center(ids))
    tree = shapely.STRtree([m.geometry for m in municipalities])
    which = np.full(len(ids), -1)
    point_idx, outline_idx = tree.query(points, predicate="intersects")
    # a centre on a shared border lies in two outlines: the first (lowest code) wins
    order = np.lexsort((outline_idx, point_idx))
    first = np.unique(point_idx[order], return_index=True)[1]
    which[point_idx[order][first]] = outline_idx[order][first]
    outside = np.flatnonzero(which < 0)
    if len(outside):
        point_idx, outline_idx = tree.query_nearest(points[outside], all_matches=False)
        which[outside[point_idx]] = outline_idx
    return which
