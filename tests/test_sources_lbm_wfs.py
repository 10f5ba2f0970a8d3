"""Leefbaarometer labels from the loopback WFS and from release files, read back by read_lbm."""

from __future__ import annotations

import json
import math
import zipfile

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from core.dataroot import DataRoot
from core.sources.http import FetchError, HttpClient
from core.sources.lbm import read_lbm
from core.sources.lbm_wfs import (
    BYTES_PER_FEATURE,
    estimate_lbm,
    fetch_lbm,
    fetch_lbm_features,
    import_lbm_release,
    lbm_layer,
)
from core.sources.pdok_boundaries import (
    fetch_municipality,
    fetch_province,
    municipality_features,
)
from tests.fakes import FAST, Sleeps
from tests.fakes.lbm_wfs import WFS_PATH, install_lbm_wfs
from tests.fakes.pdok_boundaries import demo_outline, install_pdok_boundaries, municipality

BBOX = (121000.0, 485000.0, 122500.0, 486000.0)


@pytest.fixture
def client() -> HttpClient:
    return HttpClient(FAST, sleep=Sleeps())


@pytest.fixture(scope="module")
def demo_labels(tiny_demo) -> gpd.GeoDataFrame:
    root = DataRoot(tiny_demo)
    return read_lbm(root.scores, root.lbm_grid)


def get_feature_requests(server) -> list[dict]:
    return [
        dict(r.args)
        for r, _ in server.log
        if r.path == WFS_PATH and r.args.get("resultType") != "hits"
    ]


def assert_same_labels(got: gpd.GeoDataFrame, want: gpd.GeoDataFrame) -> None:
    got, want = got.reset_index(drop=True), want.reset_index(drop=True)
    np.testing.assert_array_equal(got["cell_id"], want["cell_id"])
    np.testing.assert_array_equal(got["jaar"], want["jaar"])
    for column in ("lbm", "afw", "fys", "onv", "soc", "vrz", "won", "lbm_class"):
        np.testing.assert_allclose(got[column], want[column], atol=1e-4, err_msg=column)


def test_layer_names_follow_the_two_digit_year():
    assert lbm_layer(2020) == "lbm3:clippedgridscore20"
    assert lbm_layer(2008) == "lbm3:clippedgridscore08"
    with pytest.raises(ValueError, match="four-digit"):
        lbm_layer(20)


def test_fetch_pages_rebuilds_clipped_cells_and_reads_back(
    tiny_demo, demo_labels, httpserver, client, tmp_path
):
    url = install_lbm_wfs(httpserver, tiny_demo)
    raw = fetch_lbm_features(2020, BBOX, client, url, page_size=40)
    assert (raw.geometry.area < 9999).sum() > len(raw) / 2  # the fake serves clipped squares

    scores, grid = fetch_lbm(tmp_path, BBOX, [2020], client=client, endpoint=url, page_size=40)
    assert (scores, grid) == (DataRoot(tmp_path).scores, DataRoot(tmp_path).lbm_grid)
    got = read_lbm(scores, grid)
    assert_same_labels(got, demo_labels[demo_labels["jaar"] == 2020])
    assert got["lbm_class_published"].all()  # the service's kscore came through to the root
    squares = gpd.read_file(grid)
    np.testing.assert_allclose(squares.area, 10_000.0)  # full cells, not clipped ones
    pages = get_feature_requests(httpserver)[-math.ceil(len(got) / 40) :]
    assert [int(p["startIndex"]) for p in pages] == list(range(0, len(got), 40))
    assert {p["typeNames"] for p in pages} == {"lbm3:clippedgridscore20"}
    assert pages[0]["bbox"].endswith("urn:ogc:def:crs:EPSG::28992")


def test_a_rerun_uses_the_cached_layer(tiny_demo, httpserver, client, tmp_path):
    url = install_lbm_wfs(httpserver, tiny_demo)
    fetch_lbm(tmp_path, BBOX, [2020], client=client, endpoint=url)
    made = client.requests_made
    fetch_lbm(tmp_path, BBOX, [2020], client=client, endpoint=url)
    assert client.requests_made == made
    fetch_lbm(tmp_path, BBOX, [2020], client=client, endpoint=url, refresh=True)
    assert client.requests_made == made + 1


