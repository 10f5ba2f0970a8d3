"""Leefbaarometer 3.0 reader: real CSV + GeoPackage/GeoParquet files built in tmp_path."""

from __future__ import annotations

import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from geopandas.testing import assert_geodataframe_equal

from core.grid import cell_index, cell_origin, cell_polygons, cells_in_bounds
from core.sources.lbm import (
    CLASS_COLUMN,
    CLASS_NAMES,
    DIMENSIONS,
    LABEL_COLUMNS,
    LBM_CLASS_EDGES,
    NATIONAL_MEAN,
    SCORE_COLUMNS,
    lbm_class,
    read_lbm,
    target,
    write_lbm,
)

IDS = cells_in_bounds((121000, 487000, 121300, 487200))  # 3 x 2 cells near the Dam
YEARS = (2020, 2022)


def wfs_id(ids: np.ndarray) -> list[str]:
    """Grid ids in the WFS scheme (``E1213N4879``), deliberately unlike our cell ids."""
    ix, iy = cell_index(ids)
    return [f"E{a}N{b}" for a, b in zip(ix, iy, strict=True)]


def score_table(ids: np.ndarray = IDS, years: tuple[int, ...] = YEARS) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = len(ids) * len(years)
    dims = rng.uniform(-0.2, 0.2, (n, len(DIMENSIONS)))
    afw = dims.sum(axis=1)
    table = pd.DataFrame(dims, columns=list(DIMENSIONS))
    table.insert(0, "afw", afw)
    table.insert(0, "lbm", NATIONAL_MEAN + afw)
    table.insert(0, "jaar", np.repeat(years, len(ids)))
    table.insert(0, "grid_id", wfs_id(np.tile(ids, len(years))))
    return table


def grid_frame(ids: np.ndarray = IDS, shapes: np.ndarray | None = None) -> gpd.GeoDataFrame:
    shapes = cell_polygons(ids) if shapes is None else shapes
    return gpd.GeoDataFrame({"grid_id": wfs_id(ids)}, geometry=shapes, crs="EPSG:28992")


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, Path]:
    """The two-file release format: scores CSV and grid GeoPackage."""
    scores, grid = tmp_path / "scores.csv", tmp_path / "grid.gpkg"
    score_table().to_csv(scores, index=False)
    grid_frame().to_file(grid, driver="GPKG")
    return scores, grid


def test_read_two_files(release: tuple[Path, Path]) -> None:
    labels = read_lbm(*release)

    assert list(labels.columns) == list(LABEL_COLUMNS)
    assert labels.crs.to_epsg() == 28992
    assert len(labels) == len(IDS) * len(YEARS)
    assert labels["jaar"].tolist() == sorted(labels["jaar"].tolist())
    one_year = labels[labels["jaar"] == 2022]
    # cell_id comes from the geometry, not from the WFS-style grid_id.
    assert one_year["cell_id"].tolist() == sorted(IDS.tolist())
    assert one_year["grid_id"].tolist() == wfs_id(one_year["cell_id"].to_numpy())
    assert shapely.equals(one_year.geometry.values, cell_polygons(one_year["cell_id"])).all()
    expected = score_table().set_index(["grid_id", "jaar"])
    got = labels.set_index(["grid_id", "jaar"])
    for column in SCORE_COLUMNS:
        np.testing.assert_allclose(got[column], expected.loc[got.index, column])
    np.testing.assert_array_equal(labels["lbm_class"], lbm_class(labels["lbm"]))


def test_year_filter(release: tuple[Path, Path]) -> None:
    labels = read_lbm(*release, year=2020)
    assert set(labels["jaar"]) == {2020}
    assert len(labels) == len(IDS)


def test_absent_year_lists_available_years(release: tuple[Path, Path]) -> None:
    with pytest.raises(
        ValueError, match=r"scores.csv: no scores for year 2030; available years: \[2020, 2022\]"
    ):
        read_lbm(*release, year=2030)


