"""A loopback Overpass API serving a demo root's streets, water and parks as OSM elements.

``/api/interpreter`` takes ``data=<Overpass QL>`` (GET or POST form) and answers ``[out:json]``
like overpass-api.de: ``version``, ``generator``, ``osm3s`` and ``elements`` (nodes with
``lat``/``lon``, ways with ``nodes``, multipolygon relations with ``members``, each with
``tags``). A query mentioning ``highway`` gets the demo street graph (one
``highway=residential`` way per edge, nodes keep the demo ``osmid``); one mentioning
``natural``/``leisure`` gets ``context/water.gpkg`` as ``natural=water`` and
``context/parks.gpkg`` as ``leisure=park`` areas. Only elements touching the query's global
``[bbox:south,west,north,east]`` are served, with all their nodes (``>``). Anything else is a
400 with Overpass's HTML error page.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
from pyproj import Transformer
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from core.dataroot import DataRoot
from core.grid import RD_NEW

INTERPRETER_PATH = "/api/interpreter"
_BBOX = re.compile(r"\[bbox:(-?[\d.]+),(-?[\d.]+),(-?[\d.]+),(-?[\d.]+)\]")
_HEAD = {
    "version": 0.6,
    "generator": "Overpass API 0.7.62.1 084b4234",
    "osm3s": {
        "timestamp_osm_base": "2024-06-01T12:00:00Z",
        "copyright": "The data included in this document is from "
        "www.openstreetmap.org. The data is made available under ODbL.",
    },
}
#: Id ranges of the context layers, apart from the demo's street node ids (cell-corner ids).
_CONTEXT_NODE_ID, _CONTEXT_WAY_ID, _RELATION_ID = 9_000_000_000, 8_000_000_000, 7_000_000


def _lonlat(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lon, lat = Transformer.from_crs(RD_NEW, "EPSG:4326", always_xy=True).transform(x, y)
    return np.round(lon, 7), np.round(lat, 7)  # OSM stores 7 decimals


def street_elements(root: DataRoot) -> tuple[dict[int, dict], list[dict]]:
    """The demo street graph as OSM nodes (by id) and ways."""
    nodes = gpd.read_file(root.streets, layer="nodes")
    edges = gpd.read_file(root.streets, layer="edges", ignore_geometry=True)
    lon, lat = _lonlat(nodes.geometry.x.to_numpy(), nodes.geometry.y.to_numpy())
    by_id = {
        int(i): {"type": "node", "id": int(i), "lat": float(la), "lon": float(lo)}
        for i, lo, la in zip(nodes["osmid"], lon, lat, strict=True)
    }
    ways = [
        {"type": "way", "id": n + 1, "nodes": [int(u), int(v)], "tags": {"highway": str(h)}}
        for n, (u, v, h) in enumerate(zip(edges["u"], edges["v"], edges["highway"], strict=True))
    ]
    return by_id, ways


def context_elements(root: DataRoot) -> tuple[dict[int, dict], list[dict], list[dict]]:
    """The demo water and parks as OSM nodes (by id), closed ways and multipolygon relations."""
    node_ids, way_ids, relation_ids = (
        itertools.count(start) for start in (_CONTEXT_NODE_ID, _CONTEXT_WAY_ID, _RELATION_ID)
    )
    nodes: dict[int, dict] = {}
    ways, relations = [], []

    def ring_way(ring: shapely.LinearRing, tags: dict) -> dict:
        xy = np.asarray(ring.coords)[:-1]
        lon, lat = _lonlat(xy[:, 0], xy[:, 1])
        ids = [next(node_ids) for _ in range(len(xy))]
        nodes.update(
            {
                i: {"type": "node", "id": i, "lat": float(la), "lon": float(lo)}
                for i, lo, la in zip(ids, lon, lat, strict=True)
            }
        )
        way = {"type": "way", "id": next(way_ids), "nodes": [*ids, ids[0]], "tags": tags}
        ways.append(way)
        return way

    for path, tags in ((root.water, {"natural": "water"}), (root.parks, {"leisure": "park"})):
        for polygon in gpd.read_file(path).geometry.explode(index_parts=False):
            if not polygon.interiors:
                ring_way(polygon.exterior, tags)
                continue
            members = [
                {"type": "way", "ref": ring_way(ring, {})["id"], "role": role}
                for ring, role in [
                    (polygon.exterior, "outer"),
                    *((r, "inner") for r in polygon.interiors),
                ]
            ]
            relations.append(
                {
                    "type": "relation",
                    "id": next(relation_ids),
                    "members": members,
                    "tags": {"type": "multipolygon", **tags},
                }
            )
    return nodes, ways, relations


def _touching(nodes: dict[int, dict], ways: list[dict], bbox: tuple[float, ...]) -> list[dict]:
    south, west, north, east = bbox
    return [
        w
        for w in ways
        if any(
            south <= nodes[n]["lat"] <= north and west <= nodes[n]["lon"] <= east
            for n in w["nodes"]
        )
    ]


def _bad_request(message: str) -> Response:
    body = (
        "<!DOCTYPE html><html><head><title>OSM3S Response</title></head><body>"
        f'<p><strong style="color:#FF0000">Error</strong>: {message}</p></body></html>'
    )
    return Response(body, status=400, content_type="text/html; charset=utf-8")


def install_overpass(
    server: HTTPServer, root: str | Path | DataRoot, path: str = INTERPRETER_PATH
) -> str:
    """Serve the demo root's streets, water and parks as the Overpass API at ``path``.

    Returns:
        The API base URL (without ``/interpreter``) to pass as ``endpoint=``.
    """
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    street_nodes, street_ways = street_elements(root)
    context_nodes, context_ways, relations = context_elements(root)

    def handler(request: Request) -> Response:
        query = request.values.get("data", "")
        box = _BBOX.search(query)
        if not query.startswith("[out:json]") or box is None:
            return _bad_request("line 1: parse error: this fake answers bbox [out:json] queries")
        bbox = tuple(float(v) for v in box.groups())
        if '"highway"' in query:
            ways = _touching(street_nodes, street_ways, bbox)
            used = sorted({n for w in ways for n in w["nodes"]})
            elements = [street_nodes[n] for n in used] + ways
        elif '"natural"' in query or '"leisure"' in query:
            polygons = _touching(context_nodes, context_ways, bbox)
            inside = {w["id"] for w in polygons}
            kept = [r for r in relations if any(m["ref"] in inside for m in r["members"])]
            member_ids = {m["ref"] for r in kept for m in r["members"]}
            ways = [
                w
                for w in context_ways
                if (w["tags"] and w["id"] in inside) or w["id"] in member_ids
            ]
            used = sorted({n for w in ways for n in w["nodes"]})
            elements = [context_nodes[n] for n in used] + ways + kept
        else:
            elements = []
        return Response(
            json.dumps({**_HEAD, "elements": elements}), content_type="application/json"
        )

    server.expect_request(path).respond_with_handler(handler)
    return server.url_for(path.rsplit("/", 1)[0])
