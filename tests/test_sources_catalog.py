"""Street-level image catalogs: real CSV / Parquet / GeoParquet files built in tmp_path."""

from __future__ import annotations

import io
import os
import time
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pyproj import Transformer

from core.grid import cell_id, cells_in_bounds
from core.sources.catalog import (
    IMAGE_COLUMNS,
    PROBLEM_COLUMNS,
    images_per_cell,
    join_cells,
    read_catalog,
    write_catalog,
)

# The Amersfoort tower is the origin of RD New: (155000, 463000) by definition.
AMERSFOORT_LONLAT = (5.38720621, 52.15517440)
AMERSFOORT_RD = (155_000.0, 463_000.0)
DAM_LONLAT = (4.8926, 52.3731)
TO_RD = Transformer.from_crs("EPSG:4326", "EPSG:28992", always_xy=True)


def good_rows(folder: Path) -> pd.DataFrame:
    """Three valid images; one path absolute, the others relative to ``folder``."""
    (folder / "img").mkdir(exist_ok=True)
    for name in ("a.jpg", "b.jpg", "c.png"):
        (folder / "img" / name).write_bytes(b"\xff\xd8 fake image")
    return pd.DataFrame(
        {
            "id": ["a", "b", "c"],
            "source": ["gsv", "flickr", "GSV"],
            "path": ["img/a.jpg", str(folder / "img" / "b.jpg"), "img/c.png"],
            "heading": [90.0, np.nan, 270.0],
            "captured_at": ["2021-06-01T14:00:00+02:00", "2019-06", None],
            "lon": [DAM_LONLAT[0], AMERSFOORT_LONLAT[0], DAM_LONLAT[0]],
            "lat": [DAM_LONLAT[1], AMERSFOORT_LONLAT[1], DAM_LONLAT[1] + 0.002],  # c: 220 m north
            "pano_id": ["p1", None, "p3"],
            "title": [None, "Dam square", None],
        }
    )


def as_rd(table: pd.DataFrame) -> pd.DataFrame:
    x, y = TO_RD.transform(table["lon"].to_numpy(), table["lat"].to_numpy())
    return table.drop(columns=["lon", "lat"]).assign(x=x, y=y)


def as_geometry(table: pd.DataFrame, crs: str) -> gpd.GeoDataFrame:
    points = gpd.points_from_xy(table["lon"], table["lat"], crs="EPSG:4326")
    return gpd.GeoDataFrame(table.drop(columns=["lon", "lat"]), geometry=points).to_crs(crs)


