"""OpenStreetMap street graph and water/park polygons, through Overpass or a local .osm / .pbf file.

Overpass is queried with the shared polite :class:`~core.sources.http.HttpClient` (rate limit,
retries on 429/5xx with ``Retry-After``) rather than osmnx's own requests (which sleep 55 s on
a 429, do not retry a 5xx and patch ``socket.getaddrinfo``): one
``GET {endpoint}/interpreter?data=`` per layer, bbox-filtered, ``[out:json]``. The answer is
kept as OSM XML under ``cache/osm/`` (a rerun reuses it) and read with osmnx's public ``graph_from_xml`` /
``features_from_xml``, the same path a user's own ``.osm`` file takes (a ``.pbf`` extract is
cut to the area with pyosmium first); osmnx itself never makes a request, so its cache is not
used.

Outputs, in the layout the demo writes:

- ``graph/streets.gpkg``: layers ``nodes`` and ``edges`` as ``osmnx.save_graph_geopackage``
  writes them, projected to EPSG:28992 (``length`` in metres along the street), which
  :func:`core.ugdata.read_streets` reads;
- ``context/water.gpkg`` and ``context/parks.gpkg``: polygons with a ``kind`` column
  (``water`` / ``park``) in EPSG:28992, parks without their water.

OSM data is (c) OpenStreetMap contributors, ODbL.
"""

from __future__ import annotations

import json
import logging
import math
import xml.etree.ElementTree as ET
from os import PathLike
from pathlib import Path
from typing import Any

import geopandas as gpd
import networkx as nx
import numpy as np
import osmnx as ox
import shapely
from osmnx._errors import InsufficientResponseError  # osmnx 2 exposes its errors only here
from pyproj import Transformer
from shapely.geometry.base import BaseGeometry

from core.dataroot import DataRoot
from core.grid import RD_NEW
from core.io import write_atomic
from core.sources.http import Estimate, FetchError, HttpClient, Politeness

log = logging.getLogger(__name__)

OVERPASS_URL = "https://overpass-api.de/api"
#: overpass-api.de asks for at most ~10,000 queries and ~1 GB a day per user and gives an IP
#: two slots: one request at a time, unhurried, with time for a city-sized query.
OSM_POLITENESS = Politeness(
    requests_per_second=0.5, concurrency=1, timeout_s=330.0, max_backoff_s=300.0
)
#: Server-side time limit of a query, seconds (Overpass's default is 180).
QUERY_TIMEOUT_S = 300
#: Margin around the boundary, metres: streets and water just outside still matter at the edge.
MARGIN_M = 100.0

#: Highway values that are not streets one can stand in (osmnx's "all" network excludes them).
EXCLUDED_HIGHWAYS = (
    "abandoned",
    "construction",
    "no",
    "planned",
    "platform",
    "proposed",
    "raceway",
    "razed",
    "bus_stop",
    "elevator",
    "rest_area",
    "services",
)
WATER_TAGS: dict[str, list[str]] = {
    "natural": ["water"],
    "waterway": ["riverbank"],
    "landuse": ["reservoir", "basin"],
}
PARK_TAGS: dict[str, list[str]] = {
    "leisure": ["park", "garden", "nature_reserve"],
    "landuse": ["grass", "forest", "recreation_ground", "meadow", "village_green"],
    "natural": ["wood"],
}
#: Rough Overpass JSON sizes per km2 of a Dutch city, for the plan.
STREET_BYTES_PER_KM2 = 400_000
CONTEXT_BYTES_PER_KM2 = 150_000

#: WGS84 (min lon, min lat, max lon, max lat).
BBox = tuple[float, float, float, float]
_TO_LONLAT = Transformer.from_crs(RD_NEW, "EPSG:4326", always_xy=True)


# --- queries ---------------------------------------------------------------------------------


