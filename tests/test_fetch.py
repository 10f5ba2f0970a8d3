"""``python -m train fetch`` end to end, against one loopback server running all six fakes.

The fakes serve the tiny demo city as Amsterdam: its extent is the PDOK outline, its labels the
Leefbaarometer WFS, its aerial raster the PDOK WMTS, its streets, water and parks Overpass, its
Flickr photos and GSV panoramas the Flickr and Street View APIs. A fetch of "amsterdam" must give
a data root that the readers open and the fusion model trains on, as on the demo city.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Response

from core.dataroot import DataRoot
from core.grid import read_grid
from core.runs import list_runs, load_run
from core.sources.aerial import open_aerial
from core.sources.catalog import read_catalog
from core.sources.lbm import read_lbm
from core.sources.pdok_boundaries import Municipality
from core.sources.wmts import rd_tile_matrix_set
from core.ugdata import read_streets
from tests.fakes.flickr import FakeFlickr, install_flickr
from tests.fakes.gsv import FakeGsv, install_gsv
from tests.fakes.lbm_wfs import install_lbm_wfs
from tests.fakes.overpass import install_overpass
from tests.fakes.pdok_boundaries import demo_outline, install_pdok_boundaries
from tests.fakes.wmts import FakeWmts, install_wmts
from train.__main__ import FETCH_ENDPOINTS, FETCH_RATES, FETCH_SOURCES, main
from train.fetch import (
    ENDPOINTS,
    MANIFEST,
    POLITENESS,
    SOURCES,
    aerial_bbox,
)

FLICKR_KEY = "flickr-Key-5f1d9c0e7a"
GSV_KEY = "AIzaGsv-Key-0b7c1e9d44"
#: Coarse aerial (level 10, 3.36 m/px: a few tiles), no rate limit, the demo's photo dates.
FAST = ["--resolution", "4", "--rate", "all=0", "--flickr-since", "2000-01-01", "--quiet"]


@dataclass
class Services:
    """The loopback server with every fake, and the options pointing the fetch at it."""

    server: HTTPServer
    wmts: FakeWmts
    flickr: FakeFlickr
    gsv: FakeGsv
    endpoints: list[str]

    def args(self, out: Path, *extra: str) -> list[str]:
        return [
            "fetch",
            "amsterdam",
            "--year",
            "2020",
            "--out",
            str(out),
            *self.endpoints,
            *FAST,
            *extra,
        ]

    def image_requests(self) -> int:
        return (
            sum(self.wmts.tile_requests.values())
            + sum(self.flickr.image_requests.values())
            + sum(self.gsv.image_requests.values())
        )


@pytest.fixture(scope="module")
def services(tiny_demo):
    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    urls = {
        "pdok": install_pdok_boundaries(server, tiny_demo),
        "lbm": install_lbm_wfs(server, tiny_demo),
        "overpass": install_overpass(server, tiny_demo),
    }
    wmts = install_wmts(server, tiny_demo)
    flickr = install_flickr(server, tiny_demo, api_key=FLICKR_KEY)
    gsv = install_gsv(server, tiny_demo, api_key=GSV_KEY)
    urls |= {"wmts": wmts.base_url, "flickr": flickr.endpoint, "gsv": gsv.base_url}
    endpoints = [a for name, url in urls.items() for a in ("--endpoint", f"{name}={url}")]
    yield Services(server, wmts, flickr, gsv, endpoints)
    server.clear()
    server.stop()


def run(argv: list[str]) -> tuple[int, str, str]:
    """``python -m train ARGV``: exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def fetched(services, tmp_path_factory):
    """One full fetch of the fake Amsterdam with both keys set: root, exit code, output."""
    root = tmp_path_factory.mktemp("fetch") / "amsterdam"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FLICKR_API_KEY", FLICKR_KEY)
        env.setenv("GOOGLE_MAPS_API_KEY", GSV_KEY)
        env.delenv("GOOGLE_MAPS_SIGNING_SECRET", raising=False)
        code, out, err = run(
            services.args(root, "--extra-years", "2018", "--gsv-headings", "0", "180")
        )
    return root, code, out + err


def test_the_cli_names_match_the_fetch_module():
    assert FETCH_SOURCES == SOURCES
    assert tuple(ENDPOINTS) == FETCH_ENDPOINTS and tuple(POLITENESS) == FETCH_RATES


