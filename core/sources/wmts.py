"""Aerial imagery from PDOK's WMTS (Luchtfoto RGB) as one tiled, compressed GeoTIFF.

PDOK serves the yearly national 25 cm orthomosaic as WMTS layers ``{YEAR}_ortho25`` in the
Dutch tile matrix set ``EPSG:28992`` (top-left corner -285401.92, 903401.92; 256 px tiles;
scale denominator 12288000 / 2**level, i.e. 3440.64 m/px at level 0 and 0.21 m/px at level
14). This module reads the service's GetCapabilities, works out the tiles covering an RD
bounding box at the level nearest a wanted resolution, downloads them politely and resumably
into a cache folder, and mosaics them window by window (never the whole city in memory) into
``aerial/aerial.tif`` of a data root, which :func:`core.sources.aerial.open_aerial` reads.
"""

from __future__ import annotations

import io
import json
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.windows import Window
from tqdm.auto import tqdm

from core.dataroot import DataRoot
from core.grid import RD_NEW
from core.io import write_atomic
from core.sources.http import (
    DownloadReport,
    Estimate,
    FetchError,
    HttpClient,
    Politeness,
    Validator,
)

log = logging.getLogger(__name__)

PDOK_WMTS = "https://service.pdok.nl/hwh/luchtfotorgb/wmts/v1_0"
RD_MATRIX_SET = "EPSG:28992"
#: OGC's "standardized rendering pixel" (WMTS 1.0.0, 6.1): resolution = scale x 0.28 mm.
OGC_PIXEL_M = 0.00028
#: A 256 x 256 JPEG tile of the 25 cm orthophoto weighs about this much (an assumption for
#: the plan, not a measurement; city roofs and trees compress worse than fields and water).
AVERAGE_TILE_BYTES = 20_000
#: Internal tile size of the mosaic GeoTIFF (COG convention) and width of a write window.
MOSAIC_BLOCK = 512
_WINDOW_WIDTH_PX = 4096
_NS = {
    "wmts": "http://www.opengis.net/wmts/1.0",
    "ows": "http://www.opengis.net/ows/1.1",
    "xlink": "http://www.w3.org/1999/xlink",
}
_EXTENSIONS = {"image/jpeg": "jpeg", "image/png": "png"}

BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class TileMatrix:
    """One zoom level of a WMTS tile matrix set (OGC WMTS 1.0.0, 6.1).

    Attributes:
        identifier: the level's name in tile URLs, as the service writes it ("14", "05").
        scale_denominator: map scale at 0.28 mm pixels.
        top_left: (x, y) of the matrix's top-left corner in the set's CRS.
        tile_width: pixels per tile, horizontally.
        tile_height: pixels per tile, vertically.
        matrix_width: number of tile columns.
        matrix_height: number of tile rows.
    """

    identifier: str
    scale_denominator: float
    top_left: tuple[float, float]
    tile_width: int
    tile_height: int
    matrix_width: int
    matrix_height: int

    @property
    def resolution(self) -> float:
        """Ground size of a pixel in CRS units (metres for EPSG:28992)."""
        return self.scale_denominator * OGC_PIXEL_M

    @property
    def tile_span(self) -> tuple[float, float]:
        """Ground width and height of one tile."""
        return self.tile_width * self.resolution, self.tile_height * self.resolution

    def tile_bounds(self, col: int, row: int) -> BBox:
        """(minx, miny, maxx, maxy) of tile (col, row); rows count down from the top."""
        span_x, span_y = self.tile_span
        left = self.top_left[0] + col * span_x
        top = self.top_left[1] - row * span_y
        return left, top - span_y, left + span_x, top

    def tile_range(self, bbox: BBox) -> TileRange:
        """The tiles covering ``bbox`` (minx, miny, maxx, maxy), clipped to the matrix.

        Raises:
            ValueError: if the box is empty or lies outside the matrix.
        """
        minx, miny, maxx, maxy = bbox
        if not (maxx > minx and maxy > miny):
            raise ValueError(f"bbox {bbox}: expected minx < maxx and miny < maxy")
        span_x, span_y = self.tile_span
        x0, y0 = self.top_left
        eps = 1e-9  # a box edge on a tile edge must not pull in the next tile by rounding
        col_min = max(0, math.floor((minx - x0) / span_x + eps))
        col_max = min(self.matrix_width - 1, math.ceil((maxx - x0) / span_x - eps) - 1)
        row_min = max(0, math.floor((y0 - maxy) / span_y + eps))
        row_max = min(self.matrix_height - 1, math.ceil((y0 - miny) / span_y - eps) - 1)
        if col_max < col_min or row_max < row_min:
            raise ValueError(f"bbox {bbox} lies outside tile matrix {self.identifier}")
        return TileRange(self, col_min, col_max, row_min, row_max)


