"""Amsterdam's neighbourhoods (buurten), districts (stadsdelen) and outline from ``assets/``."""

from __future__ import annotations

import functools
from os import PathLike
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from shapely.geometry.base import BaseGeometry

from core import ASSETS
from core.grid import RD_NEW, cell_center
from core.io import read_table, require_columns

BUURTEN_FILE = ASSETS / "amsterdam_buurten_2022.geojson"
LANDMARKS_FILE = ASSETS / "amsterdam_landmarks.csv"

#: District (stadsdeel) of each first letter of a buurt ``code``.
DISTRICTS: dict[str, str] = {
    "A": "Centrum",
    "B": "Westpoort",
    "E": "West",
    "F": "Nieuw-West",
    "K": "Zuid",
    "M": "Oost",
    "N": "Noord",
    "S": "Weesp",
    "T": "Zuidoost",
}


def read_buurten(path: str | PathLike = BUURTEN_FILE) -> gpd.GeoDataFrame:
    """Neighbourhood polygons in EPSG:28992 with ``code``, ``naam``, ``cbsCode`` and ``district``."""
    return _read_buurten_cached(str(Path(path).resolve())).copy()


@functools.lru_cache(maxsize=4)
def _read_buurten_cached(path: str) -> gpd.GeoDataFrame:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: neighbourhood file not found")
    buurten = gpd.read_file(path)
    missing = {"code", "naam", "cbsCode"} - set(buurten.columns)
    if missing:
        raise ValueError(f"{path}: missing properties {sorted(missing)}")
    if buurten.crs is None:
        raise ValueError(f"{path}: no coordinate reference system")
    buurten = buurten.to_crs(RD_NEW)
    unknown = sorted(set(buurten["code"].str[0]) - set(DISTRICTS))
    if unknown:
        raise ValueError(f"{path}: buurt codes start with unknown district letters {unknown}")
    buurten["district"] = buurten["code"].str[0].map(DISTRICTS)
    buurten["geometry"] = shapely.make_valid(buurten.geometry.values)
    return buurten[["code", "naam", "cbsCode", "district", "geometry"]]


def districts(buurten: gpd.GeoDataFrame | None = None) -> gpd.GeoDataFrame:
    """District polygons (union of their buurten), EPSG:28992."""
    buurten = read_buurten() if buurten is None else buurten
    return buurten.dissolve(by="district", as_index=False)[["district", "geometry"]]


#: Planners' units, finest first, as the grid names a cell's unit.
UNIT_LEVELS = ("buurt", "wijk", "stadsdeel")


def unit_polygons(level: str, buurten: gpd.GeoDataFrame | None = None) -> gpd.GeoDataFrame:
    """Polygons of one level of :data:`UNIT_LEVELS`, EPSG:28992, with ``unit`` (the code a
    cell's :func:`cell_units` gives), ``name`` and ``geometry``.

    Wijken are the unions of their buurten (a wijk's code is the first two letters of its
    buurten's codes); the shipped file has no wijk names, so a wijk is named by its code and
    stadsdeel.

    Raises:
        ValueError: for an unknown level.
    """
    buurten = read_buurten() if buurten is None else buurten
    if level == "buurt":
        out = buurten.assign(unit=buurten["code"], name=buurten["naam"])
    elif level == "wijk":
        out = buurten.assign(unit=buurten["code"].str[:2]).dissolve(by="unit", as_index=False)
        out["name"] = "wijk " + out["unit"] + " (" + out["district"] + ")"
    elif level == "stadsdeel":
        out = districts(buurten).assign(unit=lambda d: d["district"], name=lambda d: d["district"])
    else:
        raise ValueError(f"unknown unit level {level!r}; expected one of {list(UNIT_LEVELS)}")
    return out[["unit", "name", "geometry"]].reset_index(drop=True)


def cell_units(cells: pd.DataFrame, level: str) -> pd.Series:
    """The unit of each cell at ``level`` from the grid's ``buurt_code`` and ``district``
    columns (:func:`assign_buurten`); empty where the cell lies in none."""
    if level == "stadsdeel":
        return cells["district"].fillna("").astype(str)
    codes = cells["buurt_code"].fillna("").astype(str) if "buurt_code" in cells else None
    if codes is None or level not in ("buurt", "wijk"):
        raise ValueError(f"no {level!r} units: the grid has no buurt_code column")
    return codes if level == "buurt" else codes.str[:2]


def municipality_outline(buurten: gpd.GeoDataFrame | None = None) -> BaseGeometry:
    """The municipality of Amsterdam as one (multi)polygon in EPSG:28992."""
    buurten = read_buurten() if buurten is None else buurten
    return shapely.union_all(buurten.geometry.values)


def assign_buurten(ids: np.ndarray, buurten: gpd.GeoDataFrame | None = None) -> pd.DataFrame:
    """Buurt code, name, CBS code and district of each cell centre (empty strings outside).

    Returns:
        DataFrame aligned with ``ids`` with columns ``buurt_code``, ``buurt_naam``,
        ``cbs_code``, ``district``.
    """
    buurten = read_buurten() if buurten is None else buurten
    cx, cy = cell_center(ids)
    points = shapely.points(cx, cy)
    tree = shapely.STRtree(buurten.geometry.values)
    point_idx, buurt_idx = tree.query(points, predicate="intersects")
    # A point on a shared edge matches two buurten: keep the first match per point.
    first = np.unique(point_idx, return_index=True)[1]
    out = pd.DataFrame(
        {"buurt_code": "", "buurt_naam": "", "cbs_code": "", "district": ""}, index=range(len(ids))
    )
    rows = buurten.iloc[buurt_idx[first]]
    out.loc[point_idx[first], "buurt_code"] = rows["code"].to_numpy()
    out.loc[point_idx[first], "buurt_naam"] = rows["naam"].to_numpy()
    out.loc[point_idx[first], "cbs_code"] = rows["cbsCode"].to_numpy()
    out.loc[point_idx[first], "district"] = rows["district"].to_numpy()
    return out


def read_landmarks(path: str | PathLike = LANDMARKS_FILE) -> gpd.GeoDataFrame:
    """Named landmarks (``name``, ``kind``) as points in EPSG:28992."""
    table = read_table(path, "landmarks")
    require_columns(table, ("name", "kind", "lat", "lon"), path)
    points = gpd.GeoDataFrame(
        table[["name", "kind"]],
        geometry=gpd.points_from_xy(table["lon"], table["lat"]),
        crs="EPSG:4326",
    )
    return points.to_crs(RD_NEW)