def test_read_lonlat_csv(tmp_path: Path) -> None:
    good_rows(tmp_path).to_csv(tmp_path / "catalog.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean catalog warns about nothing
        catalog = read_catalog(tmp_path / "catalog.csv")
    images = catalog.images

    assert list(images.columns) == list(IMAGE_COLUMNS)
    assert images.crs.to_epsg() == 28992
    assert images["id"].tolist() == ["a", "b", "c"]
    assert images["source"].tolist() == ["gsv", "flickr", "gsv"]
    assert images["path"].tolist() == [
        str(tmp_path / "img" / n) for n in ("a.jpg", "b.jpg", "c.png")
    ]
    assert images.loc[1, ["x", "y"]].tolist() == pytest.approx(AMERSFOORT_RD, abs=0.5)
    assert images["cell_id"].tolist() == cell_id(images["x"], images["y"]).tolist()
    assert (images.geometry.x == images["x"]).all() and (images.geometry.y == images["y"]).all()
    assert images["heading"].isna().tolist() == [False, True, False]
    assert str(images["captured_at"].dt.tz) == "UTC"
    assert images["captured_at"][0] == pd.Timestamp("2021-06-01 12:00", tz="UTC")
    assert images["captured_at"][1] == pd.Timestamp("2019-06-01", tz="UTC")
    assert pd.isna(images["captured_at"][2])
    assert images["pano_id"][0] == "p1" and images["license"].isna().all()
    assert catalog.problems.empty and list(catalog.problems.columns) == list(PROBLEM_COLUMNS)
    assert catalog.summary() == "catalog.csv: 3 images (gsv 2, flickr 1) in 3 cells; 0 rejected"


@pytest.mark.parametrize("form", ["rd.csv", "rd.parquet", "wgs84.geoparquet", "rd.geoparquet"])
def test_every_position_encoding_gives_the_same_images(tmp_path: Path, form: str) -> None:
    rows = good_rows(tmp_path)
    rows.to_csv(tmp_path / "lonlat.csv", index=False)
    expected = read_catalog(tmp_path / "lonlat.csv").images
    path = tmp_path / form
    if form.startswith("rd."):
        table = as_rd(rows) if form != "rd.geoparquet" else as_geometry(rows, "EPSG:28992")
    else:
        table = as_geometry(rows, "EPSG:4326")
    if path.suffix == ".csv":
        table.to_csv(path, index=False)
    else:
        table.to_parquet(path)

    images = read_catalog(path).images

    assert images["cell_id"].tolist() == expected["cell_id"].tolist()
    np.testing.assert_allclose(images[["x", "y"]], expected[["x", "y"]], atol=1e-3)
    assert images["captured_at"].tolist() == expected["captured_at"].tolist()


def test_bad_rows_are_rejected_and_reported(tmp_path: Path) -> None:
    rows = good_rows(tmp_path)
    image = "img/a.jpg"
    bad = pd.DataFrame(
        [
            ("paris", "gsv", image, 0, "2020-01-01", 2.35, 48.85),
            ("swapped", "gsv", image, 0, "2020-01-01", DAM_LONLAT[1], DAM_LONLAT[0]),
            ("nofile", "flickr", "img/gone.jpg", 0, "2020-01-01", *DAM_LONLAT),
            ("twice", "gsv", image, 0, "2020-01-01", *DAM_LONLAT),
            ("twice", "other", image, 0, "2020-01-01", *DAM_LONLAT),
            ("insta", "Insta gram!", image, 0, "2020-01-01", *DAM_LONLAT),
            ("when", "gsv", image, 0, "yesterday", *DAM_LONLAT),
            ("which way", "gsv", image, "north", "2020-01-01", *DAM_LONLAT),
            ("where", "gsv", image, 0, "2020-01-01", np.nan, DAM_LONLAT[1]),
        ],
        columns=["id", "source", "path", "heading", "captured_at", "lon", "lat"],
    )
    pd.concat([rows, bad], ignore_index=True).to_csv(tmp_path / "catalog.csv", index=False)

    with pytest.warns(UserWarning) as caught:
        catalog = read_catalog(tmp_path / "catalog.csv")

    assert len(caught) == 1
    assert str(caught[0].message).startswith(
        f"{tmp_path / 'catalog.csv'}: rejected 9 of 12 images ("
    )
    assert catalog.images["id"].tolist() == ["a", "b", "c"]
    problems = catalog.problems
    assert list(zip(problems["row"], problems["kind"], strict=True)) == [
        (3, "outside the Netherlands"),
        (4, "swapped position"),
        (5, "missing file"),
        (6, "duplicate id"),
        (7, "duplicate id"),
        (8, "bad source"),
        (9, "bad captured_at"),
        (10, "bad heading"),
        (11, "missing position"),
    ]
    text = dict(zip(problems["id"], problems["problem"], strict=False))
    assert text["paris"] == "position outside the Netherlands (lon=2.35, lat=48.85)"
    assert text["swapped"] == "lat/lon swapped? (lon=52.3731, lat=4.8926)"
    assert text["nofile"] == f"image file not found: {tmp_path / 'img' / 'gone.jpg'}"
    assert text["twice"] == "duplicate id 'twice' (2 rows)"
    assert text["insta"] == (
        "bad source 'Insta gram!' (expected a name of lower-case letters, digits and _, such as "
        "gsv, flickr, mapillary or other)"
    )
    assert text["when"] == "captured_at 'yesterday' is not an ISO 8601 time"
    assert text["which way"] == "heading 'north' is not a number"
    assert text["where"] == "missing or non-numeric lon/lat"
    assert catalog.summary().endswith(
        "9 rejected (1 outside the Netherlands, 1 swapped position, 1 missing file, "
        "2 duplicate id, 1 bad source, 1 bad captured_at, 1 bad heading, 1 missing position)"
    )


def test_swapped_rd_coordinates_are_recognised(tmp_path: Path) -> None:
    rows = as_rd(good_rows(tmp_path))
    rows.loc[0, ["x", "y"]] = rows.loc[0, ["y", "x"]].to_numpy()
    rows.to_csv(tmp_path / "catalog.csv", index=False)
    with pytest.warns(UserWarning, match="1 swapped position"):
        catalog = read_catalog(tmp_path / "catalog.csv")
    assert catalog.problems["problem"][0].startswith("x/y swapped? (x=487")


def test_check_files_can_be_skipped(tmp_path: Path) -> None:
    rows = good_rows(tmp_path)
    rows.loc[0, "path"] = "img/not-yet-downloaded.jpg"
    rows.to_csv(tmp_path / "catalog.csv", index=False)
    with pytest.warns(UserWarning, match="1 missing file"):
        assert len(read_catalog(tmp_path / "catalog.csv").images) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = read_catalog(tmp_path / "catalog.csv", check_files=False).images
    assert images["path"][0] == str(tmp_path / "img" / "not-yet-downloaded.jpg")


def test_structural_errors_name_the_file(tmp_path: Path) -> None:
    rows = good_rows(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nope.csv: image catalog file not found"):
        read_catalog(tmp_path / "nope.csv")
    rows.to_csv(tmp_path / "catalog.xlsx", index=False)
    with pytest.raises(ValueError, match=r"catalog.xlsx: unknown image catalog file type '.xlsx'"):
        read_catalog(tmp_path / "catalog.xlsx")
    rows.drop(columns=["heading", "source"]).to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(ValueError, match=r"cols.csv: missing columns \['source', 'heading'\]"):
        read_catalog(tmp_path / "cols.csv")
    rows.drop(columns=["lat"]).to_csv(tmp_path / "nopos.csv", index=False)
    with pytest.raises(ValueError, match=r"nopos.csv: no position columns; need 'lon' and 'lat'"):
        read_catalog(tmp_path / "nopos.csv")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(
        ValueError, match=r"broken.parquet: not a readable .parquet image catalog file"
    ):
        read_catalog(tmp_path / "broken.parquet")


@pytest.fixture
def catalog_images(tmp_path: Path) -> gpd.GeoDataFrame:
    good_rows(tmp_path).to_csv(tmp_path / "catalog.csv", index=False)
    return read_catalog(tmp_path / "catalog.csv").images


def test_join_cells_keeps_images_in_the_grid(catalog_images: gpd.GeoDataFrame) -> None:
    dam_cells = catalog_images["cell_id"][[0, 2]].to_numpy()
    with pytest.warns(UserWarning, match=r"join_cells: 1 of 3 images lie outside the 2 grid cells"):
        joined = join_cells(catalog_images, dam_cells)
    assert joined["id"].tolist() == ["a", "c"]
    assert list(joined.columns) == list(catalog_images.columns)


def test_join_cells_handles_a_million_points_fast() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.uniform(110_000, 135_000, 1_000_000), rng.uniform(475_000, 495_000, 1_000_000)
    images = gpd.GeoDataFrame({"cell_id": cell_id(x, y)}, geometry=gpd.points_from_xy(x, y))
    city = cells_in_bounds((115_000, 480_000, 130_000, 490_000))

    start = time.perf_counter()
    with pytest.warns(UserWarning):
        joined = join_cells(images, city)
    elapsed = time.perf_counter() - start

    inside = (x >= 115_000) & (x < 130_000) & (y >= 480_000) & (y < 490_000)
    assert len(joined) == inside.sum()
    assert elapsed < 1.0


def test_images_per_cell_counts_by_source(catalog_images: gpd.GeoDataFrame) -> None:
    empty_cell = 12_000_000
    cells = np.array([catalog_images["cell_id"][2], empty_cell, catalog_images["cell_id"][1]])
    counts = images_per_cell(catalog_images, cells)

    assert counts.index.name == "cell_id" and counts.index.tolist() == cells.tolist()
    assert list(counts.columns) == ["gsv", "flickr", "amsterdam_panorama", "mapillary", "other"]
    assert counts.to_numpy().tolist() == [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]]
    assert (counts.dtypes == np.int64).all()


def test_images_per_cell_counts_every_source_of_the_catalog(
    catalog_images: gpd.GeoDataFrame,
) -> None:
    images = catalog_images.copy()
    images.loc[0, "source"], images.loc[1, "source"] = "mapillary", "kartaview"
    counts = images_per_cell(images, np.unique(images["cell_id"]))

    assert list(counts.columns)[-1] == "kartaview"  # after the known sources
    assert counts["kartaview"].sum() == 1 and counts["mapillary"].sum() == 1
    assert counts.to_numpy().sum() == len(images)


@pytest.mark.parametrize("name", ["out.parquet", "out.csv"])
def test_write_catalog_round_trips(
    tmp_path: Path, catalog_images: gpd.GeoDataFrame, name: str
) -> None:
    path = write_catalog(catalog_images, tmp_path / name)

    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "out"))) == [name]
    stored = pd.read_csv(path) if name.endswith(".csv") else pd.read_parquet(path)
    assert stored["path"].tolist() == ["img/a.jpg", "img/b.jpg", "img/c.png"]
    again = read_catalog(path).images
    pd.testing.assert_frame_equal(
        pd.DataFrame(again.drop(columns=["geometry", "license", "tags"])),
        pd.DataFrame(catalog_images.drop(columns=["geometry", "license", "tags"])),
        check_dtype=False,
    )