@dataclass(frozen=True)
class TileRange:
    """A rectangle of tiles of one matrix; ``*_max`` are inclusive."""

    matrix: TileMatrix
    col_min: int
    col_max: int
    row_min: int
    row_max: int

    @property
    def cols(self) -> int:
        """Number of tile columns."""
        return self.col_max - self.col_min + 1

    @property
    def rows(self) -> int:
        """Number of tile rows."""
        return self.row_max - self.row_min + 1

    def __len__(self) -> int:
        return self.cols * self.rows

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """(col, row) of every tile, row by row from the top."""
        for row in range(self.row_min, self.row_max + 1):
            for col in range(self.col_min, self.col_max + 1):
                yield col, row

    @property
    def bounds(self) -> BBox:
        """(minx, miny, maxx, maxy) of the whole range."""
        left, _, _, top = self.matrix.tile_bounds(self.col_min, self.row_min)
        _, bottom, right, _ = self.matrix.tile_bounds(self.col_max, self.row_max)
        return left, bottom, right, top


@dataclass(frozen=True)
class TileMatrixSet:
    """A named set of tile matrices in one CRS, finest last."""

    identifier: str
    crs: str
    matrices: tuple[TileMatrix, ...]

    def nearest(self, resolution: float) -> TileMatrix:
        """The level whose pixel size is nearest ``resolution`` (by ratio, so 0.25 -> 0.21)."""
        if not resolution > 0:
            raise ValueError(f"resolution must be > 0 m/px, got {resolution}")
        return min(self.matrices, key=lambda m: abs(math.log(m.resolution / resolution)))


@dataclass(frozen=True)
class WmtsLayer:
    """A layer of a WMTS service.

    Attributes:
        identifier: the layer name in requests ("2020_ortho25").
        title: human-readable title.
        formats: MIME types the layer is served in.
        matrix_sets: identifiers of the tile matrix sets it is tiled in.
        style: the default style identifier.
        resource_urls: RESTful tile URL templates by format (may be empty).
    """

    identifier: str
    title: str
    formats: tuple[str, ...]
    matrix_sets: tuple[str, ...]
    style: str = "default"
    resource_urls: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    """What a WMTS GetCapabilities document says, with the URL it came from."""

    url: str
    layers: dict[str, WmtsLayer]
    matrix_sets: dict[str, TileMatrixSet]

    def layer(self, name: str) -> WmtsLayer:
        """The layer called ``name``; a ValueError listing the available ones if absent."""
        if name not in self.layers:
            raise ValueError(
                f"{self.url}: no WMTS layer {name!r}; available: "
                f"{', '.join(sorted(self.layers)) or 'none'}"
            )
        return self.layers[name]

    def matrix_set(self, layer: WmtsLayer, identifier: str = RD_MATRIX_SET) -> TileMatrixSet:
        """The tile matrix set ``identifier`` of ``layer``; a ValueError if it is not offered."""
        if identifier not in layer.matrix_sets or identifier not in self.matrix_sets:
            raise ValueError(
                f"{self.url}: layer {layer.identifier!r} is not tiled in "
                f"{identifier} (it offers {list(layer.matrix_sets)})"
            )
        return self.matrix_sets[identifier]

    def tile_template(self, layer: WmtsLayer, matrix_set: str, image_format: str) -> str:
        """A RESTful tile URL with ``{TileMatrix}``, ``{TileCol}``, ``{TileRow}`` left open.

        The layer's ``ResourceURL`` is used when the document has one; PDOK's KVP documents
        omit it, and then PDOK's RESTful pattern ``{base}/{layer}/{set}/{z}/{col}/{row}.{ext}``
        is built from the capabilities URL.
        """
        if image_format not in layer.formats:
            raise ValueError(
                f"{self.url}: layer {layer.identifier!r} is not served as "
                f"{image_format} (formats: {list(layer.formats)})"
            )
        template = layer.resource_urls.get(image_format)
        if template is None:
            base = self.url.split("?", 1)[0].rstrip("/")
            ext = _EXTENSIONS.get(image_format, image_format.rsplit("/", 1)[-1])
            template = f"{base}/{layer.identifier}/{{TileMatrixSet}}/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.{ext}"
        return template.replace("{TileMatrixSet}", matrix_set).replace("{Style}", layer.style)