def test_years_accumulate_in_the_same_files(tiny_demo, demo_labels, httpserver, client, tmp_path):
    url = install_lbm_wfs(httpserver, tiny_demo)
    fetch_lbm(tmp_path, BBOX, [2020], client=client, endpoint=url)
    fetch_lbm(tmp_path, BBOX, [2018], client=client, endpoint=url)
    root = DataRoot(tmp_path)
    assert sorted(read_lbm(root.scores, root.lbm_grid)["jaar"].unique()) == [2018, 2020]
    fetch_lbm(tmp_path, BBOX, [2016, 2018], client=client, endpoint=url)
    fetched = demo_labels[demo_labels["jaar"].isin([2016, 2018, 2020])]
    assert_same_labels(read_lbm(root.scores, root.lbm_grid), fetched)
    assert read_lbm(root.scores, root.lbm_grid, year=2018)["cell_id"].is_unique


def test_a_server_page_cap_below_the_page_size_still_gets_everything(
    tiny_demo, demo_labels, httpserver, client, tmp_path
):
    url = install_lbm_wfs(httpserver, tiny_demo, max_count=25)
    raw = fetch_lbm_features(2016, BBOX, client, url, page_size=100)
    assert len(raw) == (demo_labels["jaar"] == 2016).sum()
    assert len(get_feature_requests(httpserver)) == math.ceil(len(raw) / 25)


def test_boundary_keeps_cells_with_their_centre_inside(
    tiny_demo, demo_labels, httpserver, client, tmp_path
):
    url = install_lbm_wfs(httpserver, tiny_demo)
    boundary = shapely.Polygon([(121000, 485000), (122500, 485000), (121000, 486000)])
    fetch_lbm(tmp_path, BBOX, [2020], boundary=boundary, client=client, endpoint=url)
    got = read_lbm(DataRoot(tmp_path).scores, DataRoot(tmp_path).lbm_grid)
    centres = shapely.points(got.geometry.centroid.x, got.geometry.centroid.y)
    assert shapely.contains(boundary, centres).all()
    assert 0 < len(got) < (demo_labels["jaar"] == 2020).sum()


def test_429_with_retry_after_and_5xx_are_retried(tiny_demo, httpserver, tmp_path):
    httpserver.expect_oneshot_request(WFS_PATH).respond_with_data(
        "Too Many Requests", status=429, headers={"Retry-After": "7"}
    )
    httpserver.expect_oneshot_request(WFS_PATH).respond_with_data("Bad Gateway", status=502)
    url = install_lbm_wfs(httpserver, tiny_demo)
    sleeps = Sleeps()
    client = HttpClient(FAST, sleep=sleeps)
    fetch_lbm(tmp_path, BBOX, [2020], client=client, endpoint=url)
    assert 7.0 in sleeps and len(sleeps) == 2
    assert len(read_lbm(DataRoot(tmp_path).scores, DataRoot(tmp_path).lbm_grid)) > 0


def test_an_unknown_year_names_the_layer(tiny_demo, httpserver, client, tmp_path):
    url = install_lbm_wfs(httpserver, tiny_demo)
    with pytest.raises(
        FetchError,
        match=r"clippedgridscore19.*HTTP 400.*is 2019 a published "
        r"edition\?.*GetCapabilities",
    ):
        fetch_lbm(tmp_path, BBOX, [2019], client=client, endpoint=url)
    assert not DataRoot(tmp_path).scores.exists()


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (
            '<?xml version="1.0"?><ows:ExceptionReport xmlns:ows="http://www.opengis.net/ows/1.1">'
            "<ows:Exception><ows:ExceptionText>Illegal bbox</ows:ExceptionText></ows:Exception>"
            "</ows:ExceptionReport>",
            "text/xml",
            "the service reports: Illegal bbox",
        ),
        (
            '<?xml version="1.0"?><wfs:FeatureCollection xmlns:wfs="http://www.opengis.net/wfs/2.0"/>',
            "application/gml+xml",
            "answered GML, not GeoJSON",
        ),
        ("<html>maintenance</html>", "text/html", "answered XML, not GeoJSON"),
        ("Service Unavailable", "text/plain", "not JSON"),
        (json.dumps({"features": "?"}), "application/json", "not a GeoJSON FeatureCollection"),
    ],
)
def test_bad_responses_give_clear_errors(httpserver, client, body, content_type, message):
    httpserver.expect_request(WFS_PATH).respond_with_data(body, content_type=content_type)
    url = httpserver.url_for(WFS_PATH)
    with pytest.raises(FetchError, match=message) as info:
        fetch_lbm_features(2020, BBOX, client, url)
    assert "/lbm3/ows" in str(info.value)


def test_features_without_scores_are_rejected(httpserver, client):
    feature = {
        "type": "Feature",
        "properties": {"id": 1, "kscore": 5},
        "geometry": shapely.geometry.mapping(shapely.box(121000, 485000, 121100, 485100)),
    }
    httpserver.expect_request(WFS_PATH).respond_with_json(
        {"type": "FeatureCollection", "features": [feature], "numberMatched": 1}
    )
    with pytest.raises(ValueError, match=r"missing Leefbaarometer columns \['lbm', 'afw'"):
        fetch_lbm_features(2020, BBOX, client, httpserver.url_for(WFS_PATH))