def test_clipped_cells_are_rebuilt_to_full_squares(tmp_path: Path) -> None:
    x0, y0 = cell_origin(IDS)
    clipped = shapely.box(x0 + 10, y0 + 20, x0 + 60, y0 + 95)  # as the WFS clips to buildings
    clipped[0] = shapely.MultiPolygon(
        [
            shapely.box(x0[0], y0[0], x0[0] + 10, y0[0] + 10),
            shapely.box(x0[0] + 50, y0[0] + 50, x0[0] + 99, y0[0] + 99),
        ]
    )
    score_table().to_csv(tmp_path / "s.csv", index=False)
    grid_frame(shapes=clipped).to_file(tmp_path / "g.gpkg")

    labels = read_lbm(tmp_path / "s.csv", tmp_path / "g.gpkg", year=2020)

    assert sorted(labels["cell_id"]) == sorted(IDS)
    np.testing.assert_allclose(labels.area, 10_000.0)


def test_grid_in_another_crs_is_reprojected(tmp_path: Path, release: tuple[Path, Path]) -> None:
    grid_frame().to_crs("EPSG:4326").to_file(tmp_path / "wgs84.gpkg")
    labels = read_lbm(release[0], tmp_path / "wgs84.gpkg")
    assert_geodataframe_equal(labels, read_lbm(*release))


@pytest.mark.parametrize("name", ["combined.parquet", "combined.gpkg"])
def test_combined_scores_and_geometry(
    tmp_path: Path, release: tuple[Path, Path], name: str
) -> None:
    table = score_table()
    shapes = cell_polygons(np.tile(IDS, len(YEARS)))
    combined = gpd.GeoDataFrame(table, geometry=shapes, crs="EPSG:28992")
    if name.endswith(".parquet"):
        combined.to_parquet(tmp_path / name)
    else:
        combined.to_file(tmp_path / name)

    assert_geodataframe_equal(read_lbm(tmp_path / name), read_lbm(*release))


def test_nan_scores_are_kept(tmp_path: Path) -> None:
    table = score_table()
    table.loc[2, "won"] = np.nan
    table.to_csv(tmp_path / "s.csv", index=False)
    grid_frame().to_file(tmp_path / "g.gpkg")
    labels = read_lbm(tmp_path / "s.csv", tmp_path / "g.gpkg")
    assert len(labels) == len(table)
    assert labels["won"].isna().sum() == 1


def _drop_columns(t: pd.DataFrame) -> pd.DataFrame:
    return t.drop(columns=["soc", "won"])


def _text_in_fys(t: pd.DataFrame) -> pd.DataFrame:
    t["fys"] = t["fys"].astype(object)
    t.loc[1, "fys"] = "abc"
    return t


def _duplicate_row(t: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([t, t.iloc[[3]]])


def _unknown_grid_ids(t: pd.DataFrame) -> pd.DataFrame:
    t.loc[[0, 1], "grid_id"] = ["E1N1", "E2N2"]
    return t


def _missing_year(t: pd.DataFrame) -> pd.DataFrame:
    t["jaar"] = t["jaar"].astype(float)
    t.loc[4, "jaar"] = np.nan
    return t


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (_drop_columns, r"scores.csv: missing columns \['soc', 'won'\]"),
        (
            _text_in_fys,
            r"scores.csv: column 'fys' has 1 non-numeric values, e.g. row 2 \(grid_id 'E1211N4870'\): 'abc'",
        ),
        (
            _duplicate_row,
            r"scores.csv: 1 \(grid_id, jaar\) pairs occur more than once, e.g. \[\('E1210N4871', 2020\)\]",
        ),
        (
            _unknown_grid_ids,
            r"scores.csv: 2 grid_ids are absent from the grid .*g.gpkg, e.g. \['E1N1', 'E2N2'\]",
        ),
        (_missing_year, r"scores.csv: 1 rows have no jaar, e.g. row 5"),
    ],
)
def test_bad_scores_are_rejected(tmp_path: Path, mutate, match: str) -> None:
    mutate(score_table()).to_csv(tmp_path / "scores.csv", index=False)
    grid_frame().to_file(tmp_path / "g.gpkg")
    with pytest.raises(ValueError, match=match):
        read_lbm(tmp_path / "scores.csv", tmp_path / "g.gpkg")


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        # Shifted by half a cell: each square straddles four cells.
        ("shifted", r"grid.gpkg: 6 geometries are not 100 m squares aligned to the 100 m grid"),
        (
            "big",
            r"not 100 m squares aligned to the 100 m grid \(they extend beyond their cell\), e.g. grid_id 'E1210N4870'",
        ),
        (
            "same_cell",
            r"grid.gpkg: grid_ids \['E1210N4870', 'E1211N4870'\] all lie in the same 100 m cell 12104870",
        ),
        ("points", r"grid.gpkg: 6 geometries are missing, empty or not polygons"),
    ],
)
def test_bad_grid_geometry_is_rejected(tmp_path: Path, shapes: str, match: str) -> None:
    x0, y0 = cell_origin(IDS)
    geometry = {
        "shifted": shapely.box(x0 + 50, y0 + 50, x0 + 150, y0 + 150),
        "big": shapely.box(x0, y0, x0 + 200, y0 + 200),
        "same_cell": np.where(
            IDS[1] == IDS, shapely.box(x0[0], y0[0], x0[0] + 100, y0[0] + 100), cell_polygons(IDS)
        ),
        "points": shapely.points(x0 + 50, y0 + 50),
    }[shapes]
    score_table().to_csv(tmp_path / "scores.csv", index=False)
    grid_frame(shapes=geometry).to_file(tmp_path / "grid.gpkg")
    with pytest.raises(ValueError, match=match):
        read_lbm(tmp_path / "scores.csv", tmp_path / "grid.gpkg")