def test_dry_run_prints_the_plan_of_every_source_and_writes_nothing(
    services, tmp_path, monkeypatch
):
    monkeypatch.setenv("FLICKR_API_KEY", FLICKR_KEY)
    monkeypatch.setenv("GOOGLE_MAPS_API_KEY", GSV_KEY)
    out = tmp_path / "amsterdam"
    code, printed, _ = run(services.args(out, "--dry-run", "--extra-years", "2018", "2016"))
    assert code == 0
    assert "fetch plan for Amsterdam (0363, Noord-Holland)" in printed
    for line in (
        "PDOK municipality outline",
        "Leefbaarometer WFS",
        "PDOK aerial 2020_ortho25 (level 10",
        "OpenStreetMap (Overpass)",
        "Flickr:",
        "Google Street View",
        "total:",
    ):
        assert line in printed
    assert "years [2020, 2018, 2016]" in printed and "USD" in printed and "ODbL" in printed
    assert "dry run: nothing fetched" in printed
    assert not out.exists()
    assert services.image_requests() == 0


def test_a_missing_key_skips_its_source_unless_asked_for(services, tmp_path, monkeypatch):
    monkeypatch.delenv("FLICKR_API_KEY", raising=False)
    monkeypatch.setenv("GOOGLE_MAPS_API_KEY", GSV_KEY)
    code, printed, _ = run(services.args(tmp_path / "a", "--dry-run"))
    assert code == 0
    assert "flickr   skipped: no key: set FLICKR_API_KEY" in printed
    assert "Google Street View" in printed

    code, printed, error = run(services.args(tmp_path / "b", "--sources", "lbm,flickr"))
    assert code == 2 and printed == ""
    assert "flickr needs an API key: set the environment variable FLICKR_API_KEY" in error
    assert not (tmp_path / "b").exists()


def test_bad_options_are_clear_errors(services, tmp_path):
    assert run(services.args(tmp_path, "--sources", "lbm,mapillary"))[2].startswith(
        "error: --sources 'lbm,mapillary': unknown ['mapillary']"
    )
    assert "expected NAME=VALUE" in run(services.args(tmp_path, "--rate", "wms=3"))[2]
    code, _, error = run(
        ["fetch", "Atlantis", "--out", str(tmp_path / "x"), *services.endpoints, *FAST]
    )
    assert code == 2 and "no municipality named 'Atlantis'" in error


