"""Base-map tiles and the cell panel's local map in a real browser.

The dashboard (``stadsbeeld dashboard`` on a copy of the tiny demo city) is configured in its
``dashboard.yaml`` with an XYZ template of a loopback tile server that answers every
``/{z}/{x}/{y}.png`` with one flat colour, as a tile service answers (PNG, CORS open to any
origin). Chromium must request tiles from it and draw them under the grid, with the
attribution on the map. See ``tests/test_browser.py`` for how the server and browser run.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from core.dataroot import DataRoot
from core.sources.catalog import read_catalog
from tests.test_browser import browser, map_pixels, new_page, serve, settle  # noqa: F401

#: The tiles' one colour: far from every palette, the water and the district lines.
TILE_COLOUR = (250, 0, 250)
ATTRIBUTION = "Loopback tiles &copy; stadsbeeld tests"
_TILE_PATH = re.compile(r"^/(\d+)/(\d+)/(\d+)\.png$")


@dataclass
class TileServer:
    url: str  # the XYZ template
    requests: list[str] = field(default_factory=list)


def _tile_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (256, 256), TILE_COLOUR).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def tile_server() -> Iterator[TileServer]:
    """A threaded HTTP server on 127.0.0.1 answering ``/{z}/{x}/{y}.png`` with a flat PNG."""
    png = _tile_png()
    seen: list[str] = []

    class Tiles(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if not _TILE_PATH.match(self.path):
                self.send_error(404, "no such tile")
                return
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.send_header("Access-Control-Allow-Origin", "*")  # as PDOK and OSM answer
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Tiles)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield TileServer(f"http://127.0.0.1:{server.server_port}/{{z}}/{{x}}/{{y}}.png", seen)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def tiled_dashboard(tmp_path_factory, tiny_demo, tile_server):
    """The dashboard on a copy of the tiny city whose ``dashboard.yaml`` names the tile server."""
    root = tmp_path_factory.mktemp("basemap") / "city"
    shutil.copytree(tiny_demo, root)
    (root / "dashboard.yaml").write_text(
        f"basemap: {tile_server.url}\nbasemap_attribution: '{ATTRIBUTION}'\n", encoding="utf-8"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("STADSBEELD_BASEMAP", raising=False)  # the file's setting, not the shell's
        patch.delenv("STADSBEELD_BASEMAP_ATTRIBUTION", raising=False)
        with serve(root, tmp_path_factory, retrain=False) as server:
            yield server


def test_the_city_map_draws_base_map_tiles_with_their_attribution(
    browser,  # noqa: F811
    tiled_dashboard,
    tile_server,
):
    with new_page(browser, tiled_dashboard) as page:
        page.goto(tiled_dashboard.url)
        page.get_by_role("heading", name="City map", exact=True).wait_for()
        settle(page, 3)
        main = page.locator('[data-testid="stMain"]')
        assert "Base map: custom (Loopback tiles © stadsbeeld tests)" in main.inner_text()
        attribution = page.locator('[data-testid="stDeckGlJsonChart"] .mapboxgl-ctrl-attrib')
        assert "Loopback tiles © stadsbeeld tests" in attribution.first.inner_text()
        assert tile_server.requests, "the map requested no tile"
        zooms = {int(_TILE_PATH.match(p).group(1)) for p in tile_server.requests}
        assert zooms <= set(range(12, 17)), zooms  # the city's zoom, not the world's
        # Zoom out as a user would (the map opens on the grid, which covers it), then wait
        # for the tiles of the new zoom to be drawn.
        box = page.locator("canvas#deckgl-overlay").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        for _ in range(4):
            page.mouse.wheel(0, 400)
            page.wait_for_timeout(300)
        tile = 0.0
        for _ in range(60):  # up to 30 s for SwiftShader to draw
            tile = (np.abs(map_pixels(page) - TILE_COLOUR).sum(1) < 30).mean()
            if tile > 0.5:
                break
            page.wait_for_timeout(500)
        assert tile > 0.5, (
            f"{tile:.1%} of the map has the tiles' colour; console: {tiled_dashboard.console}"
        )
        assert not [m for m in tiled_dashboard.console if m.startswith("pageerror")]


def test_the_cell_panel_shows_a_local_map_with_one_marker_per_street_image(
    browser,  # noqa: F811
    tiled_dashboard,
):
    with new_page(browser, tiled_dashboard) as page:
        page.goto(tiled_dashboard.url)
        page.get_by_role("heading", name="City map", exact=True).wait_for()
        settle(page, 3)
        box = page.locator("canvas#deckgl-overlay").bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        heading = page.get_by_role("heading", name=re.compile(r"^Cell \d+$"))
        heading.wait_for(timeout=60_000)
        settle(page)
        cell = int(heading.inner_text().split()[1])
        catalog = read_catalog(DataRoot(tiled_dashboard.root).catalog, check_files=False)
        mine = catalog.images[catalog.images["cell_id"] == cell]
        assert len(mine), f"cell {cell} has no street images in the tiny city"

        local = page.frame_locator('[data-testid="stMain"] iframe').first
        markers = local.locator(".leaflet-marker-icon.street-image")
        markers.first.wait_for()
        assert markers.count() == len(mine)
        arrows = local.locator(".leaflet-marker-icon.street-image.gsv svg")
        assert arrows.count() == int((mine["source"] == "gsv").sum())
        assert local.locator("img.leaflet-image-layer").count() == 1  # the aerial patch
        assert (
            "Loopback tiles © stadsbeeld tests"
            in local.locator(".leaflet-control-attribution").inner_text()
        )
        markers.first.dispatch_event("click")  # markers of one spot overlap: no mouse
        popup = local.locator(".leaflet-popup-content")
        popup.wait_for()
        text = popup.inner_text()
        assert "gsv" in text or "flickr" in text, text
        assert popup.locator('img[src^="data:image/jpeg;base64,"]').count() == 1
        if os.environ.get("STADSBEELD_SCREENSHOTS"):
            local.locator(".folium-map").first.scroll_into_view_if_needed()
            page.screenshot(path=f"{os.environ['STADSBEELD_SCREENSHOTS']}/cell-local-map.png")
