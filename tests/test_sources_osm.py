"""OSM streets, water and parks from the loopback Overpass and from .osm files, read back."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import osmium
import pytest
import shapely

from core.dataroot import DataRoot
from core.sources.http import FetchError, HttpClient
from core.sources.osm import (
    STREET_BYTES_PER_KM2,
    estimate_osm,
    fetch_context,
    fetch_streets,
    import_context,
    import_streets,
)
from core.ugdata import read_streets
from tests.fakes import FAST, Sleeps
from tests.fakes.overpass import INTERPRETER_PATH, install_overpass

BOUNDARY = shapely.box(121000, 485000, 122500, 486000)


@pytest.fixture
def client() -> HttpClient:
    return HttpClient(FAST, sleep=Sleeps())


def edge_table(graph) -> dict[tuple[str, str], tuple[float, float]]:
    """(lower node id, higher node id) -> (length, bearing from the lower) of a SpatialGraph."""
    table = {}
    for (a, b), length, bearing in zip(graph.edges, graph.length, graph.bearing, strict=True):
        first, second = graph.node_ids[a], graph.node_ids[b]
        if first > second:
            first, second, bearing = second, first, (bearing + 180.0) % 360.0
        table[first, second] = (length, bearing)
    return table


def test_streets_match_the_demo_graph(tiny_demo, httpserver, client, tmp_path):
    url = install_overpass(httpserver, tiny_demo)
    path = fetch_streets(tmp_path, BOUNDARY, client, url, simplify=False)
    assert path == DataRoot(tmp_path).streets
    got, want = read_streets(path), read_streets(DataRoot(tiny_demo).streets)
    assert sorted(got.node_ids) == sorted(want.node_ids)
    order = np.argsort(got.node_ids)
    np.testing.assert_allclose(got.xy[order], want.xy[np.argsort(want.node_ids)], atol=0.05)
    got_edges, want_edges = edge_table(got), edge_table(want)
    assert got_edges.keys() == want_edges.keys()
    lengths = np.array([(got_edges[k][0], want_edges[k][0]) for k in want_edges])
    np.testing.assert_allclose(lengths[:, 0], lengths[:, 1], rtol=0.01)  # great circle vs RD
    bearings = np.array([(got_edges[k][1], want_edges[k][1]) for k in want_edges])
    np.testing.assert_allclose(bearings[:, 0], bearings[:, 1], atol=0.05)
    layers = {
        "nodes": gpd.read_file(path, layer="nodes"),
        "edges": gpd.read_file(path, layer="edges"),
    }
    assert all(layer.crs.to_epsg() == 28992 for layer in layers.values())
    assert {"u", "v", "key", "osmid", "highway", "length"} <= set(layers["edges"].columns)
    query = next(r for r, _ in httpserver.log if r.path == INTERPRETER_PATH).args["data"]
    assert query.startswith("[out:json]") and "[bbox:52.3" in query


def test_simplified_streets_keep_the_network_length(tiny_demo, httpserver, client, tmp_path):
    url = install_overpass(httpserver, tiny_demo)
    path = fetch_streets(tmp_path, BOUNDARY, client, url)
    simple, full = read_streets(path), read_streets(DataRoot(tiny_demo).streets)
    assert len(simple.node_ids) < len(full.node_ids)
    demo_edges = gpd.read_file(DataRoot(tiny_demo).streets, layer="edges")
    # one row per undirected edge, lengths summed along the merged chains
    total = gpd.read_file(path, layer="edges")["length"].sum()
    assert total == pytest.approx(demo_edges["length"].sum(), rel=0.01)
    degree_two = simple.degree == 2
    assert degree_two.mean() < 0.2  # chains collapsed (loops keep one degree-2 node)


def test_a_rerun_reads_the_cached_answer(tiny_demo, httpserver, client, tmp_path):
    url = install_overpass(httpserver, tiny_demo)
    fetch_streets(tmp_path, BOUNDARY, client, url)
    assert (DataRoot(tmp_path).cache / "osm" / "streets.osm").is_file()
    made = client.requests_made
    fetch_streets(tmp_path, BOUNDARY, client, url)
    assert client.requests_made == made


def test_429_with_retry_after_and_5xx_are_retried(tiny_demo, httpserver, tmp_path):
    httpserver.expect_oneshot_request(INTERPRETER_PATH).respond_with_data(
        "rate_limited", status=429, headers={"Retry-After": "11"}
    )
    httpserver.expect_oneshot_request(INTERPRETER_PATH).respond_with_data("", status=504)
    url = install_overpass(httpserver, tiny_demo)
    sleeps = Sleeps()
    fetch_streets(tmp_path, BOUNDARY, HttpClient(FAST, sleep=sleeps), url)
    assert 11.0 in sleeps and len(sleeps) == 2
    assert len(read_streets(DataRoot(tmp_path).streets).node_ids) > 0


def test_overpass_errors_are_clear_and_leave_nothing(httpserver, client, tmp_path):
    httpserver.expect_oneshot_request(INTERPRETER_PATH).respond_with_json(
        {
            "version": 0.6,
            "elements": [],
            "remark": 'runtime error: Query timed out in "query" at line 1 after 301 seconds.',
        }
    )
    httpserver.expect_oneshot_request(INTERPRETER_PATH).respond_with_data(
        "<html>Error: line 1: parse error</html>", content_type="text/html"
    )
    url = httpserver.url_for("/api")
    with pytest.raises(FetchError, match=r"/api/interpreter.*Overpass reports.*timed out"):
        fetch_streets(tmp_path, BOUNDARY, client, url)
    with pytest.raises(FetchError, match=r"/api/interpreter.*not JSON"):
        fetch_streets(tmp_path, BOUNDARY, client, url)
    assert not any(tmp_path.rglob("*.osm")) and not DataRoot(tmp_path).streets.exists()


def test_an_area_without_streets_is_an_error(tiny_demo, httpserver, client, tmp_path):
    url = install_overpass(httpserver, tiny_demo)
    with pytest.raises(ValueError, match="no streets"):
        fetch_streets(tmp_path, shapely.box(150000, 450000, 150500, 450500), client, url)
    with pytest.raises(ValueError, match="lon/lat"):
        fetch_streets(tmp_path, shapely.box(4.8, 52.3, 4.9, 52.4), client, url)


def test_water_and_parks_in_the_demo_layout(tiny_demo, httpserver, client, tmp_path):
    url = install_overpass(httpserver, tiny_demo)
    water, parks = fetch_context(tmp_path, BOUNDARY, client, url)
    assert (water, parks) == (DataRoot(tmp_path).water, DataRoot(tmp_path).parks)
    demo = DataRoot(tiny_demo)
    area = shapely.box(*BOUNDARY.buffer(100).bounds)
    for got_path, want_path, kind in ((water, demo.water, "water"), (parks, demo.parks, "park")):
        got, want = gpd.read_file(got_path), gpd.read_file(want_path)
        assert list(got.columns) == list(want.columns) == ["kind", "geometry"]
        assert set(got["kind"]) == {kind} and got.crs.to_epsg() == 28992
        expected = shapely.intersection(shapely.union_all(want.geometry.to_numpy()), area)
        assert (
            shapely.union_all(got.geometry.to_numpy()).symmetric_difference(expected).area
            < 1e-4 * expected.area
        )
    assert (
        not shapely.union_all(gpd.read_file(parks).geometry.to_numpy())
        .intersection(shapely.union_all(gpd.read_file(water).geometry.to_numpy()))
        .area
        > 1.0
    )


def test_local_osm_files_and_pbf(tiny_demo, httpserver, client, tmp_path):
    url = install_overpass(httpserver, tiny_demo)
    fetched = tmp_path / "fetched"
    fetch_streets(fetched, BOUNDARY, client, url)
    fetch_context(fetched, BOUNDARY, client, url)
    osm = DataRoot(fetched).cache / "osm"
    local = tmp_path / "local"
    import_streets(local, osm / "streets.osm", BOUNDARY)
    import_context(local, osm / "context.osm", BOUNDARY)
    assert len(read_streets(DataRoot(local).streets).node_ids) == len(
        read_streets(DataRoot(fetched).streets).node_ids
    )
    assert len(gpd.read_file(DataRoot(local).parks)) == len(gpd.read_file(DataRoot(fetched).parks))
    # a PBF extract (written here with pyosmium from the fetched XML) gives the same graph
    pbf = tmp_path / "region.osm.pbf"
    with osmium.SimpleWriter(str(pbf)) as writer:
        for source in (osm / "streets.osm", osm / "context.osm"):
            for obj in osmium.FileProcessor(str(source)):
                writer.add(obj)
    from_pbf = tmp_path / "from_pbf"
    import_streets(from_pbf, pbf, BOUNDARY, simplify=False)
    import_streets(tmp_path / "from_xml", osm / "streets.osm", BOUNDARY, simplify=False)
    got, want = (
        read_streets(DataRoot(from_pbf).streets),
        read_streets(DataRoot(tmp_path / "from_xml").streets),
    )
    assert sorted(got.node_ids) == sorted(want.node_ids)
    import_context(from_pbf, pbf, BOUNDARY)
    assert len(gpd.read_file(DataRoot(from_pbf).parks)) == len(
        gpd.read_file(DataRoot(fetched).parks)
    )
    assert [p.suffix for p in (DataRoot(from_pbf).cache / "osm").iterdir()] == [
        ".osm"
    ]  # one cut, reused
    with pytest.raises(ValueError, match=r"area\.osm\.pbf: not a readable OSM PBF"):
        (tmp_path / "area.osm.pbf").write_bytes(b"not a pbf")
        import_streets(local, tmp_path / "area.osm.pbf")
    (tmp_path / "broken.osm").write_text("<osm><node id=")
    with pytest.raises(ValueError, match=r"broken\.osm: not a readable OSM XML"):
        import_streets(local, tmp_path / "broken.osm")


def test_estimate_scales_with_the_area():
    estimate = estimate_osm(BOUNDARY)
    assert estimate.requests == 2
    km2 = 1.7 * 1.2  # the box plus its 100 m margin
    assert STREET_BYTES_PER_KM2 * km2 < estimate.bytes < 2 * STREET_BYTES_PER_KM2 * km2
    assert "ODbL" in estimate.note