def test_a_fetch_gives_a_root_that_the_readers_open_and_fusion_trains_on(fetched, tiny_demo):
    root, code, output = fetched
    assert code == 0, output
    paths = DataRoot(root)
    manifest = json.loads((root / MANIFEST).read_text())
    assert {s: manifest["steps"][s]["status"] for s in manifest["steps"]} == dict.fromkeys(
        ("lbm", "grid", "aerial", "osm", "flickr", "gsv"), "done"
    )
    assert manifest["municipality"]["code"] == "0363"
    assert "CC BY 4.0" in manifest["licences"]["aerial"] and "ODbL" in manifest["licences"]["osm"]

    labels = read_lbm(paths.scores, paths.lbm_grid)
    demo = read_lbm(DataRoot(tiny_demo).scores, DataRoot(tiny_demo).lbm_grid)
    assert sorted(labels["jaar"].unique()) == [2018, 2020]
    assert set(labels["cell_id"]) == set(demo.loc[demo["jaar"] == 2020, "cell_id"])
    grid = read_grid(paths.grid)
    assert set(grid["cell_id"]) == set(read_grid(DataRoot(tiny_demo).grid)["cell_id"])
    assert grid["labelled"].sum() == labels.loc[labels["jaar"] == 2020, "cell_id"].nunique()
    assert set(grid["district"]) <= {"Centrum", "Zuid", "Oost", "Amsterdam"}
    with open_aerial(
        paths.aerial
    ) as aerial:  # level 10 of the RD tile matrix set, over the whole grid
        assert aerial.resolution[0] == pytest.approx(3.36, abs=0.01)
        left, bottom, right, top = aerial.bounds
        minx, miny, maxx, maxy = grid.total_bounds
        assert (
            left <= minx - 128
            and bottom <= miny - 128
            and right >= maxx + 128
            and top >= maxy + 128
        )
    catalog = read_catalog(paths.catalog)
    assert catalog.problems.empty
    counts = catalog.images["source"].value_counts()
    assert counts["flickr"] == manifest["steps"]["flickr"]["photos"] > 0
    assert counts["gsv"] == manifest["steps"]["gsv"]["views"] > 0
    assert len(read_streets(paths.streets).xy) > 0

    code, printed, _ = run(["summary", "--data", str(root)])
    assert code == 0 and "coverage per district" in printed

    code, _, error = run(
        [
            "fusion",
            "--data",
            str(root),
            "--schedule",
            "demo",
            "--epochs",
            "2",
            "--batch-size",
            "64",
            "--block-size",
            "300",
            "--ground",
            "gsv",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, error
    runs = list_runs(paths.runs, kind="fusion")
    assert len(runs) == 1
    run_folder = load_run(runs["path"].iloc[0])
    assert (
        run_folder.config["label"] == "aerial+gsv"
        and run_folder.config["aerial_backbone"] == "convnet_small"
    )
    assert set(run_folder.predictions()["split"]) == {"train", "val", "test"}
    assert "test_kendall_tau" in run_folder.metrics


def test_a_rerun_requests_no_tile_or_image_again(services, fetched, monkeypatch):
    root, code, _ = fetched
    assert code == 0
    monkeypatch.setenv("FLICKR_API_KEY", FLICKR_KEY)
    monkeypatch.setenv("GOOGLE_MAPS_API_KEY", GSV_KEY)
    before = services.image_requests()
    code, printed, _ = run(
        services.args(root, "--extra-years", "2018", "--gsv-headings", "0", "180")
    )
    assert code == 0
    assert services.image_requests() == before
    for step in ("lbm", "grid", "aerial", "osm", "flickr", "gsv"):
        assert f"{step}: done before, skipped" in printed

    code, printed, _ = run(
        services.args(
            root, "--extra-years", "2018", "--gsv-headings", "0", "180", "--redo", "aerial", "gsv"
        )
    )
    assert code == 0 and "aerial: done" in printed
    assert services.image_requests() == before  # the clients skip what is on disk


def test_keys_never_reach_the_output_or_any_file(fetched):
    root, _, output = fetched
    for key in (FLICKR_KEY, GSV_KEY):
        assert key not in output
        for path in root.rglob("*"):
            if path.is_file():
                assert key.encode() not in path.read_bytes(), path


def test_a_failing_step_stops_the_fetch_and_a_rerun_resumes_it(services, tiny_demo, tmp_path):
    out = tmp_path / "amsterdam"
    served = Municipality("Amsterdam", "0363", "Noord-Holland", demo_outline(tiny_demo))
    first_tile = next(iter(rd_tile_matrix_set().nearest(4).tile_range(aerial_bbox(served))))
    services.wmts.inject(*first_tile, Response("Forbidden", status=403))
    code, printed, _ = run(services.args(out, "--sources", "lbm,aerial"))
    assert code == 1
    assert (
        "error: aerial failed:" in printed
        and "HTTP 403" in printed
        and "rerun the same command" in printed
    )
    steps = json.loads((out / MANIFEST).read_text())["steps"]
    assert [steps[s]["status"] for s in ("lbm", "grid", "aerial")] == ["done", "done", "failed"]
    assert not (out / "aerial" / "aerial.tif").exists()

    tiles_before = sum(services.wmts.tile_requests.values())
    code, printed, _ = run(services.args(out, "--sources", "lbm,aerial"))
    assert code == 0 and "lbm: done before, skipped" in printed
    assert sum(services.wmts.tile_requests.values()) == tiles_before + 1  # only the failed tile
    assert (out / "aerial" / "aerial.tif").is_file()


def test_a_downloaded_release_and_osm_file_are_imported(services, fetched, tiny_demo, tmp_path):
    demo, (root, _, _) = DataRoot(tiny_demo), fetched
    out = tmp_path / "amsterdam"
    code, printed, _ = run(
        services.args(
            out,
            "--sources",
            "lbm,osm",
            "--extra-years",
            "2018",
            "2016",
            "--lbm-release",
            f"{demo.scores},{demo.lbm_grid}",
            "--osm-file",
            str(root / "cache" / "osm" / "streets.osm"),
        )
    )
    assert code == 0, printed
    assert "Leefbaarometer release import" in printed and "OpenStreetMap file import" in printed
    steps = json.loads((out / MANIFEST).read_text())["steps"]
    assert steps["lbm"]["params"]["release"] == [str(demo.scores), str(demo.lbm_grid)]
    assert set(steps["lbm"]["cells_per_year"]) == {"2016", "2018", "2020"}
    paths = DataRoot(out)
    assert len(read_streets(paths.streets).xy) == steps["osm"]["street_nodes"]
    assert read_catalog(paths.catalog).images.empty  # no street-level source: an empty catalog
