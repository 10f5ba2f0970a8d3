"""A fake PDOK Luchtfoto WMTS serving a demo data root's aerial raster as real WMTS.

It answers what ``https://service.pdok.nl/hwh/luchtfotorgb/wmts/v1_0`` answers: a KVP
GetCapabilities document (OGC WMTS 1.0.0, as PDOK's MapProxy writes it, with the Dutch
``EPSG:28992`` tile matrix set and ``EPSG:3857``) and RESTful tiles at
``{base}/{layer}/{TileMatrixSet}/{TileMatrix}/{TileCol}/{TileRow}.{jpeg|png}``. Tiles are cut
from ``aerial/aerial.tif`` of the data root by nearest-neighbour sampling at tile pixel
centres, so a mosaic of fetched tiles reproduces the demo raster at the tile level's
resolution; tiles entirely outside the raster are 404 (the edge of coverage), pixels outside
it are black. Faults (429, 5xx, corrupt payloads) can be queued per tile.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from PIL import Image
from pyproj import Transformer
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from core.dataroot import DataRoot

PREFIX = "/hwh/luchtfotorgb/wmts/v1_0"
RD_LEVELS = 16  # 0..15: 3440.64 m/px down to 0.105 m/px
WEB_MERCATOR_LEVELS = 20
_MIME = {"jpeg": "image/jpeg", "png": "image/png"}


@dataclass
class FakeWmts:
    """A running fake; see :func:`install_wmts`.

    Attributes:
        endpoint: the WMTS endpoint (what ``PDOK_WMTS`` is for the real service).
        layers: the layers it serves (all the same demo raster).
        tile_requests: how often each (col, row) tile was asked for, at any level.
        capabilities_requests: how often GetCapabilities was asked for.
        faults: responses queued per (col, row), served (and consumed) before the real tile.
    """

    endpoint: str
    layers: tuple[str, ...]
    image: np.ndarray
    transform: rasterio.Affine
    tile_requests: Counter = field(default_factory=Counter)
    capabilities_requests: int = 0
    faults: dict[tuple[int, int], list[Response]] = field(default_factory=dict)

    def inject(self, col: int, row: int, *responses: Response) -> None:
        """Answer the next requests for tile (col, row) with ``responses``, in order."""
        self.faults.setdefault((col, row), []).extend(responses)

    def tile_pixels(self, level: int, col: int, row: int) -> np.ndarray | None:
        """The (256, 256, 3) tile the fake serves, or None where it answers 404."""
        res = _rd_scale(level) * 0.00028
        left, top = -285401.92 + col * 256 * res, 903401.92 - row * 256 * res
        height, width = self.image.shape[:2]
        src_left, src_top, src_res = self.transform.c, self.transform.f, self.transform.a
        src_right, src_bottom = src_left + width * src_res, src_top - height * src_res
        if (
            left >= src_right
            or left + 256 * res <= src_left
            or top <= src_bottom
            or top - 256 * res >= src_top
        ):
            return None
        centres = (np.arange(256) + 0.5) * res
        cols = np.floor((left + centres - src_left) / src_res).astype(int)
        rows = np.floor((src_top - (top - centres)) / src_res).astype(int)
        inside = (rows[:, None] >= 0) & (rows[:, None] < height) & (cols >= 0) & (cols < width)
        tile = self.image[np.clip(rows, 0, height - 1)[:, None], np.clip(cols, 0, width - 1)]
        return np.where(inside[..., None], tile, 0).astype(np.uint8)


def install_wmts(
    server: HTTPServer,
    root: str | Path,
    layers: tuple[str, ...] = ("Actueel_ortho25", "2020_ortho25", "2019_ortho25"),
    formats: tuple[str, ...] = ("image/jpeg", "image/png"),
    resource_urls: bool = True,
) -> FakeWmts:
    """Serve ``aerial/aerial.tif`` of data root ``root`` as PDOK's Luchtfoto WMTS.

    Args:
        server: the pytest-httpserver server to register handlers on.
        root: a data root with an EPSG:28992 aerial raster (the demo city's).
        layers: layer identifiers to advertise.
        formats: tile formats to advertise and serve.
        resource_urls: include RESTful ``ResourceURL`` templates in the capabilities (PDOK's
            KVP document may not; clients then build PDOK's RESTful pattern themselves).
    """
    with rasterio.open(DataRoot(root).aerial) as src:
        if src.crs.to_epsg() != 28992:
            raise ValueError(f"{src.name}: the fake WMTS needs an EPSG:28992 raster")
        image = src.read([1, 2, 3]).transpose(1, 2, 0)
        transform, bounds = src.transform, src.bounds
    fake = FakeWmts(
        endpoint=server.url_for(PREFIX), layers=tuple(layers), image=image, transform=transform
    )
    capabilities = _capabilities(fake.endpoint, layers, formats, bounds, resource_urls)

    def kvp(request: Request) -> Response:
        args = {k.lower(): v for k, v in request.args.items()}
        if (
            args.get("request", "").lower() == "getcapabilities"
            and args.get("service", "").lower() == "wmts"
        ):
            fake.capabilities_requests += 1
            return Response(capabilities, content_type="application/xml")
        return _exception(
            400,
            "OperationNotSupported",
            "unsupported request; use GetCapabilities with KVP and GetTile with RESTful URLs",
        )

    tile_path = re.compile(
        rf"^{re.escape(PREFIX)}/(?P<layer>[^/]+)/(?P<tms>[^/]+)/(?P<level>\d+)/(?P<col>\d+)/(?P<row>\d+)\.(?P<ext>\w+)$"
    )

    def tile(request: Request) -> Response:
        match = tile_path.match(request.path)
        layer, tms, ext = match["layer"], match["tms"], match["ext"]
        level, col, row = int(match["level"]), int(match["col"]), int(match["row"])
        if layer not in layers:
            return _exception(400, "InvalidParameterValue", f"unknown layer: {layer}")
        if _MIME.get(ext) not in formats:
            return _exception(400, "InvalidParameterValue", f"unknown format: {ext}")
        if tms != "EPSG:28992" or level >= RD_LEVELS:
            return _exception(400, "InvalidParameterValue", f"unknown tile matrix: {tms}/{level}")
        if not (0 <= col < 2**level and 0 <= row < 2**level):
            return _exception(400, "TileOutOfRange", f"tile {col}/{row} outside the matrix")
        fake.tile_requests[(col, row)] += 1
        queued = fake.faults.get((col, row))
        if queued:
            return queued.pop(0)
        pixels = fake.tile_pixels(level, col, row)
        if pixels is None:
            return Response("Not Found", status=404, content_type="text/plain")
        return Response(encode_tile(pixels, ext), content_type=_MIME[ext])

    server.expect_request(PREFIX).respond_with_handler(kvp)
    server.expect_request(tile_path).respond_with_handler(tile)
    return fake


def encode_tile(pixels: np.ndarray, ext: str = "jpeg") -> bytes:
    """(h, w, 3) uint8 pixels as a JPEG (quality 90) or PNG file."""
    buffer = io.BytesIO()
    if ext == "jpeg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _rd_scale(level: int) -> float:
    return 12288000.0 / 2**level


def _exception(status: int, code: str, text: str) -> Response:
    body = (
        '<?xml version="1.0"?>\n'
        '<ExceptionReport xmlns="http://www.opengis.net/ows/1.1" version="1.1.0" xml:lang="en">\n'
        f'  <Exception exceptionCode="{code}">\n'
        f"    <ExceptionText>{escape(text)}</ExceptionText>\n"
        "  </Exception>\n"
        "</ExceptionReport>\n"
    )
    return Response(body, status=status, content_type="application/xml")


def _matrix(identifier: str, scale: float, top_left: str, size: int) -> str:
    return f"""      <TileMatrix>
        <ows:Identifier>{identifier}</ows:Identifier>
        <ScaleDenominator>{scale!r}</ScaleDenominator>
        <TopLeftCorner>{top_left}</TopLeftCorner>
        <TileWidth>256</TileWidth>
        <TileHeight>256</TileHeight>
        <MatrixWidth>{size}</MatrixWidth>
        <MatrixHeight>{size}</MatrixHeight>
      </TileMatrix>
"""


def _capabilities(
    endpoint: str,
    layers: tuple[str, ...],
    formats: tuple[str, ...],
    bounds: rasterio.coords.BoundingBox,
    resource_urls: bool,
) -> str:
    to_wgs84 = Transformer.from_crs("EPSG:28992", "EPSG:4326", always_xy=True)
    lon0, lat0 = to_wgs84.transform(bounds.left, bounds.bottom)
    lon1, lat1 = to_wgs84.transform(bounds.right, bounds.top)
    ext = {mime: name for name, mime in _MIME.items()}
    layer_xml = ""
    for layer in layers:
        year = layer.split("_", 1)[0]
        templates = (
            "".join(
                f'      <ResourceURL format="{mime}" resourceType="tile" template="{endpoint}/{layer}/'
                f'{{TileMatrixSet}}/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.{ext[mime]}"/>\n'
                for mime in formats
            )
            if resource_urls
            else ""
        )
        layer_xml += f"""    <Layer>
      <ows:Title>Luchtfoto {escape(year)} Ortho 25cm RGB</ows:Title>
      <ows:Abstract></ows:Abstract>
      <ows:WGS84BoundingBox>
        <ows:LowerCorner>{lon0:.6f} {lat0:.6f}</ows:LowerCorner>
        <ows:UpperCorner>{lon1:.6f} {lat1:.6f}</ows:UpperCorner>
      </ows:WGS84BoundingBox>
      <ows:Identifier>{escape(layer)}</ows:Identifier>
      <Style>
        <ows:Identifier>default</ows:Identifier>
      </Style>
{"".join(f"      <Format>{mime}</Format>" + chr(10) for mime in formats)}      <TileMatrixSetLink>
        <TileMatrixSet>EPSG:28992</TileMatrixSet>
      </TileMatrixSetLink>
      <TileMatrixSetLink>
        <TileMatrixSet>EPSG:3857</TileMatrixSet>
      </TileMatrixSetLink>
{templates}    </Layer>
"""
    rd = "".join(
        _matrix(f"{z:02d}", _rd_scale(z), "-285401.92 903401.92", 2**z) for z in range(RD_LEVELS)
    )
    mercator = "".join(
        _matrix(
            f"{z:02d}", 559082264.0287178 / 2**z, "-20037508.342789244 20037508.342789244", 2**z
        )
        for z in range(WEB_MERCATOR_LEVELS)
    )
    operations = "".join(
        f"""    <ows:Operation name="{name}">
      <ows:DCP>
        <ows:HTTP>
          <ows:Get xlink:href="{endpoint}?">
            <ows:Constraint name="GetEncoding">
              <ows:AllowedValues>
                <ows:Value>KVP</ows:Value>
              </ows:AllowedValues>
            </ows:Constraint>
          </ows:Get>
        </ows:HTTP>
      </ows:DCP>
    </ows:Operation>
"""
        for name in ("GetCapabilities", "GetTile", "GetFeatureInfo")
    )
    return f"""<?xml version="1.0"?>
<Capabilities xmlns="http://www.opengis.net/wmts/1.0" xmlns:ows="http://www.opengis.net/ows/1.1" xmlns:xlink="http://www.w3.org/1999/xlink" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:gml="http://www.opengis.net/gml" xsi:schemaLocation="http://www.opengis.net/wmts/1.0 http://schemas.opengis.net/wmts/1.0/wmtsGetCapabilities_response.xsd" version="1.0.0">
  <ows:ServiceIdentification>
    <ows:Title>Luchtfoto Beeldmateriaal / PDOK 25 centimeter Actueel RGB</ows:Title>
    <ows:Abstract>De landsdekkende luchtfoto van Nederland (fake, served from a demo data root).</ows:Abstract>
    <ows:ServiceType>OGC WMTS</ows:ServiceType>
    <ows:ServiceTypeVersion>1.0.0</ows:ServiceTypeVersion>
    <ows:Fees>none</ows:Fees>
    <ows:AccessConstraints>none</ows:AccessConstraints>
  </ows:ServiceIdentification>
  <ows:OperationsMetadata>
{operations}  </ows:OperationsMetadata>
  <Contents>
{layer_xml}    <TileMatrixSet>
      <ows:Identifier>EPSG:28992</ows:Identifier>
      <ows:SupportedCRS>EPSG:28992</ows:SupportedCRS>
{rd}    </TileMatrixSet>
    <TileMatrixSet>
      <ows:Identifier>EPSG:3857</ows:Identifier>
      <ows:SupportedCRS>EPSG:3857</ows:SupportedCRS>
{mercator}    </TileMatrixSet>
  </Contents>
</Capabilities>
"""