def _area(boundary: BaseGeometry, margin_m: float) -> tuple[BaseGeometry, BBox]:
    """The boundary grown by ``margin_m`` (RD) and the WGS84 box around it."""
    if max(abs(v) for v in boundary.bounds) <= 180:
        raise ValueError(f"boundary {boundary.bounds} looks like lon/lat; give EPSG:28992 metres")
    area = shapely.make_valid(boundary).buffer(margin_m)
    return area, tuple(_TO_LONLAT.transform_bounds(*area.bounds))


def _overpass_bbox(bbox_wgs84: BBox) -> str:
    """An Overpass QL bbox filter ``[bbox:south,west,north,east]``."""
    west, south, east, north = bbox_wgs84
    return f"[bbox:{south:.6f},{west:.6f},{north:.6f},{east:.6f}]"


def streets_query(bbox_wgs84: BBox) -> str:
    """Overpass QL for the street ways in a WGS84 box (min lon, min lat, max lon, max lat) and
    their nodes."""
    excluded = "|".join(EXCLUDED_HIGHWAYS)
    return (
        f"[out:json][timeout:{QUERY_TIMEOUT_S}]{_overpass_bbox(bbox_wgs84)};"
        f'(way["highway"]["area"!~"yes"]["highway"!~"^({excluded})$"];>;);out;'
    )


def context_query(bbox_wgs84: BBox) -> str:
    """Overpass QL for water and park areas (ways and multipolygons) and their members, in a
    WGS84 box (min lon, min lat, max lon, max lat)."""
    parts = [
        f'{kind}["{key}"="{value}"];'
        for tags in (WATER_TAGS, PARK_TAGS)
        for key, values in tags.items()
        for value in values
        for kind in ("way", "relation")
    ]
    return (
        f"[out:json][timeout:{QUERY_TIMEOUT_S}]{_overpass_bbox(bbox_wgs84)};"
        f"({''.join(parts)});(._;>;);out;"
    )


def overpass_to_osm_xml(answer: dict[str, Any]) -> bytes:
    """An Overpass JSON answer as OSM XML (the format osmnx's public readers take)."""
    root = ET.Element("osm", version="0.6", generator=str(answer.get("generator", "Overpass API")))
    for element in answer["elements"]:
        kind = element.get("type")
        if kind not in ("node", "way", "relation"):
            continue
        attrs = {"id": str(element["id"])}
        if kind == "node":
            attrs.update(lat=repr(float(element["lat"])), lon=repr(float(element["lon"])))
        node = ET.SubElement(root, kind, attrs)
        for ref in element.get("nodes", ()):
            ET.SubElement(node, "nd", ref=str(ref))
        for member in element.get("members", ()):
            ET.SubElement(
                node,
                "member",
                type=member["type"],
                ref=str(member["ref"]),
                role=member.get("role", ""),
            )
        for key, value in (element.get("tags") or {}).items():
            ET.SubElement(node, "tag", k=key, v=str(value))
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def fetch_overpass(
    query: str,
    dest: str | PathLike,
    client: HttpClient | None = None,
    endpoint: str = OVERPASS_URL,
    refresh: bool = False,
) -> Path:
    """Run an Overpass query and keep the answer as OSM XML at ``dest`` (reused if present).

    ``endpoint`` is the API base URL; the query goes to ``{endpoint}/interpreter``.

    Raises:
        FetchError: naming the URL, for HTTP failures, answers that are not Overpass JSON, and
            the errors Overpass reports inside a 200 answer (``remark``: timeouts, memory).
    """
    dest = Path(dest)
    if dest.is_file() and not refresh:
        return dest
    client = client or HttpClient(OSM_POLITENESS)
    interpreter = f"{endpoint.rstrip('/')}/interpreter"
    answer = client.get_json(interpreter, {"data": query})
    if not isinstance(answer, dict) or not isinstance(answer.get("elements"), list):
        raise FetchError(f"{interpreter}: not an Overpass JSON answer: {json.dumps(answer)[:200]}")
    remark = str(answer.get("remark", ""))
    if "error" in remark.lower():
        raise FetchError(
            f"{interpreter}: Overpass reports {remark!r}; a smaller area or a later try may succeed"
        )
    log.info("%s: %d OSM elements", interpreter, len(answer["elements"]))
    xml = overpass_to_osm_xml(answer)
    return write_atomic(dest, lambda tmp: tmp.write_bytes(xml))


