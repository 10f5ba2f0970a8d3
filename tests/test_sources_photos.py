"""A folder of the user's own photos into the catalog (core.sources.photos, ``import-photos``):
real JPEGs with EXIF written by Pillow, read back by the project's own catalog reader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import ExifTags, Image
from pyproj import Transformer

from core.dataroot import DataRoot
from core.sources.catalog import read_catalog, write_catalog
from core.sources.photos import import_photos, read_photo

GPS, BASE = ExifTags.GPS, ExifTags.Base


def _photo(
    path: Path,
    lat: tuple | None = (52.0, 22.0, 12.5),
    lon: tuple = (4.0, 53.0, 30.0),
    lat_ref: str = "N",
    heading: float | None = 123.5,
    taken: str | None = "2023:06:01 14:30:00",
    offset: str | None = "+02:00",
    gps_time: tuple | None = None,
    colour: tuple = (200, 100, 50),
) -> Path:
    exif = Image.Exif()
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    if lat is not None:
        gps[GPS.GPSLatitudeRef], gps[GPS.GPSLatitude] = lat_ref, lat
        gps[GPS.GPSLongitudeRef], gps[GPS.GPSLongitude] = "E", lon
    if heading is not None:
        gps[GPS.GPSImgDirectionRef], gps[GPS.GPSImgDirection] = "T", heading
    if gps_time is not None:
        gps[GPS.GPSDateStamp], gps[GPS.GPSTimeStamp] = gps_time
    details = exif.get_ifd(ExifTags.IFD.Exif)
    if taken is not None:
        details[BASE.DateTimeOriginal] = taken
    if offset is not None:
        details[BASE.OffsetTimeOriginal] = offset
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), colour).save(path, exif=exif)
    return path


def test_position_heading_and_time_come_from_the_exif(tmp_path):
    found = read_photo(_photo(tmp_path / "a.jpg"))
    assert found["lat"] == pytest.approx(52 + 22 / 60 + 12.5 / 3600)
    assert found["lon"] == pytest.approx(4 + 53 / 60 + 30 / 3600)
    assert found["heading"] == pytest.approx(123.5)
    assert found["captured_at"] == pd.Timestamp("2023-06-01 12:30:00", tz="UTC")


def test_capture_time_falls_back_to_gps_time_then_to_amsterdam_time(tmp_path):
    by_gps = _photo(tmp_path / "g.jpg", offset=None, gps_time=("2023:06:01", (10.0, 15.0, 30.0)))
    assert read_photo(by_gps)["captured_at"] == pd.Timestamp("2023-06-01 10:15:30", tz="UTC")
    local = _photo(tmp_path / "l.jpg", taken="2023:01:10 09:00:00", offset=None)
    assert read_photo(local)["captured_at"] == pd.Timestamp("2023-01-10 08:00:00", tz="UTC")
    undated = _photo(tmp_path / "u.jpg", taken=None, offset=None, heading=None)
    assert read_photo(undated)["captured_at"] is None
    assert np.isnan(read_photo(undated)["heading"])


def test_a_southern_latitude_is_negative(tmp_path):
    assert read_photo(_photo(tmp_path / "s.jpg", lat_ref="S"))["lat"] < 0


def test_a_folder_is_added_to_the_catalog_and_problems_are_listed(tmp_path):
    root = tmp_path / "root"
    folder = tmp_path / "walk"
    _photo(folder / "a.jpg")
    _photo(folder / "sub" / "b.JPEG", lat=(52.0, 21.0, 0.0), colour=(10, 20, 30))
    _photo(folder / "nogps.jpg", lat=None, colour=(1, 2, 3))
    _photo(folder / "paris.jpg", lat=(48.0, 51.0, 0.0), lon=(2.0, 21.0, 0.0), colour=(4, 5, 6))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not a photo")

    done = import_photos(folder, root)

    assert sorted(Path(f).name for f in done.problems["file"]) == [
        "broken.jpg",
        "nogps.jpg",
        "paris.jpg",
    ]
    names = done.problems["file"].map(lambda f: Path(f).name)
    problem = dict(zip(names, done.problems["problem"], strict=True))
    assert problem["nogps.jpg"] == "no GPS position in its EXIF"
    assert "outside the Netherlands" in problem["paris.jpg"]
    catalog = read_catalog(DataRoot(root).catalog)
    assert len(catalog.problems) == 0 and len(catalog.images) == 2
    images = catalog.images.set_index(catalog.images["path"].map(lambda p: Path(p).name))
    assert set(images["source"]) == {"other"}
    # the copies inside the root are the photos, byte for byte
    assert Path(images.loc["a.jpg", "path"]).read_bytes() == (folder / "a.jpg").read_bytes()
    assert Path(images.loc["b.JPEG", "path"]).parent.name == "sub"
    # position: the EXIF's lon/lat in RD New, computed independently
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:28992", always_xy=True).transform(
        4 + 53 / 60 + 30 / 3600, 52 + 22 / 60 + 12.5 / 3600
    )
    assert images.loc["a.jpg", ["x", "y"]].tolist() == pytest.approx([x, y], abs=0.01)
    assert images.loc["a.jpg", "captured_at"] == pd.Timestamp("2023-06-01 12:30:00", tz="UTC")


def test_importing_again_replaces_the_rows_and_keeps_the_others(tmp_path):
    root = tmp_path / "root"
    catalog = DataRoot(root).catalog
    catalog.parent.mkdir(parents=True)
    (catalog.parent / "gsv.jpg").write_bytes(b"x")
    existing = pd.DataFrame(
        {
            "id": ["gsv-1"],
            "source": ["gsv"],
            "path": [str(catalog.parent / "gsv.jpg")],
            "heading": [90.0],
            "captured_at": pd.to_datetime(["2020-05-01 10:00:00"]),  # as the fetches store it
            "x": [121000.0],
            "y": [487000.0],
        }
    )
    write_catalog(existing, catalog)
    folder = tmp_path / "walk"
    _photo(folder / "a.jpg")
    _photo(folder / "copy-of-a.jpg")  # the same bytes: one photo
    first = import_photos(folder, root)
    again = import_photos(folder, root)
    assert first.images["id"].tolist() == again.images["id"].tolist()
    assert again.problems["problem"].str.startswith("the same photo as").tolist() == [True]
    images = read_catalog(catalog).images
    assert sorted(images["id"]) == sorted(["gsv-1", *first.images["id"]])


def test_the_command_reports_and_fails_when_nothing_could_be_placed(tmp_path):
    folder = tmp_path / "walk"
    _photo(folder / "nogps.jpg", lat=None)
    command = [sys.executable, "-m", "train", "import-photos", str(folder)]
    done = subprocess.run(
        [*command, "--data", str(tmp_path / "root")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "left out" in done.stdout and "no GPS position" in done.stdout
    assert not DataRoot(tmp_path / "root").catalog.exists()  # nothing written
    missing = subprocess.run(
        [*command[:-1], str(tmp_path / "nope"), "--data", str(tmp_path / "root")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2 and "not a folder of photos" in missing.stderr
