"""PDOK aerial WMTS: capabilities, tile math, and polite resumable fetches from a fake PDOK."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from werkzeug import Response

from core.dataroot import DataRoot
from core.sources.aerial import open_aerial
from core.sources.http import FetchError, HttpClient, Politeness
from core.sources.wmts import (
    AVERAGE_TILE_BYTES,
    fetch_aerial,
    fetch_capabilities,
    rd_tile_matrix_set,
    tile_validator,
)
from core.sources.wmts import estimate_aerial as estimate
from tests.fakes import Sleeps
from tests.fakes.wmts import encode_tile, install_wmts

FAST = Politeness(requests_per_second=0, concurrency=2, retries=2, backoff_s=0.01)
#: The tiny demo's aerial raster: 4 m/px over this RD box.
DEMO_RASTER = (120700.0, 484700.0, 122800.0, 486300.0)


@pytest.fixture
def fake(httpserver, tiny_demo):
    return install_wmts(httpserver, tiny_demo)


def source_at(root, xs, ys):
    """RGB of the demo raster at RD points (n, 3)."""
    with rasterio.open(DataRoot(root).aerial) as src:
        rows, cols = rasterio.transform.rowcol(src.transform, xs, ys)
        return src.read([1, 2, 3]).transpose(1, 2, 0)[np.asarray(rows), np.asarray(cols)]


def mosaic_vs_source(mosaic_path, root, shift=(0.0, 0.0)):
    """Mosaic and demo-raster RGB at every mosaic pixel centre inside the demo raster.

    ``shift`` (metres) moves the points sampled in the source, to show that no shift fits
    better than none.
    """
    with rasterio.open(mosaic_path) as mosaic:
        pixels = mosaic.read().transpose(1, 2, 0)
        rows, cols = np.mgrid[0 : mosaic.height, 0 : mosaic.width]
        xs, ys = rasterio.transform.xy(mosaic.transform, rows.ravel(), cols.ravel())
    xs, ys = np.asarray(xs) + shift[0], np.asarray(ys) + shift[1]
    inside = (
        (xs > DEMO_RASTER[0])
        & (xs < DEMO_RASTER[2])
        & (ys > DEMO_RASTER[1])
        & (ys < DEMO_RASTER[3])
    )
    got = pixels.reshape(-1, 3)[inside].astype(int)
    return got, source_at(root, xs[inside], ys[inside]).astype(int)


def assert_georeferenced(mosaic_path, root, tolerance):
    """The lossy mosaic matches the source within ``tolerance`` (mean |error| per channel),
    and better than with the source shifted by one source pixel (4 m) in any direction."""
    errors = {
        shift: np.abs(np.subtract(*mosaic_vs_source(mosaic_path, root, shift))).mean()
        for shift in [(0, 0), (4, 0), (-4, 0), (0, 4), (0, -4)]
    }
    aligned = errors.pop((0, 0))
    assert aligned < tolerance, aligned
    assert aligned < min(errors.values()) - 2, (aligned, errors)


def test_capabilities_parse_layers_formats_and_the_rd_matrix_set(httpserver, tiny_demo):
    fake = install_wmts(httpserver, tiny_demo, resource_urls=False)
    caps = fetch_capabilities(HttpClient(FAST), fake.endpoint)
    assert set(caps.layers) == {"Actueel_ortho25", "2020_ortho25", "2019_ortho25"}
    layer = caps.layer("2020_ortho25")
    assert layer.formats == ("image/jpeg", "image/png")
    assert layer.matrix_sets == ("EPSG:28992", "EPSG:3857")
    rd = caps.matrix_set(layer)
    assert rd.crs == "EPSG:28992"
    assert [m.identifier for m in rd.matrices] == [f"{z:02d}" for z in range(16)]
    top, finest = rd.matrices[0], rd.matrices[-1]
    assert top.scale_denominator == 12288000.0
    assert top.resolution == pytest.approx(3440.64)
    assert rd.matrices[14].resolution == pytest.approx(0.21)
    assert finest.resolution == pytest.approx(0.105)
    assert all(m.top_left == (-285401.92, 903401.92) for m in rd.matrices)
    assert all((m.tile_width, m.tile_height) == (256, 256) for m in rd.matrices)
    assert [m.matrix_width for m in rd.matrices] == [2**z for z in range(16)]
    assert [m.matrix_height for m in rd.matrices] == [2**z for z in range(16)]
    assert caps.matrix_sets["EPSG:3857"].matrices[0].top_left[0] == pytest.approx(
        -20037508.34, abs=0.01
    )
    # no ResourceURL in the KVP document: PDOK's RESTful pattern is built from the endpoint
    expected = (
        f"{fake.endpoint}/2020_ortho25/EPSG:28992/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.jpeg"
    )
    assert caps.tile_template(layer, "EPSG:28992", "image/jpeg") == expected
    assert fake.capabilities_requests == 1


def test_resource_url_templates_are_used_when_present(httpserver, fake):
    caps = fetch_capabilities(HttpClient(FAST), fake.endpoint)
    layer = caps.layer("2019_ortho25")
    assert layer.resource_urls["image/png"].endswith(
        "/2019_ortho25/{TileMatrixSet}/{TileMatrix}/{TileCol}/{TileRow}.png"
    )
    assert caps.tile_template(layer, "EPSG:28992", "image/png") == (
        f"{fake.endpoint}/2019_ortho25/EPSG:28992/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.png"
    )
    with pytest.raises(ValueError, match="not served as image/webp"):
        caps.tile_template(layer, "EPSG:28992", "image/webp")


def test_missing_layer_names_the_url_and_the_available_layers(fake, tmp_path):
    with pytest.raises(ValueError) as info:
        fetch_aerial(
            tmp_path / "out",
            DEMO_RASTER,
            year=2016,
            client=HttpClient(FAST),
            endpoint=fake.endpoint,
            show_progress=False,
        )
    message = str(info.value)
    assert fake.endpoint in message and "request=GetCapabilities" in message
    assert "2016_ortho25" in message
    assert "2019_ortho25, 2020_ortho25, Actueel_ortho25" in message
    assert sum(fake.tile_requests.values()) == 0


def test_a_response_that_is_not_capabilities_is_a_clear_error(httpserver):
    httpserver.expect_request("/html").respond_with_data(
        "<html><body>maintenance</body>", content_type="text/html"
    )
    httpserver.expect_request("/exc").respond_with_data(
        '<ExceptionReport xmlns="http://www.opengis.net/ows/1.1"><Exception exceptionCode="x">'
        "<ExceptionText>service down for maintenance</ExceptionText></Exception></ExceptionReport>",
        content_type="application/xml",
    )
    with pytest.raises(FetchError, match=r"/html\?request=GetCapabilities.*not XML"):
        fetch_capabilities(HttpClient(FAST), httpserver.url_for("/html"))
    with pytest.raises(FetchError, match=r"/exc\?.*exception: service down for maintenance"):
        fetch_capabilities(HttpClient(FAST), httpserver.url_for("/exc"))


def test_tile_math_on_known_coordinates():
    rd = rd_tile_matrix_set()
    whole = rd.matrices[0]
    # level 0 is one tile: the Dutch tiling guideline's extent
    assert whole.tile_bounds(0, 0) == pytest.approx((-285401.92, 22598.08, 595401.92, 903401.92))
    z14 = rd.nearest(0.25)
    assert z14.identifier == "14" and z14.resolution == pytest.approx(0.21)
    assert z14.tile_span == pytest.approx((53.76, 53.76))
    assert rd.nearest(2.0).identifier == "11"  # 1.68 m/px
    assert rd.nearest(4.0).identifier == "10"  # 3.36 m/px
    tiles = z14.tile_range((121000, 485000, 122500, 486000))
    # (121000 + 285401.92) / 53.76 = 7559.56; (903401.92 - 486000) / 53.76 = 7764.17; ...
    assert (tiles.col_min, tiles.col_max, tiles.row_min, tiles.row_max) == (7559, 7587, 7764, 7782)
    assert len(tiles) == 29 * 19 == len(list(tiles))
    left, bottom, right, top = tiles.bounds
    assert left <= 121000 < left + 53.76 and top - 53.76 < 486000 <= top
    assert right - 53.76 < 122500 <= right and bottom <= 485000 < bottom + 53.76
    # a box exactly on tile edges takes exactly those tiles
    z3 = rd.matrices[3]
    one = z3.tile_range(z3.tile_bounds(5, 2))
    assert (one.col_min, one.col_max, one.row_min, one.row_max) == (5, 5, 2, 2)
    with pytest.raises(ValueError, match="outside tile matrix"):
        z3.tile_range((700000, 0, 800000, 10000))


def test_estimate_counts_tiles_bytes_and_time():
    plan = estimate((121000, 485000, 122500, 486000), year=2020)
    assert plan.requests == 29 * 19 + 1
    assert plan.bytes == 2 * 29 * 19 * AVERAGE_TILE_BYTES
    assert plan.seconds == pytest.approx(plan.requests / 4.0)
    assert "2020_ortho25" in plan.source and "0.21 m/px" in plan.source
    coarse = estimate((121000, 485000, 122500, 486000), resolution=2.0, politeness=FAST)
    assert coarse.requests == 5 * 3 + 1 and coarse.seconds == 0.0


def test_validator_rejects_truncated_and_wrong_size_tiles():
    pixels = np.full((256, 256, 3), 120, np.uint8)
    validate = tile_validator(256, 256)
    validate(encode_tile(pixels))
    with pytest.raises(ValueError, match="not a decodable image"):
        validate(encode_tile(pixels)[:300])
    with pytest.raises(ValueError, match="not a decodable image"):
        validate(b"<ExceptionReport/>")
    with pytest.raises(ValueError, match="128 x 128 px"):
        validate(encode_tile(pixels[:128, :128]))


def test_fetch_mosaics_a_georeferenced_cog_style_geotiff(fake, tiny_demo, tmp_path):
    out = tmp_path / "out"
    result = fetch_aerial(
        out,
        DEMO_RASTER,
        client=HttpClient(FAST),
        endpoint=fake.endpoint,
        resolution=2.0,
        show_progress=False,
    )
    assert result.path == out / "aerial" / "aerial.tif" == DataRoot(out).aerial
    assert result.matrix.identifier == "11" and len(result.tiles) == 6 * 5
    assert result.fetched == 30 and result.skipped == 0 and result.missing == ()
    assert all(n == 1 for n in fake.tile_requests.values()) and len(fake.tile_requests) == 30
    assert not list(out.rglob("*.part")) and not list((out / "aerial").glob(".*"))
    with rasterio.open(result.path) as tif:
        assert tif.crs.to_epsg() == 28992
        assert tif.res == pytest.approx((1.68, 1.68))
        assert (tif.width, tif.height) == (6 * 256, 5 * 256)
        assert (tif.bounds.left, tif.bounds.top) == pytest.approx(result.tiles.bounds[::3])
        assert tif.block_shapes[0] == (512, 512)
        assert tif.compression.name == "jpeg"
        assert tif.overviews(1) == [2, 4]
        assert tif.tags()["WMTS_LAYER"] == "2020_ortho25"
    # two JPEG generations (tiles, mosaic) over the demo's pixel noise
    assert_georeferenced(result.path, tiny_demo, tolerance=8)


def test_png_tiles_reproduce_the_source_pixels_at_known_rd_points(fake, tiny_demo, tmp_path):
    result = fetch_aerial(
        tmp_path / "out",
        DEMO_RASTER,
        client=HttpClient(FAST),
        endpoint=fake.endpoint,
        resolution=4.0,
        image_format="image/png",
        compress="deflate",
        show_progress=False,
    )
    assert result.matrix.identifier == "10"
    got, expected = mosaic_vs_source(result.path, tiny_demo)
    assert (got == expected).all(axis=1).mean() > 0.999
    # and one hand-picked point: the mosaic pixel holding RD (121234, 485678) is the source's
    with rasterio.open(result.path) as tif:
        row, col = tif.index(121234.0, 485678.0)
        pixel = tif.read(window=((row, row + 1), (col, col + 1)))[:, 0, 0]
    assert (pixel == source_at(tiny_demo, [121234.0], [485678.0])[0]).all()


def test_open_aerial_reads_the_mosaic_and_cuts_patches(fake, tiny_demo, tmp_path):
    result = fetch_aerial(
        tmp_path / "out",
        DEMO_RASTER,
        client=HttpClient(FAST),
        endpoint=fake.endpoint,
        resolution=2.0,
        show_progress=False,
    )
    with open_aerial(result.path) as fetched, open_aerial(DataRoot(tiny_demo).aerial) as demo:
        assert fetched.resolution == pytest.approx((1.68, 1.68))
        a = fetched.patch(121750, 485550, size_m=256, out_px=32)
        b = demo.patch(121750, 485550, size_m=256, out_px=32)
    assert not a.edge and not a.outside and a.valid_fraction == 1.0
    assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() < 6


def test_429_with_retry_after_is_obeyed(fake, tmp_path):
    fake.inject(473, 485, Response("Too Many Requests", status=429, headers={"Retry-After": "7"}))
    sleeps = Sleeps()
    result = fetch_aerial(
        tmp_path / "out",
        DEMO_RASTER,
        client=HttpClient(FAST, sleep=sleeps),
        endpoint=fake.endpoint,
        resolution=4.0,
        show_progress=False,
    )
    assert sleeps == [7.0]
    assert fake.tile_requests[(473, 485)] == 2
    assert result.fetched == len(result.tiles) == 9


def test_5xx_is_retried(fake, tmp_path):
    fake.inject(472, 484, Response("bad gateway", status=502), Response("busy", status=503))
    sleeps = Sleeps()
    result = fetch_aerial(
        tmp_path / "out",
        DEMO_RASTER,
        client=HttpClient(FAST, sleep=sleeps),
        endpoint=fake.endpoint,
        resolution=4.0,
        show_progress=False,
    )
    assert fake.tile_requests[(472, 484)] == 3 and len(sleeps) == 2
    assert result.fetched == 9 and result.path.is_file()


def test_a_corrupt_tile_is_refetched_and_never_written(fake, tmp_path):
    whole = encode_tile(fake.tile_pixels(10, 474, 486))
    fake.inject(474, 486, Response(whole[: len(whole) // 2], content_type="image/jpeg"))
    out = tmp_path / "out"
    result = fetch_aerial(
        out,
        DEMO_RASTER,
        client=HttpClient(FAST, sleep=Sleeps()),
        endpoint=fake.endpoint,
        resolution=4.0,
        show_progress=False,
    )
    assert fake.tile_requests[(474, 486)] == 2
    tile = (
        DataRoot(out).cache
        / "pdok_wmts"
        / "2020_ortho25"
        / "EPSG_28992"
        / "10"
        / "474"
        / "486.jpeg"
    )
    assert tile.read_bytes() == whole
    assert result.fetched == 9


def test_an_interrupted_download_resumes_without_refetching(fake, tmp_path):
    out = tmp_path / "out"
    broken = {(473, 484), (474, 486)}  # an outage outlasting the retries on these two
    for col, row in broken:
        fake.inject(col, row, *[Response("down", status=503) for _ in range(FAST.retries + 1)])
    with pytest.raises(FetchError, match=r"2 PDOK aerial tiles of 2020_ortho25 failed.*HTTP 503"):
        fetch_aerial(
            out,
            DEMO_RASTER,
            client=HttpClient(FAST, sleep=Sleeps()),
            endpoint=fake.endpoint,
            resolution=4.0,
            show_progress=False,
        )
    assert not (out / "aerial" / "aerial.tif").exists()
    assert len(list((DataRoot(out).cache).rglob("*.jpeg"))) == 7
    assert not list(out.rglob("*.part"))
    first = dict(fake.tile_requests)

    result = fetch_aerial(
        out,
        DEMO_RASTER,
        client=HttpClient(FAST),
        endpoint=fake.endpoint,
        resolution=4.0,
        show_progress=False,
    )
    assert result.fetched == 2 and result.skipped == 7
    again = {tile: fake.tile_requests[tile] - first[tile] for tile in first}
    assert again == {tile: int(tile in broken) for tile in first}
    assert result.path.is_file()

    # a finished fetch rerun asks for no tile at all
    before = sum(fake.tile_requests.values())
    rerun = fetch_aerial(
        out,
        DEMO_RASTER,
        client=HttpClient(FAST),
        endpoint=fake.endpoint,
        resolution=4.0,
        show_progress=False,
    )
    assert rerun.skipped == 9 and sum(fake.tile_requests.values()) == before


def test_tiles_missing_at_the_edge_of_coverage_stay_black_and_are_recorded(
    fake, tiny_demo, tmp_path
):
    # two tile columns west of the demo raster, where the service has no imagery (404)
    bbox = (119000.0, *DEMO_RASTER[1:])
    out = tmp_path / "out"
    result = fetch_aerial(
        out,
        bbox,
        client=HttpClient(FAST),
        endpoint=fake.endpoint,
        resolution=4.0,
        show_progress=False,
    )
    assert result.missing == (
        (470, 484),
        (470, 485),
        (470, 486),
        (471, 484),
        (471, 485),
        (471, 486),
    )
    assert result.fetched == 9
    record = (
        DataRoot(out).cache / "pdok_wmts" / "2020_ortho25" / "EPSG_28992" / "10" / "missing.json"
    )
    assert sorted(map(tuple, json.loads(record.read_text()))) == list(result.missing)
    with rasterio.open(result.path) as tif:
        assert (tif.width, tif.height) == (5 * 256, 3 * 256)
        assert tif.tags()["MISSING_TILES"] == "6"
        image = tif.read()
    assert image[:, :, : 2 * 256].max() == 0  # the missing columns are black
    assert image[:, :, 2 * 256 :].mean() > 40
    assert_georeferenced(result.path, tiny_demo, tolerance=10)

    # known-missing tiles are not asked for again
    before = sum(fake.tile_requests.values())
    fetch_aerial(
        out,
        bbox,
        client=HttpClient(FAST),
        endpoint=fake.endpoint,
        resolution=4.0,
        show_progress=False,
    )
    assert sum(fake.tile_requests.values()) == before