def _check_osm_file(path: str | PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: OSM file not found")
    if not any(s.lower() in (".osm", ".xml", ".pbf") for s in path.suffixes):
        raise ValueError(f"{path}: expected OSM XML (.osm, .osm.bz2, .osm.gz) or PBF (.osm.pbf)")
    return path


def pbf_to_osm_xml(
    pbf: str | PathLike,
    dest: str | PathLike,
    bbox_wgs84: BBox | None = None,
) -> Path:
    """Cut an OSM PBF extract to a lon/lat box and write it as OSM XML (pyosmium), atomically.

    A way is kept when one of its nodes lies in the box, a multipolygon relation when one of
    its member ways is kept; the writer adds every node and member way they reference, so
    streets and areas crossing the box edge keep their whole geometry.

    Args:
        pbf: the extract (e.g. a Geofabrik province file).
        dest: the ``.osm`` file to write.
        bbox_wgs84: ``(min lon, min lat, max lon, max lat)``; None keeps everything.

    Raises:
        ValueError: naming the file, when pyosmium cannot read it.
    """
    import osmium

    pbf, dest = Path(pbf), Path(dest)
    west, south, east, north = bbox_wgs84 or (-180.0, -90.0, 180.0, 90.0)

    def inside(location: Any) -> bool:
        return location.valid() and west <= location.lon <= east and south <= location.lat <= north

    def write(tmp: Path) -> None:
        kept: set[int] = set()
        with osmium.BackReferenceWriter(str(tmp), ref_src=str(pbf), overwrite=True) as writer:
            for way in osmium.FileProcessor(
                str(pbf), osmium.osm.NODE | osmium.osm.WAY
            ).with_locations():
                if way.is_way() and any(inside(node.location) for node in way.nodes):
                    writer.add_way(way)
                    kept.add(way.id)
            for relation in osmium.FileProcessor(str(pbf), osmium.osm.RELATION):
                if relation.tags.get("type") == "multipolygon" and any(
                    member.type == "w" and member.ref in kept for member in relation.members
                ):
                    writer.add_relation(relation)

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return write_atomic(dest, write)
    except RuntimeError as exc:  # pyosmium reports unreadable input as RuntimeError
        raise ValueError(f"{pbf}: not a readable OSM PBF file ({exc})") from exc


def _as_osm_xml(path: Path, root: DataRoot, area: BaseGeometry | None) -> Path:
    """``path`` itself for OSM XML; a PBF extract is first cut to ``area`` (RD; None: all of it)
    and cached as OSM XML under ``cache/osm/``."""
    if path.suffix.lower() != ".pbf":
        return path
    bbox_wgs84 = None if area is None else tuple(_TO_LONLAT.transform_bounds(*area.bounds))
    stem = path.name.removesuffix(".pbf").removesuffix(".osm")
    box = "" if bbox_wgs84 is None else "-" + "_".join(f"{v:.4f}" for v in bbox_wgs84)
    dest = root.cache / "osm" / f"{stem}{box}.osm"
    return dest if dest.is_file() else pbf_to_osm_xml(path, dest, bbox_wgs84)


def _lonlat(geometry: BaseGeometry) -> BaseGeometry:
    return shapely.transform(
        geometry, lambda xy: np.column_stack(_TO_LONLAT.transform(xy[:, 0], xy[:, 1]))
    )


# --- streets ---------------------------------------------------------------------------------


def read_osm_streets(
    path: str | PathLike,
    boundary: BaseGeometry | None = None,
    margin_m: float = MARGIN_M,
    simplify: bool = True,
    retain_all: bool = True,
) -> nx.MultiDiGraph:
    """The street graph of an OSM XML file (osmnx, lon/lat), optionally cut to a boundary.

    Ways without a street ``highway`` tag (buildings, land use in a full extract) are dropped.

    Args:
        path: OSM XML (.osm, .osm.bz2, .osm.gz); :func:`import_streets` converts PBF first.
        boundary: keep edges with a node within ``margin_m`` of this EPSG:28992 polygon.
        margin_m: the margin around ``boundary``.
        simplify: merge chains of degree-2 nodes into one edge (osmnx's simplification).
        retain_all: keep every connected component, not only the largest.

    Raises:
        ValueError: naming the file, for a wrong format or when no street is left.
    """
    path = _check_osm_file(path)
    try:
        graph = ox.graph_from_xml(path, simplify=False, retain_all=True)
    except InsufficientResponseError:  # osmnx: the file holds no element at all
        graph = nx.MultiDiGraph()
    except Exception as exc:  # osmnx and the XML parser raise many types for a bad file
        raise ValueError(f"{path}: not a readable OSM XML street file ({exc})") from exc
    graph.remove_edges_from(
        [
            (u, v, k)
            for u, v, k, highway in graph.edges(keys=True, data="highway")
            if highway in (None, *EXCLUDED_HIGHWAYS)
        ]
    )
    graph.remove_nodes_from(list(nx.isolates(graph)))
    if boundary is not None and len(graph):
        area, _ = _area(boundary, margin_m)
        try:
            graph = ox.truncate.truncate_graph_polygon(graph, _lonlat(area), truncate_by_edge=True)
        except ValueError:  # osmnx: "found no graph nodes within the requested polygon"
            graph = nx.MultiDiGraph(graph.graph)
    if not len(graph):
        raise ValueError(
            f"{path}: no streets"
            + ("" if boundary is None else f" within {margin_m:.0f} m of the boundary")
        )
    if not retain_all:
        graph = ox.truncate.largest_component(graph)
    return ox.simplify_graph(graph) if simplify else graph


def write_streets(graph: nx.MultiDiGraph, path: str | PathLike) -> Path:
    """Write an osmnx graph as ``nodes``/``edges`` GeoPackage layers in EPSG:28992, atomically."""
    projected = ox.project_graph(graph, to_crs=RD_NEW)
    return write_atomic(path, lambda tmp: ox.save_graph_geopackage(projected, tmp))


def fetch_streets(
    root: DataRoot | str | PathLike,
    boundary: BaseGeometry,
    client: HttpClient | None = None,
    endpoint: str = OVERPASS_URL,
    margin_m: float = MARGIN_M,
    simplify: bool = True,
    refresh: bool = False,
) -> Path:
    """Fetch the streets around ``boundary`` (EPSG:28992) into ``graph/streets.gpkg``.

    The raw answer is kept as ``cache/osm/streets.osm``; a rerun reads it without a request
    unless ``refresh``.
    """
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    _, bbox_wgs84 = _area(boundary, margin_m)
    raw = fetch_overpass(
        streets_query(bbox_wgs84), root.cache / "osm" / "streets.osm", client, endpoint, refresh
    )
    return import_streets(root, raw, boundary, margin_m, simplify)


def import_streets(
    root: DataRoot | str | PathLike,
    osm_file: str | PathLike,
    boundary: BaseGeometry | None = None,
    margin_m: float = MARGIN_M,
    simplify: bool = True,
) -> Path:
    """Read a local OSM XML or PBF file's streets (see :func:`read_osm_streets`) into
    ``graph/streets.gpkg``; a PBF extract is cut to the boundary first (cached as OSM XML)."""
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    area = None if boundary is None else _area(boundary, margin_m)[0]
    path = _as_osm_xml(_check_osm_file(osm_file), root, area)
    graph = read_osm_streets(path, boundary, margin_m, simplify)
    log.info("%s: %d street nodes, %d edges", osm_file, len(graph), graph.number_of_edges())
    return write_streets(graph, root.streets)


# --- water and parks -------------------------------------------------------------------------


def _polygons(path: Path, tags: dict[str, list[str]], area: BaseGeometry) -> BaseGeometry:
    """The union of the tagged areas of an OSM file, in RD, cut to ``area``."""
    try:
        features = ox.features_from_xml(path, polygon=_lonlat(area), tags=tags)
    except InsufficientResponseError:  # osmnx: no feature matched
        return shapely.Polygon()
    except Exception as exc:  # osmnx and the XML parser raise many types for a bad file
        raise ValueError(f"{path}: not a readable OSM XML file ({exc})") from exc
    shapes = features.geometry.to_crs(RD_NEW)
    shapes = shapes[shapes.geom_type.isin(["Polygon", "MultiPolygon"])]
    return shapely.intersection(shapely.union_all(shapely.make_valid(shapes.to_numpy())), area)


def _write_polygons(geometry: BaseGeometry, kind: str, path: Path) -> Path:
    parts = [
        g
        for g in getattr(geometry, "geoms", [geometry])
        if g.geom_type == "Polygon" and not g.is_empty
    ]
    frame = gpd.GeoDataFrame({"kind": [kind] * len(parts)}, geometry=parts, crs=RD_NEW)
    return write_atomic(
        path, lambda tmp: frame.to_file(tmp, layer=path.stem, geometry_type="Polygon")
    )


def import_context(
    root: DataRoot | str | PathLike,
    osm_file: str | PathLike,
    boundary: BaseGeometry,
    margin_m: float = MARGIN_M,
) -> tuple[Path, Path]:
    """Water and park polygons of an OSM XML file into ``context/water.gpkg`` and
    ``context/parks.gpkg`` (parks without their water), cut to the boundary's box.

    Args:
        root: the data root.
        osm_file: OSM XML (.osm, .osm.bz2, .osm.gz) or a PBF extract (cut to the box first).
        boundary: the EPSG:28992 polygon; polygons are cut to its bounding box plus
            ``margin_m``, like the demo cuts them to its extent.
        margin_m: the margin around the boundary's box.
    """
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    area, _ = _area(shapely.box(*boundary.bounds), margin_m)
    area = shapely.box(*area.bounds)
    path = _as_osm_xml(_check_osm_file(osm_file), root, area)
    water = _polygons(path, WATER_TAGS, area)
    parks = shapely.difference(_polygons(path, PARK_TAGS, area), water)
    log.info("%s: water %.2f km2, parks %.2f km2", path, water.area / 1e6, parks.area / 1e6)
    return (_write_polygons(water, "water", root.water), _write_polygons(parks, "park", root.parks))


def fetch_context(
    root: DataRoot | str | PathLike,
    boundary: BaseGeometry,
    client: HttpClient | None = None,
    endpoint: str = OVERPASS_URL,
    margin_m: float = MARGIN_M,
    refresh: bool = False,
) -> tuple[Path, Path]:
    """Fetch water and park polygons around ``boundary`` (EPSG:28992) into ``context/``;
    the raw answer is kept as ``cache/osm/context.osm``."""
    root = root if isinstance(root, DataRoot) else DataRoot(root)
    _, bbox_wgs84 = _area(shapely.box(*boundary.bounds), margin_m)
    raw = fetch_overpass(
        context_query(bbox_wgs84), root.cache / "osm" / "context.osm", client, endpoint, refresh
    )
    return import_context(root, raw, boundary, margin_m)


def estimate_osm(
    boundary: BaseGeometry,
    margin_m: float = MARGIN_M,
    requests_per_second: float = OSM_POLITENESS.requests_per_second,
) -> Estimate:
    """Two Overpass requests (streets, water and parks); bytes from the bbox area."""
    area, _ = _area(shapely.box(*boundary.bounds), margin_m)
    km2 = area.area / 1e6
    return Estimate(
        "OpenStreetMap (Overpass)",
        2,
        math.ceil(km2 * (STREET_BYTES_PER_KM2 + CONTEXT_BYTES_PER_KM2)),
        requests_per_second,
        "ODbL (c) OpenStreetMap contributors; overpass-api.de allows ~10k "
        "queries/day; point endpoint= at your own Overpass for large areas",
    )