def test_write_catalog_rejects_unknown_formats(
    tmp_path: Path, catalog_images: gpd.GeoDataFrame
) -> None:
    with pytest.raises(ValueError, match=r"out.json: a catalog is written as .parquet or .csv"):
        write_catalog(catalog_images, tmp_path / "out.json")
    with pytest.raises(ValueError, match=r"images: missing columns \['x', 'y'\]"):
        write_catalog(catalog_images.drop(columns=["x", "y"]), tmp_path / "out.csv")


def test_reading_some_sources_checks_only_their_rows(tmp_path: Path) -> None:
    rows = good_rows(tmp_path)
    rows.to_csv(tmp_path / "catalog.csv", index=False)
    (tmp_path / "img" / "b.jpg").unlink()  # the Flickr row's file is gone
    gsv = read_catalog(tmp_path / "catalog.csv", sources=["gsv"])
    assert gsv.images["id"].tolist() == ["a", "c"] and gsv.problems.empty
    with pytest.warns(UserWarning, match="missing file"):
        both = read_catalog(tmp_path / "catalog.csv", sources=["gsv", "flickr"])
    assert both.images["id"].tolist() == ["a", "c"] and both.problems["id"].tolist() == ["b"]


def jpeg_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def test_an_image_damaged_after_its_check_is_caught_by_the_next_read(tmp_path: Path) -> None:
    """A readable file is not parsed again while unchanged; any change in size or time of
    change sends it through the check again."""
    (tmp_path / "img").mkdir()
    rows = pd.DataFrame({"id": ["a", "b"], "source": "gsv", "path": ["img/a.jpg", "img/b.jpg"]})
    rows = rows.assign(x=121_000.0, y=487_000.0, heading=0.0, captured_at="2020-06-01")
    rows.to_csv(tmp_path / "catalog.csv", index=False)
    good = jpeg_bytes((200, 30, 30))
    for name in ("a", "b"):
        (tmp_path / "img" / f"{name}.jpg").write_bytes(good)
    assert read_catalog(tmp_path / "catalog.csv", check_images=True).problems.empty

    (tmp_path / "img" / "a.jpg").write_bytes(good[: len(good) // 2])  # truncated: smaller
    b = tmp_path / "img" / "b.jpg"
    stat = b.stat()
    b.write_bytes(b"\x00" * stat.st_size)  # same size, overwritten: a new time of change
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.warns(UserWarning, match="unreadable image"):
        again = read_catalog(tmp_path / "catalog.csv", check_images=True)
    assert sorted(again.problems["id"]) == ["a", "b"] and again.images.empty
