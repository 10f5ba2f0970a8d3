"""A loopback PDOK Bestuurlijke Gebieden OGC API serving the demo city as a municipality.

``/kadaster/bestuurlijkegebieden/ogc/v1/collections/gemeentegebied/items`` answers like PDOK:
a GeoJSON FeatureCollection with ``numberReturned``, ``timeStamp`` and ``links`` (``self``,
``next`` with a ``cursor`` parameter), features with ``id`` and the properties ``code``,
``identificatie``, ``naam``, ``ligt_in_provincie_code``, ``ligt_in_provincie_naam``. It filters
on property parameters, exact (``naam=...`` for a municipality, ``ligt_in_provincie_naam=...``
for every municipality of a province), pages with ``limit``/``cursor``, and answers in RD New
when asked with ``crs=...EPSG/0/28992`` (``Content-Crs`` header), else in CRS84.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import shapely
from pyproj import Transformer
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from core.dataroot import DataRoot
from core.grid import RD_NEW, cell_polygons, read_grid

API_PATH = "/kadaster/bestuurlijkegebieden/ogc/v1"
RD_URI = "http://www.opengis.net/def/crs/EPSG/0/28992"
CRS84_URI = "http://www.opengis.net/def/crs/OGC/1.3/CRS84"
_PROPERTIES = ("code", "identificatie", "naam", "ligt_in_provincie_code", "ligt_in_provincie_naam")
#: The provinces' codes as the service writes them.
PROVINCE_CODES = {
    "Groningen": "PV20",
    "Fryslân": "PV21",
    "Drenthe": "PV22",
    "Overijssel": "PV23",
    "Flevoland": "PV24",
    "Gelderland": "PV25",
    "Utrecht": "PV26",
    "Noord-Holland": "PV27",
    "Zuid-Holland": "PV28",
    "Zeeland": "PV29",
    "Noord-Brabant": "PV30",
    "Limburg": "PV31",
}


def demo_outline(root: str | Path | DataRoot) -> shapely.Geometry:
    """The demo root's extent: the union of its grid cells, in EPSG:28992."""
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    return shapely.union_all(cell_polygons(read_grid(root.grid)["cell_id"].to_numpy()))


def municipality(name: str, code: str, province: str, outline: shapely.Geometry) -> dict:
    """One ``gemeentegebied`` record (properties + RD outline) for :func:`install_pdok_boundaries`."""
    return {
        "code": code,
        "identificatie": f"GM{code}",
        "naam": name,
        "ligt_in_provincie_code": PROVINCE_CODES[province],
        "ligt_in_provincie_naam": province,
        "geometry": shapely.MultiPolygon(getattr(outline, "geoms", [outline])),
    }


def install_pdok_boundaries(
    server: HTTPServer,
    root: str | Path | DataRoot,
    name: str = "Amsterdam",
    extra: list[dict] = (),
    path: str = API_PATH,
    filters: bool = True,
) -> str:
    """Serve the demo root's extent as municipality ``name`` (code 0363), beside a neighbour.

    Args:
        server: the pytest-httpserver server.
        root: a demo data root (its grid's extent is the outline).
        name: the municipality's ``naam``.
        extra: more records made by :func:`municipality`.
        path: the landing page path.
        filters: honour property filters and ``crs``; False answers everything in CRS84.

    Returns:
        The OGC API landing page URL to pass as ``endpoint=``.
    """
    outline = demo_outline(root)
    minx, miny, maxx, maxy = outline.bounds
    records = [
        municipality(name, "0363", "Noord-Holland", outline),
        municipality(
            "Amstelveen", "0362", "Noord-Holland", shapely.box(minx, miny - 3000, maxx, miny)
        ),
        *extra,
    ]
    to_lonlat = Transformer.from_crs(RD_NEW, "OGC:CRS84", always_xy=True)

    def feature(index: int, record: dict, rd: bool) -> dict:
        shape = record["geometry"]
        if not rd:
            shape = shapely.transform(
                shape, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1]))
            )
        return {
            "type": "Feature",
            "id": str(index + 1),
            "properties": {k: record[k] for k in _PROPERTIES},
            "geometry": shapely.geometry.mapping(shape),
        }

    def handler(request: Request) -> Response:
        args = (
            request.args
            if filters
            else {k: v for k, v in request.args.items() if k in ("f", "limit", "cursor")}
        )
        rd = args.get("crs") == RD_URI
        if args.get("crs") not in (None, RD_URI, CRS84_URI):
            return Response(
                json.dumps({"title": "Bad Request", "status": 400, "detail": "unsupported crs"}),
                status=400,
                content_type="application/problem+json",
            )
        matching = [
            (i, r)
            for i, r in enumerate(records)
            if all(r[k] == args[k] for k in _PROPERTIES if k in args)
        ]
        limit, cursor = int(args.get("limit", 10)), int(args.get("cursor", 0))
        page = matching[cursor : cursor + limit]
        base = server.url_for(items)
        links = [
            {"rel": "self", "type": "application/geo+json", "href": f"{base}?{urlencode(args)}"}
        ]
        if cursor + limit < len(matching):
            links.append(
                {
                    "rel": "next",
                    "type": "application/geo+json",
                    "href": f"{base}?{urlencode({**args, 'cursor': cursor + limit})}",
                }
            )
        body = {
            "type": "FeatureCollection",
            "timeStamp": "2024-06-01T12:00:00Z",
            "links": links,
            "numberReturned": len(page),
            "features": [feature(i, r, rd) for i, r in page],
        }
        return Response(
            json.dumps(body),
            content_type="application/geo+json",
            headers={"Content-Crs": f"<{RD_URI if rd else CRS84_URI}>"},
        )

    items = f"{path}/collections/gemeentegebied/items"
    server.expect_request(items).respond_with_handler(handler)
    return server.url_for(path)