def test_estimate_counts_hits_or_falls_back_to_the_bbox(tiny_demo, demo_labels, httpserver, client):
    url = install_lbm_wfs(httpserver, tiny_demo)
    estimate = estimate_lbm(BBOX, [2020, 2018], client, url, page_size=100)
    per_year = (demo_labels["jaar"] == 2020).sum()
    assert estimate.requests == 2 * (1 + math.ceil(per_year / 100))
    assert estimate.bytes == 2 * per_year * BYTES_PER_FEATURE
    assert "estimated" not in estimate.note

    missing = httpserver.url_for("/nowhere")
    fallback = estimate_lbm(BBOX, [2020], client, missing, page_size=100)
    assert fallback.bytes == 150 * BYTES_PER_FEATURE  # 1.5 km x 1 km of cells
    assert "estimated from the bbox" in fallback.note


def write_release(tiny_demo, folder, rename=None, sep=","):
    """The demo's labels as a release zip (scores CSV + grid GeoPackage), columns renamed."""
    root = DataRoot(tiny_demo)
    folder.mkdir(parents=True, exist_ok=True)
    scores = pd.read_csv(root.scores).rename(columns=rename or {})
    scores.to_csv(folder / "lbm3_scores.csv", index=False, sep=sep)
    archive = folder / "lbm3_release.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(folder / "lbm3_scores.csv", "data/Leefbaarometer-scores grid 2016-2020.csv")
        zf.write(root.lbm_grid, "data/Geometrie grid.gpkg")
    return archive


def test_release_zip_is_clipped_into_the_root(tiny_demo, demo_labels, tmp_path):
    archive = write_release(
        tiny_demo, tmp_path / "release", rename={"grid_id": "GRID_ID", "lbm": "LBM"}, sep=";"
    )
    small = (121000.0, 485000.0, 121600.0, 485500.0)
    import_lbm_release(tmp_path / "root", archive, bbox_rd=small, years=[2018, 2020])
    got = read_lbm(DataRoot(tmp_path / "root").scores, DataRoot(tmp_path / "root").lbm_grid)
    x0, y0 = got.geometry.bounds["minx"], got.geometry.bounds["miny"]
    want = demo_labels[demo_labels["jaar"].isin([2018, 2020])]
    inside = want.geometry.intersects(shapely.box(*small)) & ~want.geometry.touches(
        shapely.box(*small)
    )
    assert_same_labels(got, want[inside.to_numpy()])
    assert (x0 >= 121000).all() and (y0 >= 485000).all()


def test_release_with_wrong_columns_names_the_file(tiny_demo, tmp_path):
    archive = write_release(tiny_demo, tmp_path, rename={"fys": "fysiek"})
    with pytest.raises(
        ValueError,
        match=r"lbm3_release\.zip: missing Leefbaarometer columns "
        r"\['fys'\]",
    ):
        import_lbm_release(tmp_path / "root", archive, bbox_rd=BBOX)
    scores = tmp_path / "lbm3_scores.csv"
    with pytest.raises(ValueError, match="grid GeoPackage"):
        import_lbm_release(tmp_path / "root", scores, grid=scores)
    assert not DataRoot(tmp_path / "root").scores.exists()


# --- the municipality outline (PDOK) that defines a fetch's bbox and grid ---------------------


def test_municipality_outline_defines_the_lbm_fetch(
    tiny_demo, demo_labels, httpserver, client, tmp_path
):
    pdok = install_pdok_boundaries(httpserver, tiny_demo)
    wfs = install_lbm_wfs(httpserver, tiny_demo)
    amsterdam = fetch_municipality("Amsterdam", client=client, endpoint=pdok)
    assert (amsterdam.name, amsterdam.code, amsterdam.province) == (
        "Amsterdam",
        "0363",
        "Noord-Holland",
    )
    assert amsterdam.geometry.equals(demo_outline(tiny_demo))
    fetch_lbm(
        tmp_path,
        amsterdam.bbox_rd,
        [2020],
        boundary=amsterdam.geometry,
        client=client,
        endpoint=wfs,
    )
    got = read_lbm(DataRoot(tmp_path).scores, DataRoot(tmp_path).lbm_grid)
    assert_same_labels(got, demo_labels[demo_labels["jaar"] == 2020])
    items = [r for r, _ in httpserver.log if r.path.endswith("/gemeentegebied/items")]
    assert items[0].args["crs"] == "http://www.opengis.net/def/crs/EPSG/0/28992"
    assert items[0].args["naam"] == "Amsterdam"


