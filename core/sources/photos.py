"""The user's own geotagged photos: a folder of JPEGs added to the image catalog by their EXIF.

A photo's position is its EXIF GPS latitude and longitude, its heading the GPS image direction
(where the camera recorded one; true or magnetic north as recorded, a difference of about 2
degrees in the Netherlands), its capture time ``DateTimeOriginal`` with its UTC offset
(``OffsetTimeOriginal``), else the GPS time stamp (UTC), else ``DateTimeOriginal`` read as
Amsterdam time. A photo without a GPS position is listed as a problem, never placed by
guesswork; so is one that cannot be read or lies outside the Netherlands.

Imported photos are copied into the data root (``street/photos/<folder name>/...``, each copy
atomic) because a catalog only refers to files inside its root, and added to
``street/catalog.parquet`` with source ``other``; an id is the hash of the photo's bytes, so
importing a folder again replaces its rows instead of adding them twice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ExifTags, Image, UnidentifiedImageError
from pyproj import Transformer

from core.dataroot import DataRoot
from core.grid import RD_NEW
from core.io import write_atomic
from core.sources.catalog import NL_LONLAT_BOUNDS, WGS84, merge_catalog

#: File name endings read as photos (case-insensitive).
PHOTO_SUFFIXES = (".jpg", ".jpeg")
#: The time zone of a capture time that carries no offset and no GPS time stamp.
LOCAL_TIME_ZONE = "Europe/Amsterdam"
SOURCE = "other"
_GPS = ExifTags.GPS
_TO_RD = Transformer.from_crs(WGS84, RD_NEW, always_xy=True)


@dataclass(frozen=True)
class PhotoImport:
    """What an import did.

    Attributes:
        images: the catalog rows added or replaced (``id, source, path, heading,
            captured_at, x, y, lon, lat, original``; ``path`` relative to the catalog).
        problems: one row per photo left out: ``file`` and ``problem``.
    """

    images: pd.DataFrame
    problems: pd.DataFrame


def _degrees(value: tuple, reference: str, negative: str) -> float:
    """EXIF degrees, minutes, seconds and their hemisphere letter as signed degrees."""
    degrees, minutes, seconds = (float(part) for part in value)
    sign = -1.0 if str(reference).strip().upper() == negative else 1.0
    return sign * (degrees + minutes / 60 + seconds / 3600)


def _capture_time(exif: Image.Exif) -> pd.Timestamp | None:
    """The capture time in UTC (see the module), or None when the photo records none."""
    details = exif.get_ifd(ExifTags.IFD.Exif)
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    taken = details.get(ExifTags.Base.DateTimeOriginal) or exif.get(ExifTags.Base.DateTime)
    offset = details.get(ExifTags.Base.OffsetTimeOriginal)
    if taken and offset:
        stamp = datetime.strptime(f"{taken} {offset}", "%Y:%m:%d %H:%M:%S %z")
        return pd.Timestamp(stamp).tz_convert("UTC")
    if _GPS.GPSDateStamp in gps and _GPS.GPSTimeStamp in gps:
        hours, minutes, seconds = (float(part) for part in gps[_GPS.GPSTimeStamp])
        day = datetime.strptime(str(gps[_GPS.GPSDateStamp]), "%Y:%m:%d")
        return pd.Timestamp(day, tz="UTC") + pd.Timedelta(
            hours=hours, minutes=minutes, seconds=seconds
        )
    if taken:
        local = pd.Timestamp(datetime.strptime(str(taken), "%Y:%m:%d %H:%M:%S"))
        return local.tz_localize(LOCAL_TIME_ZONE).tz_convert("UTC")
    return None


def read_photo(path: str | PathLike) -> dict:
    """Position, heading and capture time of one photo from its EXIF.

    Returns:
        ``lon``, ``lat`` (WGS84 degrees), ``heading`` (degrees or NaN) and ``captured_at``
        (a UTC timestamp, or None).

    Raises:
        ValueError: naming the file, when it is not a readable image or has no GPS position.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            exif = image.getexif()
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from exc
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    if _GPS.GPSLatitude not in gps or _GPS.GPSLongitude not in gps:
        raise ValueError(f"{path}: no GPS position in its EXIF")
    try:
        lat = _degrees(gps[_GPS.GPSLatitude], gps.get(_GPS.GPSLatitudeRef, "N"), "S")
        lon = _degrees(gps[_GPS.GPSLongitude], gps.get(_GPS.GPSLongitudeRef, "E"), "W")
        captured_at = _capture_time(exif)
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"{path}: unreadable EXIF position or time ({exc})") from exc
    direction = gps.get(_GPS.GPSImgDirection)
    heading = float(direction) % 360 if direction is not None else np.nan
    return {"lon": lon, "lat": lat, "heading": heading, "captured_at": captured_at}


def _photos(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES
    )


def _copy(content: bytes, target: Path) -> None:
    """A photo's ``content`` at ``target`` (atomically), unless an identical copy is there."""
    if target.is_file() and target.read_bytes() == content:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, lambda tmp: Path(tmp).write_bytes(content))


def import_photos(folder: str | PathLike, root: str | PathLike) -> PhotoImport:
    """Add the geotagged JPEGs below ``folder`` to the catalog of the data root ``root``.

    Args:
        folder: a folder of photos (searched recursively).
        root: the data root whose ``street/catalog.parquet`` receives them.

    Raises:
        FileNotFoundError: if ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of photos")
    catalog = DataRoot(Path(root)).catalog
    target_folder = catalog.parent / "photos" / folder.resolve().name
    rows, problems, seen = [], [], {}
    west, south, east, north = NL_LONLAT_BOUNDS
    for photo in _photos(folder):
        try:
            found = read_photo(photo)
        except ValueError as exc:
            problems.append((str(photo), str(exc).removeprefix(f"{photo}: ")))
            continue
        if not (west <= found["lon"] <= east and south <= found["lat"] <= north):
            where = f"lon {found['lon']:.5f}, lat {found['lat']:.5f}"
            problems.append((str(photo), f"position {where} lies outside the Netherlands"))
            continue
        content = photo.read_bytes()
        photo_id = "photo-" + hashlib.sha256(content).hexdigest()[:16]
        if photo_id in seen:
            problems.append((str(photo), f"the same photo as {seen[photo_id]}"))
            continue
        seen[photo_id] = photo
        relative = photo.relative_to(folder)
        _copy(content, target_folder / relative)
        x, y = _TO_RD.transform(found["lon"], found["lat"])
        rows.append(
            {
                "id": photo_id,
                "source": SOURCE,
                "path": str((target_folder / relative).relative_to(catalog.parent)),
                "heading": found["heading"],
                "captured_at": found["captured_at"],
                "x": x,
                "y": y,
                "lon": found["lon"],
                "lat": found["lat"],
                "original": str(photo.resolve()),
            }
        )
    images = pd.DataFrame(
        rows,
        columns=[
            "id",
            "source",
            "path",
            "heading",
            "captured_at",
            "x",
            "y",
            "lon",
            "lat",
            "original",
        ],
    )
    if len(images):
        # naive UTC, as the fetched sources store it (read_catalog reads naive times as UTC)
        images["captured_at"] = pd.to_datetime(images["captured_at"], utc=True).dt.tz_localize(None)
        catalog.parent.mkdir(parents=True, exist_ok=True)
        merge_catalog(images, catalog)
    return PhotoImport(images, pd.DataFrame(problems, columns=["file", "problem"]))