def _text(element: ET.Element, path: str, url: str) -> str:
    found = element.find(path, _NS)
    if found is None or found.text is None:
        raise FetchError(f"{url}: GetCapabilities element {path} missing")
    return found.text.strip()


def _parse_matrix(element: ET.Element, url: str) -> TileMatrix:
    identifier = _text(element, "ows:Identifier", url)
    try:
        x, y = (float(v) for v in _text(element, "wmts:TopLeftCorner", url).split())
        return TileMatrix(
            identifier=identifier,
            scale_denominator=float(_text(element, "wmts:ScaleDenominator", url)),
            top_left=(x, y),
            tile_width=int(_text(element, "wmts:TileWidth", url)),
            tile_height=int(_text(element, "wmts:TileHeight", url)),
            matrix_width=int(_text(element, "wmts:MatrixWidth", url)),
            matrix_height=int(_text(element, "wmts:MatrixHeight", url)),
        )
    except ValueError as exc:
        raise FetchError(f"{url}: tile matrix {identifier!r} is malformed ({exc})") from None


def parse_capabilities(document: bytes | str, url: str) -> Capabilities:
    """Parse a WMTS 1.0.0 GetCapabilities document.

    Args:
        document: the XML.
        url: where it came from (redacted), for error messages and RESTful fallbacks.

    Raises:
        FetchError: naming ``url`` if the document is not XML, is an OWS exception report, or
            is not a WMTS Capabilities document.
    """
    try:
        root = ET.fromstring(document)
    except ET.ParseError as exc:
        raise FetchError(f"{url}: GetCapabilities response is not XML ({exc})") from None
    if root.tag == f"{{{_NS['ows']}}}ExceptionReport":
        texts = [t.text.strip() for t in root.iter(f"{{{_NS['ows']}}}ExceptionText") if t.text]
        raise FetchError(f"{url}: the service answered with an exception: {'; '.join(texts)}")
    if root.tag != f"{{{_NS['wmts']}}}Capabilities":
        raise FetchError(f"{url}: not a WMTS Capabilities document (root element {root.tag})")
    contents = root.find("wmts:Contents", _NS)
    if contents is None:
        raise FetchError(f"{url}: GetCapabilities has no Contents")

    layers = {}
    for element in contents.findall("wmts:Layer", _NS):
        identifier = _text(element, "ows:Identifier", url)
        styles = element.findall("wmts:Style", _NS)
        default = next(
            (s for s in styles if s.get("isDefault") == "true"), styles[0] if styles else None
        )
        layers[identifier] = WmtsLayer(
            identifier=identifier,
            title=(element.findtext("ows:Title", "", _NS) or "").strip(),
            formats=tuple(f.text.strip() for f in element.findall("wmts:Format", _NS) if f.text),
            matrix_sets=tuple(
                s.text.strip()
                for s in element.findall("wmts:TileMatrixSetLink/wmts:TileMatrixSet", _NS)
                if s.text
            ),
            style="default" if default is None else _text(default, "ows:Identifier", url),
            resource_urls={
                r.get("format", ""): r.get("template", "")
                for r in element.findall("wmts:ResourceURL", _NS)
                if r.get("resourceType") == "tile"
            },
        )
    matrix_sets = {}
    for element in contents.findall("wmts:TileMatrixSet", _NS):
        identifier = _text(element, "ows:Identifier", url)
        matrices = sorted(
            (_parse_matrix(m, url) for m in element.findall("wmts:TileMatrix", _NS)),
            key=lambda m: -m.scale_denominator,
        )
        matrix_sets[identifier] = TileMatrixSet(
            identifier, _text(element, "ows:SupportedCRS", url), tuple(matrices)
        )
    return Capabilities(url=url, layers=layers, matrix_sets=matrix_sets)


def fetch_capabilities(client: HttpClient, endpoint: str = PDOK_WMTS) -> Capabilities:
    """GET and parse the service's KVP GetCapabilities document."""
    params = {"request": "GetCapabilities", "service": "WMTS"}
    response = client.get(endpoint, params)
    return parse_capabilities(response.content, client.redact(response.url or endpoint, params))


