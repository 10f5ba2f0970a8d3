"""Leefbaarometer 3.0 labels from the public WFS, or from the downloadable release.

The WFS (GeoServer, ``https://geo.leefbaarometer.nl/lbm3/ows``) serves one layer per edition,
``lbm3:clippedgridscore{YY}`` (``YY`` = the year's last two digits), with the 100 m squares
clipped to the built-up area. Features carry the deviations ``afw, fys, onv, soc, vrz, won``
(and, depending on the edition, the overall ``lbm`` score, a cell ``id`` and the classes
``kscore, kfys, ...``; the overall class ``kscore`` is kept as the cells' published class,
the dimensions' classes are left out).
It is paged with WFS 2.0 ``count``/``startIndex`` and filtered by an RD New bbox.

Both paths end in the two-file release layout of :func:`core.sources.lbm.write_lbm` at
``labels/lbm_scores.csv`` + ``labels/lbm_grid.gpkg`` of a :class:`~core.dataroot.DataRoot`.
Years already in those files are kept, so editions can be fetched one after another (2020,
then 2018 for the change layer). The raw download of each layer is kept under
``cache/lbm_wfs/`` as a GeoPackage of clipped cells, which :func:`core.sources.lbm.read_lbm`
reads, validates and rebuilds to full 100 m squares; a rerun reuses it without a request.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from os import PathLike
from pathlib import Path
from typing import IO, Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely
from pyproj import Transformer
from shapely.geometry.base import BaseGeometry

from core.dataroot import DataRoot
from core.grid import RD_NEW, Bounds, clip_cells
from core.io import write_atomic
from core.sources.http import Estimate, FetchError, HttpClient, Politeness
from core.sources.lbm import (
    CLASS_COLUMN,
    KEY_COLUMNS,
    NATIONAL_MEAN,
    SCORE_COLUMNS,
    read_lbm,
    stored_columns,
    write_lbm,
)

log = logging.getLogger(__name__)

LBM_WFS_URL = "https://geo.leefbaarometer.nl/lbm3/ows"
#: Features per GetFeature request; GeoServer pages any size, 1000 keeps responses ~1 MB.
PAGE_SIZE = 1000
#: The WFS is a small public service without a published quota: stay gentle.
LBM_POLITENESS = Politeness(requests_per_second=2.0, concurrency=1)
#: Size of one GeoJSON feature (clipped square with a dozen properties), for estimates.
BYTES_PER_FEATURE = 900

#: Accepted names (lower case) of each release column, in order of preference. The WFS and
#: the releases have used several spellings over the editions; of the classes only the overall
#: one (``kscore``) is kept.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "grid_id": ("grid_id", "gridid", "id", "grid_code", "gridcode"),
    "jaar": ("jaar", "year", "peiljaar"),
    "lbm": ("lbm", "lbm_score"),
    **{c: (c,) for c in ("afw", "fys", "onv", "soc", "vrz", "won")},
    CLASS_COLUMN: (CLASS_COLUMN,),
}


def lbm_layer(year: int) -> str:
    """The WFS type name of one edition, e.g. ``lbm3:clippedgridscore20`` for 2020."""
    if not 2000 <= int(year) <= 2099:
        raise ValueError(f"Leefbaarometer year must be a four-digit year 2000..2099, got {year!r}")
    return f"lbm3:clippedgridscore{int(year) % 100:02d}"


def rename_lbm_columns(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with its columns renamed to the release names (case-insensitive aliases).

    Columns without an alias are kept as they are; the first alias found wins.
    """
    lower = {str(c).lower(): c for c in table.columns}
    renames = {}
    for target, aliases in COLUMN_ALIASES.items():
        if target in table.columns:
            continue
        found = next((lower[a] for a in aliases if a in lower), None)
        if found is not None and found not in renames:
            renames[found] = target
    return table.rename(columns=renames)


def _with_overall_score(table: pd.DataFrame, source: str) -> pd.DataFrame:
    """Add ``lbm`` from ``afw`` where a source has only the deviation (some WFS editions)."""
    if "lbm" in table.columns or "afw" not in table.columns:
        return table
    log.warning(
        "%s: no 'lbm' column; using afw + %.2f (the approximate national mean)",
        source,
        NATIONAL_MEAN,
    )
    return table.assign(lbm=pd.to_numeric(table["afw"], errors="coerce") + NATIONAL_MEAN)


