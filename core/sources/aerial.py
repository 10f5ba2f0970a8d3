"""Aerial imagery: square RGB patches cut by metres around cell centres.

Any raster rasterio opens works (GeoTIFF, COG, VRT) in any CRS; rasters not in EPSG:28992 are
warped on the fly, so a patch always covers the same ground whatever the source resolution.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from types import TracebackType

import numpy as np
import pandas as pd
import rasterio
import shapely
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.windows import from_bounds

from core.grid import CELL_SIZE, RD_NEW, cell_center

_RGB = (1, 2, 3)
# Edge segments of the source footprint when it is reprojected; curvature over a city-sized
# raster is far below a pixel at this density.
_FOOTPRINT_SEGMENTS = 64
#: Largest resampling factor (source pixels per patch pixel, along one axis) read without
#: overviews. Beyond it every patch decodes factor² times the pixels it keeps: a 256 m patch
#: of an 8 cm raster (factor 50 at 64 px) reads 3200 x 3200 pixels, about a second a patch
#: and hours a city. Overviews (2x, 4x, ... averaged) let GDAL read the nearest level instead.
MAX_FACTOR_WITHOUT_OVERVIEWS = 8.0
#: Share of the covered patches that may be blank (all 0 or all nodata) without a warning.
_BLANK_SHARE_WARNING = 0.5


@dataclass(frozen=True)
class Patch:
    """A square RGB patch.

    Attributes:
        image: uint8 array (3, out_px, out_px), north up; 0 where the window leaves the raster.
        valid_fraction: share of the window's area inside the raster footprint.
        edge: the window is partly outside the raster (padded with 0).
        outside: the window is entirely outside the raster (all 0).
    """

    image: np.ndarray
    valid_fraction: float
    edge: bool
    outside: bool


class AerialRaster:
    """An aerial raster opened for patch reads in EPSG:28992 (use as a context manager).

    Args:
        path: any file rasterio opens, with a CRS and at least 3 uint8 bands (RGB first).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: naming the file, if rasterio cannot open it, it has no CRS, fewer than 3
            bands, or its RGB bands are not 8-bit.
    """

    def __init__(self, path: str | PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: aerial raster not found")
        try:
            source = rasterio.open(self.path)
        except RasterioIOError as exc:
            raise ValueError(f"{self.path}: not a raster rasterio can open ({exc})") from exc
        try:
            _check(source, self.path)
        except ValueError:
            source.close()
            raise
        self._source = source
        if source.crs.to_epsg() == 28992:
            self._dataset = source
            self.footprint = shapely.box(*source.bounds)
        else:
            self._dataset = WarpedVRT(source, crs=RD_NEW, resampling=Resampling.bilinear, nodata=0)
            self.footprint = _reprojected_footprint(source)
        shapely.prepare(self.footprint)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(minx, miny, maxx, maxy) of the raster in EPSG:28992."""
        return tuple(self._dataset.bounds)

    @property
    def resolution(self) -> tuple[float, float]:
        """Pixel size (x, y) in metres, after warping to EPSG:28992."""
        return self._dataset.res

    def patch(self, cx: float, cy: float, size_m: float, out_px: int) -> Patch:
        """Cut a ``size_m`` x ``size_m`` patch centred on (cx, cy) in RD metres.

        The window is resampled to ``out_px`` x ``out_px`` (area-average when shrinking,
        bilinear when enlarging), so rasters of any resolution give the same ground extent.
        """
        if not (size_m > 0 and out_px >= 1):
            raise ValueError(f"patch: size_m must be > 0 and out_px >= 1, got {size_m}, {out_px}")
        half = size_m / 2
        window = shapely.box(cx - half, cy - half, cx + half, cy + half)
        valid = shapely.intersection(window, self.footprint).area / window.area
        image = np.zeros((3, out_px, out_px), dtype=np.uint8)
        if valid > 0:
            self._read_into(image, cx - half, cy + half, size_m / out_px)
        return Patch(image=image, valid_fraction=valid, edge=0 < valid < 1, outside=valid == 0)

    def patches(
        self, cell_ids: np.ndarray, size_m: float, out_px: int
    ) -> tuple[np.ndarray, pd.DataFrame]:
        """Patches centred on cells.

        Cells whose window misses the raster are not dropped: their image is all 0 and the
        status says so (plus one warning with the count and both extents). When most covered
        patches are blank (all 0 or all nodata: an empty or sparse raster) a warning gives the
        count.

        Returns:
            ``images`` uint8 (n, 3, out_px, out_px) aligned with ``cell_ids`` and ``status``,
            a DataFrame with ``cell_id``, ``valid_fraction``, ``edge``, ``outside``.

        Raises:
            ValueError: naming the raster, before any read, when no cell's window touches the
                raster (its bounds and the cells' are in the message), or when a patch would
                shrink more than :data:`MAX_FACTOR_WITHOUT_OVERVIEWS` times from a raster
                without overviews (the message gives the command that builds them).
        """
        cell_ids = np.asarray(cell_ids, dtype=np.int64)
        cx, cy = cell_center(cell_ids)
        if len(cell_ids):
            self._check_coverage(cx, cy, size_m)
            self._check_overviews(size_m, out_px)
        images = np.zeros((len(cell_ids), 3, out_px, out_px), dtype=np.uint8)
        rows = []
        for i, (x, y) in enumerate(zip(cx, cy, strict=True)):
            p = self.patch(x, y, size_m, out_px)
            images[i] = p.image
            rows.append((p.valid_fraction, p.edge, p.outside))
        status = pd.DataFrame(rows, columns=["valid_fraction", "edge", "outside"]).astype(
            {"valid_fraction": np.float64, "edge": bool, "outside": bool}
        )
        status.insert(0, "cell_id", cell_ids)
        n_outside = int(status["outside"].sum())
        if n_outside:
            warnings.warn(
                f"{self.path}: {n_outside} of {len(cell_ids)} cells lie entirely outside the "
                "raster; their patches are all 0 (see status['outside']); raster bounds "
                f"{_rounded(self.bounds)}, cells' bounds {_rounded(_cells_bounds(cx, cy))}",
                stacklevel=2,
            )
        covered = ~status["outside"].to_numpy()
        blank = covered & self._blank(images)
        if covered.any() and blank.sum() > _BLANK_SHARE_WARNING * covered.sum():
            warnings.warn(
                f"{self.path}: {int(blank.sum())} of {int(covered.sum())} patches inside the "
                "raster are blank (all 0 or nodata); is the raster empty or sparse there?",
                stacklevel=2,
            )
        return images, status

    def _blank(self, images: np.ndarray) -> np.ndarray:
        """Per image: every pixel is 0, or every pixel is the raster's nodata value."""
        flat = images.reshape(len(images), -1)
        blank = flat.max(axis=1, initial=0) == 0
        nodata = self._source.nodata
        if nodata is not None and 0 <= nodata <= 255:
            blank |= (flat == int(nodata)).all(axis=1)
        return blank

    def _check_coverage(self, cx: np.ndarray, cy: np.ndarray, size_m: float) -> None:
        half = size_m / 2
        windows = shapely.box(cx - half, cy - half, cx + half, cy + half)
        if not shapely.intersects(windows, self.footprint).any():
            raise ValueError(
                f"{self.path}: the raster covers none of the {len(cx)} cells: raster bounds "
                f"{_rounded(self.bounds)} vs cells' bounds {_rounded(_cells_bounds(cx, cy))} "
                "(EPSG:28992 metres); wrong raster, extent or CRS?"
            )

    def _check_overviews(self, size_m: float, out_px: int) -> None:
        factor = size_m / out_px / min(self.resolution)
        if factor <= MAX_FACTOR_WITHOUT_OVERVIEWS or self._source.overviews(_RGB[0]):
            return
        levels = " ".join(str(2**k) for k in range(1, math.ceil(math.log2(factor)) + 1))
        window = math.ceil(size_m / min(self.resolution))
        raise ValueError(
            f"{self.path}: a {size_m:g} m patch at {out_px} px shrinks {factor:.0f}x from "
            f"{min(self.resolution):g} m pixels, and this {self._source.width} x "
            f"{self._source.height} raster has no overviews, so every patch would read "
            f"{window} x {window} full-resolution pixels (hours for a city). Build overviews "
            f"once: gdaladdo -r average {self._source.name} {levels}  (or: rio overview "
            f"--build {levels.replace(' ', ',')} --resampling average {self._source.name})"
        )

    def _read_into(self, image: np.ndarray, left: float, top: float, pixel_m: float) -> None:
        """Fill the part of ``image`` (top-left at (left, top)) that lies on the raster.

        This is what ``read(boundless=True, fill_value=0)`` does, but WarpedVRT refuses
        boundless reads, so both RD and warped rasters read the overlap and paste it.
        """
        out_px = image.shape[-1]
        minx, miny, maxx, maxy = self._dataset.bounds
        # Whole output pixels that lie on the raster; a sliver below one pixel stays 0.
        col0 = max(0, math.ceil((minx - left) / pixel_m - 1e-9))
        col1 = min(out_px, math.floor((maxx - left) / pixel_m + 1e-9))
        row0 = max(0, math.ceil((top - maxy) / pixel_m - 1e-9))
        row1 = min(out_px, math.floor((top - miny) / pixel_m + 1e-9))
        if col1 <= col0 or row1 <= row0:
            return
        window = from_bounds(
            left + col0 * pixel_m,
            top - row1 * pixel_m,
            left + col1 * pixel_m,
            top - row0 * pixel_m,
            transform=self._dataset.transform,
        )
        shrinking = pixel_m > min(self._dataset.res)
        image[:, row0:row1, col0:col1] = self._dataset.read(
            indexes=list(_RGB),
            window=window,
            out_shape=(3, row1 - row0, col1 - col0),
            resampling=Resampling.average if shrinking else Resampling.bilinear,
        )

    def close(self) -> None:
        """Close the raster (and its warped view)."""
        if self._dataset is not self._source:
            self._dataset.close()
        self._source.close()

    def __enter__(self) -> AerialRaster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_aerial(path: str | PathLike) -> AerialRaster:
    """Open an aerial raster for patch reads; see :class:`AerialRaster`."""
    return AerialRaster(path)