def rd_tile_matrix_set(levels: int = 16) -> TileMatrixSet:
    """The Dutch RD tile matrix set PDOK serves as ``EPSG:28992`` (levels 0..levels-1).

    From the Dutch tiling guideline (Geonovum, "Nederlandse richtlijn tiling") as PDOK writes
    it in its capabilities; used to plan a fetch without asking the service.
    """
    return TileMatrixSet(
        RD_MATRIX_SET,
        "urn:ogc:def:crs:EPSG::28992",
        tuple(
            TileMatrix(f"{z:02d}", 12288000.0 / 2**z, (-285401.92, 903401.92), 256, 256, 2**z, 2**z)
            for z in range(levels)
        ),
    )


def aerial_layer(year: int | str) -> str:
    """PDOK's layer name for a year's 25 cm orthomosaic (``2020_ortho25``, ``Actueel_ortho25``)."""
    return f"{year}_ortho25"


def estimate_aerial(
    bbox_rd: BBox,
    year: int | str = 2020,
    resolution: float = 0.25,
    politeness: Politeness | None = None,
    matrix_set: TileMatrixSet | None = None,
    tile_bytes: int = AVERAGE_TILE_BYTES,
) -> Estimate:
    """Plan a PDOK aerial fetch without contacting the service.

    Args:
        bbox_rd: (minx, miny, maxx, maxy) in EPSG:28992.
        year: the orthomosaic's year.
        resolution: wanted metres per pixel; the nearest level is used.
        politeness: the rate limit the fetch runs under.
        matrix_set: the tile matrix set; PDOK's RD set when not given.
        tile_bytes: average bytes of one tile.

    Returns:
        Requests (capabilities + tiles) and bytes written (tile cache + a mosaic of about the
        same size).
    """
    politeness = politeness or Politeness()
    matrix = (matrix_set or rd_tile_matrix_set()).nearest(resolution)
    tiles = len(matrix.tile_range(bbox_rd))
    return Estimate(
        source=f"PDOK aerial {aerial_layer(year)} (level {matrix.identifier}, "
        f"{matrix.resolution:.2f} m/px)",
        requests=tiles + 1,
        bytes=2 * tiles * tile_bytes,
        requests_per_second=politeness.requests_per_second,
        note=f"{tiles} tiles; open data, no key (PDOK Fair Use); resumable",
    )


def tile_validator(width: int, height: int) -> Validator:
    """A validator accepting only images Pillow fully decodes, of ``width`` x ``height``."""

    def validate(payload: bytes) -> None:
        try:
            with Image.open(io.BytesIO(payload)) as image:
                image.load()  # decodes every byte: a truncated JPEG fails here
                size = image.size
        except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ValueError(f"not a decodable image ({exc})") from None
        if size != (width, height):
            raise ValueError(f"tile is {size[0]} x {size[1]} px, expected {width} x {height}")

    return validate


@dataclass(frozen=True)
class AerialFetch:
    """What :func:`fetch_aerial` did.

    Attributes:
        path: the mosaic GeoTIFF.
        layer: the WMTS layer fetched.
        matrix: the tile matrix (level) used.
        tiles: the tile range mosaicked.
        fetched: tiles downloaded in this run.
        skipped: tiles already in the cache.
        missing: (col, row) of tiles the service does not have (404), black in the mosaic.
    """

    path: Path
    layer: str
    matrix: TileMatrix
    tiles: TileRange
    fetched: int
    skipped: int
    missing: tuple[tuple[int, int], ...]


