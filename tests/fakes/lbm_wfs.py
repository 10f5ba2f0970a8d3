"""A loopback Leefbaarometer WFS (GeoServer) serving a demo root's labels.

It answers ``GetFeature`` on ``lbm3:clippedgridscore{YY}`` like geo.leefbaarometer.nl does:
GeoServer GeoJSON (``numberMatched``/``numberReturned``/``totalFeatures``, ``crs``, feature ids
``layer.n``, MultiPolygon geometry in EPSG:28992) with the squares clipped to a "built-up
area", ``count``/``startIndex`` paging, ``resultType=hits`` as a WFS 2.0 XML
FeatureCollection, and an OWS ExceptionReport (HTTP 400) for an unknown type name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import shapely
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from core.dataroot import DataRoot
from core.grid import cell_index, cell_origin
from core.sources.lbm import DIMENSIONS, SCORE_COLUMNS, read_lbm

WFS_PATH = "/lbm3/ows"
_TIMESTAMP = "2024-06-01T12:00:00.000Z"


def clipped_squares(cell_ids: np.ndarray) -> np.ndarray:
    """The demo cells clipped as the WFS clips them: a third keep the full square, a third
    lose their upper-right quarter, a third keep only a 100 x 55 m strip."""
    x0, y0 = cell_origin(cell_ids)
    ix, iy = cell_index(cell_ids)
    full = shapely.box(x0, y0, x0 + 100, y0 + 100)
    notch = shapely.difference(full, shapely.box(x0 + 60, y0 + 60, x0 + 100, y0 + 100))
    strip = shapely.box(x0, y0, x0 + 100, y0 + 55)
    kind = (ix + iy) % 3
    return np.where(kind == 0, full, np.where(kind == 1, notch, strip))


def _feature_properties(row: dict) -> dict:
    props = {"id": int(row["grid_id"]) if str(row["grid_id"]).isdigit() else row["grid_id"]}
    props.update({c: round(float(row[c]), 4) for c in SCORE_COLUMNS})
    props["kscore"] = int(row["lbm_class"])
    for dim in DIMENSIONS:  # classes of the dimensions: bands of 0.1 around zero
        props[f"k{dim}"] = int(np.clip(np.floor(row[dim] / 0.1 + 0.5) + 5, 1, 9))
    return props


def _layers(root: DataRoot) -> dict[str, list[dict]]:
    """GeoJSON features per type name, sorted by grid id (GeoServer's natural order)."""
    labels = read_lbm(root.scores, root.lbm_grid)
    layers = {}
    for year, table in labels.groupby("jaar"):
        name = f"clippedgridscore{int(year) % 100:02d}"
        shapes = clipped_squares(table["cell_id"].to_numpy())
        features = []
        for n, (row, shape) in enumerate(zip(table.to_dict("records"), shapes, strict=True)):
            features.append(
                {
                    "type": "Feature",
                    "id": f"{name}.{n + 1}",
                    "geometry": shapely.geometry.mapping(shapely.MultiPolygon([shape])),
                    "geometry_name": "geom",
                    "properties": _feature_properties(row),
                }
            )
        layers[f"lbm3:{name}"] = features
    return layers


def _exception(code: str, locator: str, text: str) -> Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?><ows:ExceptionReport version="2.0.0" '
        'xmlns:ows="http://www.opengis.net/ows/1.1"><ows:Exception exceptionCode="'
        f'{code}" locator="{locator}"><ows:ExceptionText>{text}</ows:ExceptionText>'
        "</ows:Exception></ows:ExceptionReport>"
    )
    return Response(body, status=400, content_type="application/xml")


def _collection_xml(matched: int, returned: int) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?><wfs:FeatureCollection '
        'xmlns:wfs="http://www.opengis.net/wfs/2.0" xmlns:gml="http://www.opengis.net/gml/3.2" '
        f'numberMatched="{matched}" numberReturned="{returned}" timeStamp="{_TIMESTAMP}"/>'
    )


def _in_bbox(features: list[dict], bbox: str | None) -> list[dict]:
    if not bbox:
        return features
    minx, miny, maxx, maxy = (float(v) for v in bbox.split(",")[:4])
    box = shapely.box(minx, miny, maxx, maxy)
    return [f for f in features if shapely.intersects(shapely.geometry.shape(f["geometry"]), box)]


def install_lbm_wfs(
    server: HTTPServer,
    root: str | Path | DataRoot,
    path: str = WFS_PATH,
    max_count: int = 1_000_000,
) -> str:
    """Serve the demo root's labels as the Leefbaarometer WFS at ``path``.

    Args:
        server: the pytest-httpserver server.
        root: a demo data root (its ``labels/`` files are served).
        path: the endpoint path.
        max_count: the server's page cap (GeoServer's maxFeatures), below a client's count.

    Returns:
        The endpoint URL to pass as ``endpoint=``.
    """
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    layers = _layers(root)

    def handler(request: Request) -> Response:
        args = {k.lower(): v for k, v in request.args.items()}  # KVP keys are case-insensitive
        if args.get("service", "").upper() != "WFS" or args.get("request") != "GetFeature":
            return _exception("OperationNotSupported", "request", "only WFS GetFeature here")
        layer = args.get("typenames") or args.get("typename") or ""
        if layer not in layers:
            return _exception("InvalidParameterValue", "typeName", f"Feature type {layer} unknown")
        features = _in_bbox(layers[layer], args.get("bbox"))
        if args.get("resulttype") == "hits":
            return Response(_collection_xml(len(features), 0), content_type="text/xml")
        start = int(args.get("startindex", 0))
        page = features[start : start + min(int(args.get("count", max_count)), max_count)]
        if args.get("outputformat", "").lower() not in ("application/json", "json"):
            return Response(
                _collection_xml(len(features), len(page)),
                content_type="application/gml+xml; version=3.2",
            )
        body = {
            "type": "FeatureCollection",
            "features": page,
            "totalFeatures": len(features),
            "numberMatched": len(features),
            "numberReturned": len(page),
            "timeStamp": _TIMESTAMP,
            "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::28992"}},
        }
        return Response(json.dumps(body), content_type="application/json;charset=UTF-8")

    server.expect_request(path).respond_with_handler(handler)
    return server.url_for(path)