def test_municipality_pages_and_lonlat_answers(tiny_demo, httpserver, client):
    """A server that ignores the name filter and the crs is still read right, over pages."""
    pdok = install_pdok_boundaries(
        httpserver,
        tiny_demo,
        extra=[
            municipality(f"Gemeente {i}", f"9{i:03d}", "Utrecht", shapely.box(0, 0, 1, 1))
            for i in range(150)
        ],
    )
    httpserver.clear_log()
    outline = demo_outline(tiny_demo)
    features = municipality_features("Amstelveen", client, pdok)
    assert len(features) == 1
    ignoring = install_pdok_boundaries(httpserver, tiny_demo, path="/ignoring", filters=False)
    amsterdam = fetch_municipality("Amsterdam", client=client, endpoint=ignoring)
    assert amsterdam.geometry.symmetric_difference(outline).area < 1e-5 * outline.area
    assert shapely.get_num_geometries(amsterdam.geometry) >= 1


def test_unknown_and_ambiguous_names_are_clear_errors(tiny_demo, httpserver, client):
    bergen = shapely.box(100000, 500000, 101000, 501000)
    pdok = install_pdok_boundaries(
        httpserver,
        tiny_demo,
        extra=[
            municipality("Bergen", "0373", "Noord-Holland", bergen),
            municipality("Bergen", "0893", "Limburg", bergen),
        ],
    )
    with pytest.raises(ValueError, match=r"no municipality named 'Amsterdm'.*official Dutch name"):
        fetch_municipality("Amsterdm", client=client, endpoint=pdok)
    with pytest.raises(
        ValueError,
        match=r"2 municipalities are named 'Bergen'.*0373.*0893.*"
        r"province=",
    ):
        fetch_municipality("Bergen", client=client, endpoint=pdok)
    assert fetch_municipality("Bergen", "limburg", client=client, endpoint=pdok).code == "0893"
    httpserver.expect_request("/broken/collections/gemeentegebied/items").respond_with_data(
        "<html>down</html>", content_type="text/html"
    )
    with pytest.raises(FetchError, match="/broken/.*not JSON"):
        fetch_municipality("Amsterdam", client=client, endpoint=httpserver.url_for("/broken"))


def utrecht_box(i: int) -> shapely.Polygon:
    """A 1 km square in RD metres, the ``i``-th along a row near Utrecht."""
    return shapely.box(130000 + 1000 * i, 455000, 131000 + 1000 * i, 456000)


def test_a_province_lists_its_municipalities_over_pages_with_or_without_the_filter(
    tiny_demo, httpserver, client
):
    """Every municipality whose ``ligt_in_provincie_naam`` is the province, by code; from a
    server that filters on it (the exact name), and from one that ignores the filter (any
    case)."""
    utrecht = [
        municipality(f"Gemeente {i}", f"9{i:03d}", "Utrecht", utrecht_box(i))
        for i in (149, *range(149))  # served out of code order
    ]
    extra = [*utrecht, municipality("Vaals", "0981", "Limburg", utrecht_box(300))]
    pdok = install_pdok_boundaries(httpserver, tiny_demo, extra=extra)
    ignoring = install_pdok_boundaries(
        httpserver, tiny_demo, extra=extra, path="/ignoring", filters=False
    )
    httpserver.clear_log()
    for endpoint, name in ((pdok, "Utrecht"), (ignoring, "utrecht")):
        found = fetch_province(name, client, endpoint)
        assert [m.code for m in found] == sorted(r["code"] for r in utrecht)
        assert {m.province for m in found} == {"Utrecht"}
        box = utrecht_box(3)  # read back from lon/lat too: a square metre off in a km2
        assert found[3].geometry.symmetric_difference(box).area < 1e-5 * box.area
    pages = [r for r, _ in httpserver.log if r.path.endswith("/gemeentegebied/items")]
    # pages of 100: 150 municipalities filtered, or all 153 (their province checked here; that
    # server's next link drops the filter it ignored)
    asked = [r.args.get("ligt_in_provincie_naam") for r in pages]
    assert asked == ["Utrecht", "Utrecht", "utrecht", None]
    noord_holland = fetch_province("Noord-Holland", client, pdok)
    assert [(m.name, m.code) for m in noord_holland] == [
        ("Amstelveen", "0362"),
        ("Amsterdam", "0363"),
    ]
    with pytest.raises(ValueError, match=r"no municipality lies in a province named 'Friesland'"):
        fetch_province("Friesland", client, pdok)