def fetch_aerial(
    root: str | PathLike,
    bbox_rd: BBox,
    year: int | str = 2020,
    *,
    resolution: float = 0.25,
    endpoint: str = PDOK_WMTS,
    client: HttpClient | None = None,
    image_format: str = "image/jpeg",
    compress: str = "jpeg",
    cache_dir: str | PathLike | None = None,
    show_progress: bool = True,
    mosaic_name: str = "aerial.tif",
) -> AerialFetch:
    """Download PDOK aerial tiles over ``bbox_rd`` and mosaic them into ``aerial/aerial.tif``
    (or ``aerial/<mosaic_name>``: another year's mosaic is ``<year>.tif``).

    Tiles land in ``{cache_dir}/{layer}/{set}/{level}/{col}/{row}.{ext}`` (``cache_dir``
    defaults to ``cache/pdok_wmts`` of the data root); tiles on disk are not fetched again,
    so a rerun after an interruption continues where it stopped. Tiles the service answers 404 for (outside
    its coverage) are listed in ``missing.json`` beside them, not asked for again, and left
    black in the mosaic; delete that file to retry them.

    Args:
        root: the output data root.
        bbox_rd: (minx, miny, maxx, maxy) in EPSG:28992.
        year: the orthomosaic's year (layer ``{year}_ortho25``).
        resolution: wanted metres per pixel; the level nearest it is used (0.25 -> 0.21).
        endpoint: the WMTS endpoint.
        client: the HTTP client (rate limit, retries); a default polite one if not given.
        image_format: tile format to request.
        compress: mosaic compression, ``"jpeg"`` (YCbCr, quality 90) or ``"deflate"``.
        cache_dir: where tiles are cached.
        show_progress: show progress bars.
        mosaic_name: the mosaic's file name in ``aerial/``.

    Raises:
        ValueError: if the layer, the EPSG:28992 matrix set or the format is not offered.
        FetchError: if tiles failed for a reason other than 404 (after retries); the tiles
            on disk are kept, and no mosaic is written.
    """
    client = client or HttpClient()
    capabilities = fetch_capabilities(client, endpoint)
    layer = capabilities.layer(aerial_layer(year))
    matrix_set = capabilities.matrix_set(layer, RD_MATRIX_SET)
    matrix = matrix_set.nearest(resolution)
    tiles = matrix.tile_range(bbox_rd)
    template = capabilities.tile_template(layer, matrix_set.identifier, image_format)
    ext = _EXTENSIONS.get(image_format, image_format.rsplit("/", 1)[-1])
    folder = (Path(cache_dir) if cache_dir else DataRoot(root).cache / "pdok_wmts") / (
        Path(layer.identifier) / matrix_set.identifier.replace(":", "_") / matrix.identifier
    )

    def tile_file(col: int, row: int) -> Path:
        return folder / str(col) / f"{row}.{ext}"

    def tile_url(col: int, row: int) -> str:
        return (
            template.replace("{TileMatrix}", matrix.identifier)
            .replace("{TileCol}", str(col))
            .replace("{TileRow}", str(row))
        )

    missing_file = folder / "missing.json"
    known_missing = _read_missing(missing_file)
    wanted = [tile for tile in tiles if tile not in known_missing]
    log.info(
        "PDOK aerial: %s level %s (%.2f m/px), %d tiles (%d known missing) into %s",
        layer.identifier,
        matrix.identifier,
        matrix.resolution,
        len(tiles),
        len(tiles) - len(wanted),
        folder,
    )
    report = client.download_many(
        ((tile_url(col, row), tile_file(col, row), None) for col, row in wanted),
        validate=tile_validator(matrix.tile_width, matrix.tile_height),
        desc=f"aerial tiles {layer.identifier}",
        total=len(wanted),
        show_progress=show_progress,
    )
    by_path = {tile_file(*tile): tile for tile in wanted}
    new_missing = {by_path[path] for path, error in report.failed if error.status == 404}
    missing = known_missing | new_missing
    if new_missing:
        write_atomic(missing_file, lambda tmp: tmp.write_text(json.dumps(sorted(missing))))
        log.warning(
            "PDOK aerial: %d tiles not in the service (404), left black; listed in %s",
            len(new_missing),
            missing_file,
        )
    DownloadReport(
        fetched=report.fetched,
        skipped=report.skipped,
        bytes=report.bytes,
        failed=[(path, error) for path, error in report.failed if by_path[path] not in new_missing],
    ).raise_for_failures(f"PDOK aerial tiles of {layer.identifier}")
    missing_here = tuple(sorted(missing & set(tiles)))
    path = write_mosaic(
        tiles,
        tile_file,
        DataRoot(root).root / "aerial" / mosaic_name,
        compress=compress,
        tags={
            "SOURCE": template.split("{", 1)[0],
            "WMTS_LAYER": layer.identifier,
            "TILE_MATRIX": f"{matrix_set.identifier}:{matrix.identifier}",
            "MISSING_TILES": str(len(missing_here)),
        },
        show_progress=show_progress,
    )
    return AerialFetch(
        path=path,
        layer=layer.identifier,
        matrix=matrix,
        tiles=tiles,
        fetched=report.fetched,
        skipped=report.skipped,
        missing=missing_here,
    )