def test_structural_errors_name_the_file(tmp_path: Path, release: tuple[Path, Path]) -> None:
    scores, grid = release
    with pytest.raises(FileNotFoundError, match=r"nope.csv: Leefbaarometer scores file not found"):
        read_lbm(tmp_path / "nope.csv", grid)
    with pytest.raises(FileNotFoundError, match=r"nope.gpkg: Leefbaarometer grid file not found"):
        read_lbm(scores, tmp_path / "nope.gpkg")
    with pytest.raises(ValueError, match=r"scores.csv: the scores have no geometry; pass grid="):
        read_lbm(scores)
    (tmp_path / "scores.txt").write_text("grid_id,jaar\n")
    with pytest.raises(
        ValueError, match=r"scores.txt: unknown Leefbaarometer scores file type '.txt'"
    ):
        read_lbm(tmp_path / "scores.txt", grid)
    with pytest.warns(UserWarning, match="'crs' was not provided"):
        grid_frame().set_crs(None, allow_override=True).to_file(tmp_path / "nocrs.gpkg")
    with pytest.raises(ValueError, match=r"nocrs.gpkg: the geometry has no CRS"):
        read_lbm(scores, tmp_path / "nocrs.gpkg")
    (tmp_path / "broken.gpkg").write_bytes(b"not a geopackage")
    with pytest.raises(
        ValueError, match=r"broken.gpkg: not a readable .gpkg Leefbaarometer grid file"
    ):
        read_lbm(scores, tmp_path / "broken.gpkg")


def test_lbm_class_bands() -> None:
    assert len(CLASS_NAMES) == 9
    assert CLASS_NAMES[0] == "zeer onvoldoende" and CLASS_NAMES[-1] == "uitstekend"
    edges = np.asarray(LBM_CLASS_EDGES)
    np.testing.assert_allclose(np.diff(edges), 0.1)  # equal 0.1-wide bands
    # A value on an edge belongs to the class above; just below it to the class below.
    np.testing.assert_array_equal(lbm_class(edges), np.arange(2, 10))
    np.testing.assert_array_equal(lbm_class(edges - 1e-9), np.arange(1, 9))
    np.testing.assert_array_equal(lbm_class([3.0, NATIONAL_MEAN, 6.0, np.nan]), [1, 5, 9, 0])
    # The one published record found: afw +0.5226 is "uitstekend".
    assert CLASS_NAMES[lbm_class(NATIONAL_MEAN + 0.5226) - 1] == "uitstekend"


