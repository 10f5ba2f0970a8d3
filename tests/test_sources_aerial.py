"""Aerial patches from real GeoTIFF/VRT files written in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.transform import from_origin
from rasterio.warp import Resampling, calculate_default_transform, reproject

from core.grid import cell_center, ids_from_index
from core.sources.aerial import AerialRaster, open_aerial

# The raster covers the 4 x 4 cells with lower-left corners 121000..121300, 487000..487300.
LEFT, BOTTOM, SIDE = 121_000.0, 487_000.0, 400.0
INSIDE = ids_from_index(1211, 4871)  # cell (121100, 487100)
EDGE = ids_from_index(1209, 4871)  # just west of the raster
OUTSIDE = ids_from_index(1300, 4871)  # 9 km east

# Each 100 m cell has four 50 m quadrants in these colours (no channel is 0, so 0 = padding).
NW, NE, SW, SE = (200, 40, 40), (40, 200, 40), (40, 40, 200), (220, 220, 220)


def pattern(res: float) -> np.ndarray:
    """RGB (3, h, w) of the quadrant pattern sampled at pixel centres of a ``res`` m grid."""
    n = int(SIDE / res)
    centres = (np.arange(n) + 0.5) * res
    east = (centres % 100 >= 50)[None, :]
    north = (centres[::-1] % 100 >= 50)[:, None]  # row 0 is the top (north)
    rgb = np.empty((3, n, n), dtype=np.uint8)
    for band in range(3):
        rgb[band] = np.where(
            north, np.where(east, NE[band], NW[band]), np.where(east, SE[band], SW[band])
        )
    return rgb


def write_raster(path: Path, res: float, **profile) -> Path:
    data = pattern(res)
    meta = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:28992",
        "transform": from_origin(LEFT, BOTTOM + SIDE, res, res),
    } | profile
    with rasterio.open(path, "w", **meta) as dst:
        dst.write(data[: meta["count"]].astype(meta["dtype"]))
    return path


@pytest.fixture(scope="module")
def rasters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("aerial")
    fine = write_raster(folder / "fine.tif", 0.25)
    coarse = write_raster(folder / "coarse.tif", 4.0)
    medium = write_raster(folder / "medium.tif", 1.0)
    # The same image in WGS84, as a reprojected copy of the RD raster.
    with rasterio.open(medium) as src:
        transform, width, height = calculate_default_transform(
            src.crs, "EPSG:4326", src.width, src.height, *src.bounds
        )
        meta = src.meta | {
            "crs": "EPSG:4326",
            "transform": transform,
            "width": width,
            "height": height,
        }
        with rasterio.open(folder / "wgs84.tif", "w", **meta) as dst:
            for band in (1, 2, 3):
                reproject(
                    rasterio.band(src, band),
                    rasterio.band(dst, band),
                    resampling=Resampling.nearest,
                )
        rasterio.shutil.copy(src, folder / "medium.vrt", driver="VRT")
    tiled = write_raster(folder / "tiled.tif", 1.0, tiled=True, blockxsize=128, blockysize=128)
    with rasterio.open(tiled, "r+") as dst:
        dst.build_overviews([2, 4], Resampling.average)
    return {
        "fine": fine,
        "coarse": coarse,
        "medium": medium,
        "wgs84": folder / "wgs84.tif",
        "vrt": folder / "medium.vrt",
        "tiled": tiled,
    }


def quadrant_colours(image: np.ndarray) -> list[tuple[int, ...]]:
    """Colours at the centres of the NW, NE, SW, SE quadrants of a patch."""
    q1, q3 = image.shape[-1] // 4, 3 * image.shape[-1] // 4
    return [
        tuple(int(v) for v in image[:, r, c]) for r, c in ((q1, q1), (q1, q3), (q3, q1), (q3, q3))
    ]


def test_patch_centred_on_a_cell_shows_its_quadrants(rasters: dict[str, Path]) -> None:
    cx, cy = cell_center(INSIDE)
    with AerialRaster(rasters["fine"]) as raster:
        patch = raster.patch(float(cx), float(cy), 100.0, 32)

    assert patch.image.shape == (3, 32, 32) and patch.image.dtype == np.uint8
    assert (patch.valid_fraction, patch.edge, patch.outside) == (1.0, False, False)
    # 0.25 m pixels averaged into 3.125 m pixels: every quadrant is one flat colour.
    for rows, cols, colour in (
        (slice(0, 16), slice(0, 16), NW),
        (slice(0, 16), slice(16, 32), NE),
        (slice(16, 32), slice(0, 16), SW),
        (slice(16, 32), slice(16, 32), SE),
    ):
        assert (patch.image[:, rows, cols] == np.array(colour)[:, None, None]).all()


def test_resolution_does_not_change_the_ground_extent(rasters: dict[str, Path]) -> None:
    cx, cy = (float(v) for v in cell_center(INSIDE))
    # A 140 m window reaches 20 m into the neighbouring cells, so a wrong extent shows.
    with open_aerial(rasters["fine"]) as fine, open_aerial(rasters["coarse"]) as coarse:
        big = fine.patch(cx, cy, 140.0, 56).image.astype(float)
        small = fine.patch(cx, cy, 140.0, 28).image.astype(float)
        from_coarse = coarse.patch(cx, cy, 140.0, 28).image.astype(float)

    shrunk = big.reshape(3, 28, 2, 28, 2).mean(axis=(2, 4))
    assert np.abs(shrunk - small).mean() < 1.0
    # 4 m pixels blur the 50 m quadrant edges a little, nothing more.
    assert np.abs(from_coarse - small).mean() < 8.0
    assert quadrant_colours(from_coarse) == quadrant_colours(small)


def test_raster_in_wgs84_gives_the_same_patch(rasters: dict[str, Path]) -> None:
    cx, cy = (float(v) for v in cell_center(INSIDE))
    with open_aerial(rasters["medium"]) as rd, open_aerial(rasters["wgs84"]) as wgs84:
        expected = rd.patch(cx, cy, 100.0, 50)
        warped = wgs84.patch(cx, cy, 100.0, 50)

    assert not warped.edge and warped.valid_fraction == pytest.approx(1.0)
    assert np.abs(warped.image.astype(float) - expected.image).mean() < 5.0
    assert quadrant_colours(warped.image) == [NW, NE, SW, SE]


@pytest.mark.parametrize("kind", ["vrt", "tiled"])
def test_vrt_and_tiled_tiff_read_like_the_plain_tiff(rasters: dict[str, Path], kind: str) -> None:
    cx, cy = (float(v) for v in cell_center(INSIDE))
    with open_aerial(rasters["medium"]) as plain, open_aerial(rasters[kind]) as other:
        np.testing.assert_array_equal(
            other.patch(cx, cy, 100.0, 40).image, plain.patch(cx, cy, 100.0, 40).image
        )


@pytest.mark.parametrize(
    ("corner", "on_raster"),
    [
        ((LEFT, BOTTOM), (slice(0, 10), slice(10, 20))),  # SW corner: the NE quarter is on it
        ((LEFT + SIDE, BOTTOM + SIDE), (slice(10, 20), slice(0, 10))),  # NE corner: the SW quarter
    ],
)
def test_edge_patch_is_padded_and_flagged(
    rasters: dict[str, Path], corner: tuple[float, float], on_raster: tuple[slice, slice]
) -> None:
    with open_aerial(rasters["fine"]) as raster:
        patch = raster.patch(*corner, 100.0, 20)

    assert patch.edge and not patch.outside
    assert patch.valid_fraction == pytest.approx(0.25)
    padded = np.ones((20, 20), dtype=bool)
    padded[on_raster] = False
    assert (patch.image[:, padded] == 0).all()
    assert (patch.image[:, ~padded] > 0).all()


def test_patches_report_every_cell(rasters: dict[str, Path]) -> None:
    cells = np.array([INSIDE, EDGE, OUTSIDE])
    with (
        open_aerial(rasters["coarse"]) as raster,
        pytest.warns(
            UserWarning, match=r"coarse.tif: 1 of 3 cells lie entirely outside the raster"
        ),
    ):
        images, status = raster.patches(cells, 200.0, 16)

    assert images.shape == (3, 3, 16, 16)
    assert status["cell_id"].tolist() == cells.tolist()
    assert status["valid_fraction"].tolist() == pytest.approx([1.0, 0.25, 0.0])
    assert status["edge"].tolist() == [False, True, False]
    assert status["outside"].tolist() == [False, False, True]
    assert (images[2] == 0).all() and (images[0] > 0).all()


def test_close_releases_the_file(rasters: dict[str, Path]) -> None:
    with open_aerial(rasters["wgs84"]) as raster:
        pass
    assert raster._source.closed and raster._dataset.closed


def test_bad_files_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing.tif: aerial raster not found"):
        AerialRaster(tmp_path / "missing.tif")
    (tmp_path / "text.tif").write_text("this is not a raster")
    with pytest.raises(ValueError, match=r"text.tif: not a raster rasterio can open"):
        AerialRaster(tmp_path / "text.tif")
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning):
        write_raster(tmp_path / "nocrs.tif", 4.0, crs=None, transform=rasterio.Affine.identity())
    with pytest.raises(ValueError, match=r"nocrs.tif: raster has no CRS"):
        AerialRaster(tmp_path / "nocrs.tif")
    write_raster(tmp_path / "gray.tif", 4.0, count=1)
    with pytest.raises(
        ValueError, match=r"gray.tif: raster has 1 band\(s\); an RGB aerial needs at least 3"
    ):
        AerialRaster(tmp_path / "gray.tif")
    write_raster(tmp_path / "deep.tif", 4.0, dtype="uint16")
    with pytest.raises(
        ValueError, match=r"deep.tif: RGB bands must be 8-bit \(uint8\), found \['uint16'\]"
    ):
        AerialRaster(tmp_path / "deep.tif")
    with (
        open_aerial(write_raster(tmp_path / "ok.tif", 4.0)) as raster,
        pytest.raises(ValueError, match=r"size_m must be > 0 and out_px >= 1"),
    ):
        raster.patch(121_150.0, 487_150.0, 0.0, 32)