def _require(table: pd.DataFrame, columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        aliases = {c: list(COLUMN_ALIASES[c]) for c in missing}
        raise ValueError(
            f"{source}: missing Leefbaarometer columns {missing} (accepted names: "
            f"{aliases}; found {[str(c) for c in table.columns]})"
        )


# --- the WFS ---------------------------------------------------------------------------------


def _bbox_param(bbox_rd: Bounds) -> str:
    minx, miny, maxx, maxy = bbox_rd
    if not (maxx > minx and maxy > miny):
        raise ValueError(f"empty bbox {bbox_rd}")
    if max(abs(v) for v in bbox_rd) <= 180:
        raise ValueError(f"bbox {bbox_rd} looks like lon/lat degrees; give EPSG:28992 metres")
    return f"{minx:.0f},{miny:.0f},{maxx:.0f},{maxy:.0f},urn:ogc:def:crs:EPSG::28992"


def _feature_params(year: int, bbox_rd: Bounds) -> dict[str, Any]:
    return {
        "service": "WFS",
        "version": "2.0.0",
        "request": "GetFeature",
        "typeNames": lbm_layer(year),
        "srsName": "EPSG:28992",
        "bbox": _bbox_param(bbox_rd),
    }


def _xml_problem(body: str) -> str:
    """What an XML answer says: the ExceptionText of an OWS exception, else its kind."""
    text = re.search(r"<(?:\w+:)?ExceptionText>(.*?)</(?:\w+:)?ExceptionText>", body, re.S)
    if text:
        return f"the service reports: {text.group(1).strip()[:300]}"
    if "FeatureCollection" in body[:2000]:
        return "answered GML, not GeoJSON (outputFormat=application/json is not supported here)"
    return f"answered XML, not GeoJSON: {body[:200]!r}"


def _get_page(client: HttpClient, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    response = client.get(endpoint, params)
    shown = client.redact(response.url or endpoint)
    try:
        page = response.json()
    except ValueError:
        body = response.text.lstrip()
        problem = _xml_problem(body) if body.startswith("<") else f"not JSON: {body[:200]!r}"
        raise FetchError(f"{shown}: {problem}") from None
    if not isinstance(page, dict) or page.get("type") != "FeatureCollection":
        raise FetchError(f"{shown}: not a GeoJSON FeatureCollection: {str(page)[:200]!r}")
    return page


def _page_crs(page: dict[str, Any]) -> str:
    """CRS named by a GeoServer GeoJSON page; RD New (what we asked for) when absent."""
    name = str(((page.get("crs") or {}).get("properties") or {}).get("name", ""))
    code = re.search(r"EPSG:*(\d+)$", name)
    if "CRS84" in name:
        return "OGC:CRS84"
    return f"EPSG:{code.group(1)}" if code else RD_NEW


def count_lbm_cells(
    year: int, bbox_rd: Bounds, client: HttpClient | None = None, endpoint: str = LBM_WFS_URL
) -> int | None:
    """Cells of one edition in ``bbox_rd`` (a ``resultType=hits`` request), None if not told."""
    client = client or HttpClient(LBM_POLITENESS)
    response = client.get(endpoint, {**_feature_params(year, bbox_rd), "resultType": "hits"})
    matched = re.search(r'numberMatched="(\d+)"', response.text[:2000])
    return int(matched.group(1)) if matched else None


def fetch_lbm_features(
    year: int,
    bbox_rd: Bounds,
    client: HttpClient | None = None,
    endpoint: str = LBM_WFS_URL,
    page_size: int = PAGE_SIZE,
) -> gpd.GeoDataFrame:
    """All features of one edition in ``bbox_rd`` (EPSG:28992), paged, with release column names.

    Returns:
        GeoDataFrame in EPSG:28992 with ``grid_id`` (the cell's own id when the layer has
        none), ``jaar``, the score columns and the clipped geometry.

    Raises:
        FetchError: naming the URL, for HTTP failures, XML/GML or non-GeoJSON answers.
        ValueError: if the features lack the score columns.
    """
    client = client or HttpClient(LBM_POLITENESS)
    params = {
        **_feature_params(year, bbox_rd),
        "outputFormat": "application/json",
        "count": page_size,
    }
    frames, start = [], 0
    while True:
        try:
            page = _get_page(client, endpoint, {**params, "startIndex": start})
        except FetchError as exc:
            if exc.status != 400 and "HTTP 400" not in str(exc):
                raise
            raise FetchError(
                f"{exc}; is {year} a published edition? The layers are listed by "
                f"{endpoint}?service=WFS&request=GetCapabilities",
                exc.status,
            ) from None
        features = page.get("features") or []
        if features:
            frames.append(gpd.GeoDataFrame.from_features(features, crs=_page_crs(page)))
        start += len(features)
        # numberMatched may be absent or "unknown"; then a short page is the last one. A
        # server capping the page size below ours gives short pages that are not the last.
        matched = next(
            (page[k] for k in ("numberMatched", "totalFeatures") if isinstance(page.get(k), int)),
            None,
        )
        if not features or (start >= matched if matched is not None else len(features) < page_size):
            break
    source = f"{endpoint} {lbm_layer(year)}"
    if not frames:
        raise ValueError(
            f"{source}: no cells in bbox {bbox_rd}; is the bbox in EPSG:28992 metres "
            "inside the Netherlands, and was this year published?"
        )
    table = pd.concat([f.to_crs(RD_NEW) for f in frames], ignore_index=True)
    table = _with_overall_score(rename_lbm_columns(table), source)
    _require(table, SCORE_COLUMNS, source)
    if "jaar" not in table.columns:
        table["jaar"] = int(year)
    log.info("%s: %d cells in %d pages", source, len(table), len(frames))
    return gpd.GeoDataFrame(table, geometry="geometry", crs=RD_NEW)


def estimate_lbm(
    bbox_rd: Bounds,
    years: Iterable[int],
    client: HttpClient | None = None,
    endpoint: str = LBM_WFS_URL,
    page_size: int = PAGE_SIZE,
) -> Estimate:
    """Requests and bytes of fetching ``years`` in ``bbox_rd`` (EPSG:28992).

    Counts the cells with one ``resultType=hits`` request per year; where the server does not
    answer that, assumes every cell of the bbox is scored (an upper bound).
    """
    client = client or HttpClient(LBM_POLITENESS)
    minx, miny, maxx, maxy = bbox_rd
    bbox_cells = math.ceil((maxx - minx) * (maxy - miny) / 1e4)
    requests = cells = 0
    counted = True
    for year in years:
        try:
            n = count_lbm_cells(year, bbox_rd, client, endpoint)
        except FetchError as exc:
            log.info("could not count %s cells (%s); estimating from the bbox", year, exc)
            n = None
        counted &= n is not None
        n = bbox_cells if n is None else n
        cells += n
        requests += 1 + max(1, math.ceil(n / page_size))
    note = "open data, no key" + ("" if counted else "; cell count estimated from the bbox area")
    return Estimate(
        "Leefbaarometer WFS",
        requests,
        cells * BYTES_PER_FEATURE,
        client.politeness.requests_per_second,
        note,
    )


def fetch_lbm(
    root: DataRoot | str | PathLike,
    bbox_rd: Bounds,
    years: Iterable[int],
    boundary: BaseGeometry | None = None,
    client: HttpClient | None = None,
    endpoint: str = LBM_WFS_URL,
    page_size: int = PAGE_SIZE,
    refresh: bool = False,
) -> tuple[Path, Path]:
    """Fetch editions from the WFS into the data root's label files.

    Args:
        root: the data root; writes ``labels/lbm_scores.csv`` and ``labels/lbm_grid.gpkg``
            (other years already there are kept) and caches raw layers in ``cache/lbm_wfs``.
        bbox_rd: (minx, miny, maxx, maxy) in EPSG:28992.
        years: four-digit editions, e.g. ``(2020, 2018)``.
        boundary: keep only cells whose centre lies in this polygon (EPSG:28992).
        client: the HTTP client (default: :data:`LBM_POLITENESS`).
        endpoint: the WFS endpoint.
        page_size: features per request.
        refresh: fetch again even when the raw layer is cached.

    Returns:
        The score table and grid paths.
    """
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    client = client or HttpClient(LBM_POLITENESS)
    parts = []
    for year in dict.fromkeys(int(y) for y in years):
        name = "_".join([lbm_layer(year).split(":")[1], *(f"{v:.0f}" for v in bbox_rd)])
        raw = root.cache / "lbm_wfs" / f"{name}.gpkg"
        if refresh or not raw.is_file():
            features = fetch_lbm_features(year, bbox_rd, client, endpoint, page_size)
            columns = [*stored_columns(features), "geometry"]
            write_atomic(raw, lambda tmp, f=features[columns]: f.to_file(tmp, layer="cells"))
        parts.append(read_lbm(raw))  # validates, rebuilds clipped cells to full squares
    if not parts:
        raise ValueError("fetch_lbm: no years given")
    return _store(pd.concat(parts, ignore_index=True), root, boundary)


# --- the downloadable release ----------------------------------------------------------------


def _member(archive: Path, suffix: str, what: str) -> str:
    with zipfile.ZipFile(archive) as zf:
        names = [
            n
            for n in zf.namelist()
            if n.lower().endswith(suffix) and not Path(n).name.startswith(".")
        ]
    if len(names) != 1:
        raise ValueError(
            f"{archive}: expected exactly one {suffix} {what} in the zip, found {names}"
        )
    return names[0]


def _read_release_grid(path: Path, bbox_rd: Bounds | None) -> gpd.GeoDataFrame:
    source = (
        f"/vsizip/{path}/{_member(path, '.gpkg', 'grid')}" if path.suffix == ".zip" else str(path)
    )
    try:
        crs = pyogrio.read_info(source)["crs"]
        window = None
        if bbox_rd is not None:
            to_file = Transformer.from_crs(RD_NEW, crs or RD_NEW, always_xy=True)
            window = to_file.transform_bounds(*bbox_rd)
        grid = gpd.read_file(source, bbox=window)
    except Exception as exc:  # pyogrio raises several types for a missing or bad file
        raise ValueError(f"{path}: not a readable Leefbaarometer grid GeoPackage ({exc})") from exc
    if not isinstance(grid, gpd.GeoDataFrame):
        raise ValueError(f"{path}: not a Leefbaarometer grid GeoPackage (no geometry)")
    grid = rename_lbm_columns(grid)
    _require(grid, ("grid_id",), str(path))
    if grid.crs is None:
        raise ValueError(f"{path}: the grid has no CRS; expected EPSG:28992")
    grid = grid[["grid_id", grid.geometry.name]].to_crs(RD_NEW)
    if bbox_rd is not None:  # the file's bbox filter also keeps cells that only touch the box
        box = shapely.box(*bbox_rd)
        grid = grid[grid.intersects(box) & ~grid.touches(box)]
    return grid.assign(grid_id=grid["grid_id"].astype(str))


@contextlib.contextmanager
def _open_binary(path: Path, member: str | None) -> Iterator[IO[bytes]]:
    """``path``, or its zip ``member``, opened for reading bytes."""
    if member is None:
        with path.open("rb") as handle:
            yield handle
    else:
        with zipfile.ZipFile(path) as archive, archive.open(member) as handle:
            yield handle


def _read_release_scores(path: Path, grid_ids: set[str], years: set[int] | None) -> pd.DataFrame:
    """Rows of the score CSV for ``grid_ids`` (and ``years``), read in chunks: national
    tables hold millions of rows. Comma or semicolon separated."""
    member = _member(path, ".csv", "score table") if path.suffix == ".zip" else None
    try:
        with _open_binary(path, member) as handle:
            first = handle.readline().decode("utf-8-sig")
        sep = ";" if first.count(";") > first.count(",") else ","
        header = pd.read_csv(io.StringIO(first), sep=sep)
    except Exception as exc:  # zipfile and pandas raise several types for a bad file
        raise ValueError(f"{path}: not a readable Leefbaarometer score CSV ({exc})") from exc
    renamed = rename_lbm_columns(header)
    needed = [c for c in (*KEY_COLUMNS, *SCORE_COLUMNS) if c != "lbm" or "afw" not in renamed]
    _require(renamed, needed, str(path))
    id_column = header.columns[list(renamed.columns).index("grid_id")]
    kept = []
    with _open_binary(path, member) as handle:
        chunks = pd.read_csv(
            handle, sep=sep, chunksize=200_000, dtype={id_column: str}, encoding="utf-8-sig"
        )
        for chunk in chunks:
            chunk = rename_lbm_columns(chunk)
            chunk = chunk[chunk["grid_id"].isin(grid_ids)]
            if years is not None:
                chunk = chunk[pd.to_numeric(chunk["jaar"], errors="coerce").isin(years)]
            kept.append(chunk)
    return _with_overall_score(pd.concat(kept, ignore_index=True), str(path))


def import_lbm_release(
    root: DataRoot | str | PathLike,
    scores: str | PathLike,
    grid: str | PathLike | None = None,
    bbox_rd: Bounds | None = None,
    boundary: BaseGeometry | None = None,
    years: Iterable[int] | None = None,
) -> tuple[Path, Path]:
    """Clip the downloadable release (scores CSV + grid GeoPackage) into the data root.

    Args:
        root: the data root; writes ``labels/lbm_scores.csv`` and ``labels/lbm_grid.gpkg``
            (other years already there are kept).
        scores: the score CSV, or a .zip holding one .csv (and possibly the grid).
        grid: the grid GeoPackage or a .zip holding one .gpkg; None when ``scores`` is a zip
            holding both.
        bbox_rd: keep cells in this EPSG:28992 box (default: the boundary's box, else all).
        boundary: keep only cells whose centre lies in this polygon (EPSG:28992).
        years: keep only these editions.

    Raises:
        ValueError: naming the file, for unreadable files or missing columns, or when no
            cell is left after clipping.
    """
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    scores, grid = Path(scores), Path(grid if grid is not None else scores)
    for path in {scores, grid}:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Leefbaarometer release file not found")
    if bbox_rd is None and boundary is not None:
        bbox_rd = boundary.bounds
    cells = _read_release_grid(grid, bbox_rd)
    table = _read_release_scores(
        scores, set(cells["grid_id"]), None if years is None else {int(y) for y in years}
    )
    if table.empty:
        raise ValueError(
            f"{scores}: no scores for the {len(cells)} grid cells in bbox {bbox_rd}"
            + ("" if years is None else f" and years {sorted(years)}")
        )
    raw = gpd.GeoDataFrame(
        table[stored_columns(table)].merge(cells, on="grid_id"),
        geometry=cells.geometry.name,
        crs=RD_NEW,
    )
    path = root.cache / "lbm_release" / f"{scores.stem}.gpkg"
    write_atomic(path, lambda tmp: raw.to_file(tmp, layer="cells"))
    return _store(read_lbm(path), root, boundary)


# --- storing ---------------------------------------------------------------------------------


def _store(
    labels: gpd.GeoDataFrame, root: DataRoot, boundary: BaseGeometry | None
) -> tuple[Path, Path]:
    """Write ``labels`` (from :func:`read_lbm`) into the root, keeping the root's other years."""
    if boundary is not None:
        inside = clip_cells(labels["cell_id"].to_numpy(), shapely.make_valid(boundary))
        labels = labels[np.isin(labels["cell_id"].to_numpy(), inside)]
        if labels.empty:
            raise ValueError(
                "no Leefbaarometer cell has its centre inside the boundary; is the "
                "boundary in EPSG:28992?"
            )
    if root.scores.is_file() and root.lbm_grid.is_file():
        existing = read_lbm(root.scores, root.lbm_grid)
        kept = existing[~existing["jaar"].isin(labels["jaar"].unique())]
        labels = pd.concat([kept, labels], ignore_index=True)
    labels = gpd.GeoDataFrame(labels, geometry="geometry", crs=RD_NEW)
    labels = labels.sort_values(["jaar", "cell_id"], ignore_index=True)
    return write_lbm(labels, root.scores, root.lbm_grid)