def test_target_drops_missing_values_with_a_warning(release: tuple[Path, Path]) -> None:
    labels = read_lbm(*release, year=2022)
    labels.loc[labels.index[:2], "won"] = np.nan

    with pytest.warns(UserWarning, match=r"target 'won': dropped 2 of 6 cells without a value"):
        won = target(labels, "won")

    assert won.name == "won" and won.index.name == "cell_id"
    assert won.index.tolist() == labels["cell_id"].iloc[2:].tolist()
    np.testing.assert_allclose(won.to_numpy(), labels["won"].iloc[2:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        classes = target(labels, "lbm_class")
    assert classes.dtype == np.int64 and classes.between(1, 9).all()


def test_target_rejects_bad_requests(release: tuple[Path, Path]) -> None:
    labels = read_lbm(*release)
    with pytest.raises(
        ValueError, match=r"unknown target column 'score'; valid columns: \['lbm', 'afw'"
    ):
        target(labels, "score")
    with pytest.raises(ValueError, match=r"occurs more than once \(years \[2020, 2022\]\)"):
        target(labels, "lbm")


def test_write_lbm_round_trips(tmp_path: Path, release: tuple[Path, Path]) -> None:
    labels = read_lbm(*release)
    out = tmp_path / "out"
    scores, grid = write_lbm(labels, out / "scores.csv", out / "grid.gpkg")

    assert sorted(p.name for p in out.iterdir()) == ["grid.gpkg", "scores.csv"]  # no temp files
    assert list(pd.read_csv(scores).columns) == ["grid_id", "jaar", *SCORE_COLUMNS]
    assert len(gpd.read_file(grid)) == len(IDS)  # one square per grid_id, not per year
    assert_geodataframe_equal(read_lbm(scores, grid), labels)
    # Writing again replaces the files.
    write_lbm(labels[labels["jaar"] == 2020], scores, grid)
    assert set(read_lbm(scores, grid)["jaar"]) == {2020}


def test_the_published_class_is_used_where_the_labels_carry_one(tmp_path) -> None:
    table = score_table()
    derived = lbm_class(table["lbm"])
    # published classes one above the bands, except two cells without one (0 and empty)
    table[CLASS_COLUMN] = np.minimum(derived + 1, 9).astype(object)
    table.loc[0, CLASS_COLUMN], table.loc[1, CLASS_COLUMN] = 0, None
    scores, grid = tmp_path / "scores.csv", tmp_path / "grid.gpkg"
    table.to_csv(scores, index=False)
    grid_frame().to_file(grid, driver="GPKG")

    labels = read_lbm(scores, grid).set_index(["grid_id", "jaar"])
    expected = table.set_index(["grid_id", "jaar"]).loc[labels.index]
    published = ~expected[CLASS_COLUMN].isin([0, None]).to_numpy()
    assert published.sum() == len(table) - 2
    np.testing.assert_array_equal(labels["lbm_class_published"], published)
    want = np.where(published, expected[CLASS_COLUMN].fillna(0), lbm_class(expected["lbm"]))
    np.testing.assert_array_equal(labels["lbm_class"], want.astype(int))

    # written back and read again: the same classes, the same provenance
    again_scores, again_grid = tmp_path / "again.csv", tmp_path / "again.gpkg"
    write_lbm(read_lbm(scores, grid), again_scores, again_grid)
    again = read_lbm(again_scores, again_grid).set_index(["grid_id", "jaar"]).loc[labels.index]
    np.testing.assert_array_equal(again["lbm_class"], labels["lbm_class"])
    np.testing.assert_array_equal(again["lbm_class_published"], labels["lbm_class_published"])


@pytest.mark.parametrize("bad", [12, 2.5, "goed"])
def test_a_published_class_that_is_no_class_names_the_file(tmp_path, bad) -> None:
    table = score_table()
    table[CLASS_COLUMN] = 5
    table[CLASS_COLUMN] = table[CLASS_COLUMN].astype(object)
    table.loc[3, CLASS_COLUMN] = bad
    scores, grid = tmp_path / "scores.csv", tmp_path / "grid.gpkg"
    table.to_csv(scores, index=False)
    grid_frame().to_file(grid, driver="GPKG")
    with pytest.raises(ValueError, match=rf"{scores}: column 'kscore' holds 1 values .* row 4"):
        read_lbm(scores, grid)


def test_labels_without_published_classes_fall_back_to_the_bands(release) -> None:
    labels = read_lbm(*release)
    assert not labels["lbm_class_published"].any()
    np.testing.assert_array_equal(labels["lbm_class"], lbm_class(labels["lbm"]))