def _read_missing(path: Path) -> set[tuple[int, int]]:
    if not path.is_file():
        return set()
    try:
        return {(int(col), int(row)) for col, row in json.loads(path.read_text())}
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"{path}: not a list of [col, row] pairs ({exc}); delete it to retry every missing tile"
        ) from None


def write_mosaic(
    tiles: TileRange,
    tile_file: Callable[[int, int], Path],
    dest: str | PathLike,
    compress: str = "jpeg",
    tags: dict[str, str] | None = None,
    show_progress: bool = True,
) -> Path:
    """Mosaic cached tiles into a tiled, compressed GeoTIFF with overviews (EPSG:28992).

    The raster covers the tile range exactly, at the matrix's resolution. It is written in
    windows of whole tiles aligned to its 512 px internal blocks, so memory stays at one
    window whatever the city's size, then given internal overviews (2x, 4x, ... averaged),
    and renamed into place only when complete. Tiles without a file are left black (0).

    Raises:
        ValueError: naming the file, for a cached tile that does not decode or has the
            wrong size; or for an unknown ``compress``.
    """
    matrix = tiles.matrix
    tw, th = matrix.tile_width, matrix.tile_height
    width, height = tiles.cols * tw, tiles.rows * th
    left, _, _, top = tiles.bounds
    profile = dict(
        driver="GTiff",
        width=width,
        height=height,
        count=3,
        dtype="uint8",
        crs=RD_NEW,
        transform=from_origin(left, top, matrix.resolution, matrix.resolution),
        tiled=True,
        blockxsize=MOSAIC_BLOCK,
        blockysize=MOSAIC_BLOCK,
        interleave="pixel",
        bigtiff="if_safer",
        **_compression(compress),
    )
    rows_per_window = max(1, MOSAIC_BLOCK // th)
    cols_per_window = max(1, _WINDOW_WIDTH_PX // tw)

    def write(tmp: Path) -> None:
        with (
            rasterio.open(tmp, "w", **profile) as dst,
            tqdm(
                total=len(tiles), desc="aerial mosaic", unit="tile", disable=not show_progress
            ) as bar,
        ):
            for r0 in range(0, tiles.rows, rows_per_window):
                nr = min(rows_per_window, tiles.rows - r0)
                for c0 in range(0, tiles.cols, cols_per_window):
                    nc = min(cols_per_window, tiles.cols - c0)
                    block = np.zeros((3, nr * th, nc * tw), dtype=np.uint8)
                    for dr in range(nr):
                        for dc in range(nc):
                            path = tile_file(tiles.col_min + c0 + dc, tiles.row_min + r0 + dr)
                            if path.is_file():
                                block[:, dr * th : (dr + 1) * th, dc * tw : (dc + 1) * tw] = (
                                    _read_tile(path, tw, th)
                                )
                    dst.write(block, window=Window(c0 * tw, r0 * th, nc * tw, nr * th))
                    bar.update(nr * nc)
            factors = _overview_factors(width, height)
            if factors:
                dst.build_overviews(factors, Resampling.average)
                dst.update_tags(ns="rio_overview", resampling="average")
            dst.update_tags(**(tags or {}))

    return write_atomic(dest, write)


def _compression(compress: str) -> dict:
    if compress == "jpeg":
        return dict(compress="jpeg", photometric="ycbcr", jpeg_quality=90)
    if compress == "deflate":
        return dict(compress="deflate", predictor=2, zlevel=6, photometric="rgb")
    raise ValueError(f"mosaic compression must be 'jpeg' or 'deflate', got {compress!r}")


def _overview_factors(width: int, height: int) -> list[int]:
    """2, 4, 8, ... until the overview fits in one 256 px block."""
    factors, factor = [], 2
    while max(width, height) / factor >= 256:
        factors.append(factor)
        factor *= 2
    return factors


def _read_tile(path: Path, width: int, height: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError) as exc:
        raise ValueError(
            f"{path}: cached tile does not decode ({exc}); delete it and rerun"
        ) from None
    if pixels.shape[:2] != (height, width):
        raise ValueError(
            f"{path}: cached tile is {pixels.shape[1]} x {pixels.shape[0]} px, "
            f"expected {width} x {height}; delete it and rerun"
        )
    return pixels.transpose(2, 0, 1)