def _check(source: rasterio.io.DatasetReader, path: Path) -> None:
    if source.crs is None:
        raise ValueError(f"{path}: raster has no CRS; georeference it (e.g. EPSG:28992)")
    if source.count < len(_RGB):
        raise ValueError(
            f"{path}: raster has {source.count} band(s); an RGB aerial needs at least 3"
        )
    dtypes = {source.dtypes[b - 1] for b in _RGB}
    if dtypes != {"uint8"}:
        raise ValueError(f"{path}: RGB bands must be 8-bit (uint8), found {sorted(dtypes)}")


def _cells_bounds(cx: np.ndarray, cy: np.ndarray) -> tuple[float, float, float, float]:
    half = CELL_SIZE / 2
    return (cx.min() - half, cy.min() - half, cx.max() + half, cy.max() + half)


def _rounded(bounds: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(float(b), 1) for b in bounds)


def _reprojected_footprint(source: rasterio.io.DatasetReader) -> shapely.Polygon:
    """The source's bounds as a polygon in EPSG:28992, edges densified to follow curvature."""
    left, bottom, right, top = source.bounds
    outline = shapely.segmentize(
        shapely.box(left, bottom, right, top),
        max(right - left, top - bottom) / _FOOTPRINT_SEGMENTS,
    )
    to_rd = Transformer.from_crs(source.crs, RD_NEW, always_xy=True)
    return shapely.transform(outline, lambda xy: np.column_stack(to_rd.transform(*xy.T)))
