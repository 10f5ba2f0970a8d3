"""The fetch end to end (:func:`core.ingest.run_fetch`), against one loopback server running all
six fakes; and the library's parts: the config, the source registry and the plan.

The fakes serve the tiny demo city as Amsterdam: its extent is the PDOK outline, its labels the
Leefbaarometer WFS, its aerial raster the PDOK WMTS, its streets, water and parks Overpass, its
Flickr photos and GSV panoramas the Flickr and Street View APIs. A fetch of "amsterdam" must give
a data root that the readers open and the fusion model trains on, as on the demo city.

PDOK also serves two towns of the province Flevoland on the demo city: Westdorp, its western
cells, and Oostdorp, its eastern cells, with a strip of cells between them in neither (and
Verweg, far away in Utrecht). A fetch of both, by name or as the province, is one root over
their union.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import json
import shutil
import subprocess
import sys
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from pytest_httpserver import HTTPServer
from werkzeug import Response

from core.dataroot import DataRoot
from core.grid import cell_center, cell_id, cell_polygons, read_grid
from core.ingest import SOURCES, FetchArea, FetchConfig, Source, run_fetch
from core.ingest.area import Outline
from core.ingest.config import (
    CLIENT_NAMES,
    ENDPOINT_NAMES,
    OPT_IN_SOURCES,
    SOURCE_NAMES,
    STEP_NAMES,
)
from core.ingest.grid import cell_municipalities
from core.ingest.manifest import MANIFEST, Manifest
from core.ingest.plan import choose_sources, format_plan, make_plan
from core.ingest.steps import AerialSource, FlickrSource, LbmSource, client_names, endpoint_names
from core.io import jsonable, utc_now
from core.runs import list_runs, load_run
from core.sources.aerial import open_aerial
from core.sources.catalog import read_catalog
from core.sources.flickr import REUSABLE_LICENSES
from core.sources.http import Estimate, Politeness
from core.sources.lbm import read_lbm
from core.sources.mapillary import tiles
from core.sources.pdok_boundaries import Municipality
from core.sources.street_fetch import grid_bbox_wgs84
from core.sources.wmts import rd_tile_matrix_set
from core.summary import summarize
from core.ugdata import read_streets
from tests.fakes.amsterdam_panorama import install_amsterdam_panorama
from tests.fakes.flickr import FakeFlickr, install_flickr
from tests.fakes.gsv import FakeGsv, install_gsv
from tests.fakes.lbm_wfs import install_lbm_wfs
from tests.fakes.mapillary import install_mapillary
from tests.fakes.overpass import install_overpass
from tests.fakes.pdok_boundaries import demo_outline, install_pdok_boundaries, municipality
from tests.fakes.wmts import FakeWmts, install_wmts
from train.cli import main

FLICKR_KEY = "flickr-Key-5f1d9c0e7a"
GSV_KEY = "AIzaGsv-Key-0b7c1e9d44"
MAPILLARY_TOKEN = "MLY|7777777|0b7c1e9d44aa0b7c1e9d44aa"
#: Coarse aerial (level 10, 3.36 m/px: a few tiles), no rate limit, the demo's photo dates.
FAST = {"resolution": 4.0, "rate": {"all": 0.0}, "flickr_since": "2000-01-01", "quiet": True}
#: The two towns on the demo city: name, code, and which of the demo's cells are theirs.
TOWNS = (("Westdorp", "9001", "west"), ("Oostdorp", "9002", "east"))


def town_cells(tiny_demo: Path) -> dict[str, np.ndarray]:
    """The demo's cell ids of each town, by code: the western and eastern 40 % of the extent,
    cut on cell edges (a cell's centre lies 50 m inside them)."""
    ids = read_grid(DataRoot(tiny_demo).grid)["cell_id"].to_numpy()
    x, _ = cell_center(ids)
    minx, _, maxx, _ = demo_outline(tiny_demo).bounds
    cut = round((maxx - minx) * 0.4, -2)
    side = {"west": x < minx + cut, "east": x > maxx - cut}
    return {code: ids[side[where]] for _, code, where in TOWNS}


def town_records(tiny_demo: Path) -> list[dict]:
    """The PDOK records of the two towns and of Verweg, far away in another province."""
    cells = town_cells(tiny_demo)
    towns = [
        municipality(name, code, "Flevoland", shapely.union_all(cell_polygons(cells[code])))
        for name, code, _ in TOWNS
    ]
    return [
        *towns,
        municipality("Verweg", "9003", "Utrecht", shapely.box(135000, 455000, 136000, 456000)),
    ]


@dataclass
class Services:
    """The loopback server with every fake, and the endpoints pointing the fetch at it."""

    server: HTTPServer
    wmts: FakeWmts
    flickr: FakeFlickr
    gsv: FakeGsv
    endpoints: dict[str, str]

    def config(self, out: Path, **options: Any) -> FetchConfig:
        """A fetch of "amsterdam" 2020 into ``out`` from the fakes, fast, with ``options``."""
        values = {"municipality": "amsterdam", "year": 2020, "out": str(out)}
        return FetchConfig(**values | {"endpoint": dict(self.endpoints)} | FAST | options)

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
        "pdok": install_pdok_boundaries(server, tiny_demo, extra=town_records(tiny_demo)),
        "lbm": install_lbm_wfs(server, tiny_demo),
        "overpass": install_overpass(server, tiny_demo),
    }
    wmts = install_wmts(server, tiny_demo)
    flickr = install_flickr(server, tiny_demo, api_key=FLICKR_KEY)
    gsv = install_gsv(server, tiny_demo, api_key=GSV_KEY)
    urls |= {"wmts": wmts.endpoint, "flickr": flickr.endpoint, "gsv": gsv.endpoint}
    yield Services(server, wmts, flickr, gsv, urls)
    server.clear()
    server.stop()


def fetch(config: FetchConfig) -> tuple[int, str]:
    """:func:`run_fetch`: its exit code and everything it said (and printed)."""
    said: list[str] = []
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = run_fetch(config, say=said.append)
    return code, "\n".join(said) + printed.getvalue()


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
        code, output = fetch(services.config(root, extra_years=[2018], gsv_headings=[0, 180]))
    return root, code, output


# --- the config ------------------------------------------------------------------------------


def test_the_config_names_are_the_registry_names():
    assert tuple(SOURCES) == SOURCE_NAMES
    assert tuple(endpoint_names()) == ENDPOINT_NAMES
    assert tuple(client_names()) == CLIENT_NAMES
    assert len(set(ENDPOINT_NAMES)) == len(ENDPOINT_NAMES)  # one service per name
    assert len(set(CLIENT_NAMES)) == len(CLIENT_NAMES)
    labels = [name for name, source in SOURCES.items() if source.feeds_grid]
    others = [name for name, source in SOURCES.items() if not source.feeds_grid]
    assert (*labels, "grid", *others) == STEP_NAMES


def test_the_config_has_plain_typed_fields_each_with_a_docstring():
    tree = ast.parse(inspect.getsource(FetchConfig))
    body = tree.body[0].body
    documented = {
        statement.target.id
        for statement, after in zip(body, body[1:], strict=False)
        if isinstance(statement, ast.AnnAssign)
        and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
        and isinstance(after.value.value, str)
        and after.value.value.strip()
    }
    names = [f.name for f in fields(FetchConfig)]
    assert documented == set(names)
    assert names[0] == "municipality" and "dry_run" in names and "quiet" in names
    plain = (str, int, float, bool, type(None), list, dict, typing.Literal, type(str | None))
    hints = typing.get_type_hints(FetchConfig)

    def is_plain(hint: Any) -> bool:
        origin = typing.get_origin(hint)
        if origin is None:
            return hint in plain
        return origin in plain and all(
            is_plain(a) or origin is typing.Literal for a in typing.get_args(hint)
        )

    assert all(is_plain(hints[name]) for name in names), hints


def test_the_config_module_is_cheap_to_import():
    heavy = ["geopandas", "pyogrio", "osmnx", "requests", "shapely", "pandas", "pyproj"]
    code = (
        "import sys, core.ingest, core.ingest.config; from core.ingest import FetchConfig; "
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert loaded.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"rate": {"wms": 3}}, "--rate wms=3: expected NAME=VALUE with NAME one of"),
        ({"rate": {"all": -1}}, "--rate: requests per second cannot be negative"),
        ({"rate": {"gsv": "fast"}}, "--rate gsv=fast: not a number"),
        ({"endpoint": {"wfs": "http://x"}}, "--endpoint wfs=http://x: expected NAME=VALUE"),
        ({"flickr_licenses": "cc-by"}, "--flickr-licenses 'cc-by': expected comma-separated ids"),
        ({"flickr_licenses": ""}, "--flickr-licenses '': expected comma-separated ids"),
        ({"flickr_since": "last year"}, "--flickr-since 'last year': expected an ISO date"),
        ({"lbm_release": ["a.csv", "b.gpkg", "c.gpkg"]}, "--lbm-release ['a.csv', 'b.gpkg', "),
        ({"lbm_release": []}, "--lbm-release []: expected the scores CSV and the grid"),
        (
            {"sources": ["lbm", "instagram"]},
            "--sources ['lbm', 'instagram']: unknown ['instagram']",
        ),
        ({"sources": []}, "--sources: give at least one of"),
        ({"redo": ["labels"]}, "--redo ['labels']: unknown ['labels']"),
        ({"resolution": 0}, "--resolution 0.0: must be > 0"),
        ({"gsv_spacing": -5}, "--gsv-spacing -5.0: must be > 0"),
        ({"gsv_headings": []}, "--gsv-headings: give at least one heading"),
    ],
)
def test_bad_options_are_clear_errors_naming_the_option(options, message):
    with pytest.raises(ValueError) as error:
        FetchConfig("amsterdam", **options)
    assert str(error.value).startswith(message)


def test_the_config_parses_its_values():
    config = FetchConfig(
        "'s-Gravenhage",
        year=2022,
        extra_years=[2020, 2022, 2018],
        sources=["osm", "lbm", "osm"],
        flickr_licenses="4, 9",
        lbm_release=["release.zip"],
        rate={"all": 2, "gsv": "5"},
        gsv_headings=[0, 180],
    )
    assert config.out_path == Path("data/s-gravenhage")
    assert config.years == [2022, 2020, 2018]
    assert config.sources == ["osm", "lbm"]
    assert config.licence_ids == frozenset({4, 9})
    assert config.release == (Path("release.zip"), None)
    assert config.rate == {"all": 2.0, "gsv": 5.0}
    assert config.rate_for("gsv") == 5.0 and config.rate_for("lbm") == 2.0
    assert config.gsv_headings == [0.0, 180.0]
    assert FetchConfig("x", flickr_licenses="reusable").licence_ids == REUSABLE_LICENSES
    assert FetchConfig("x").licence_ids is None and FetchConfig("x").rate_for("lbm") is None
    assert FetchConfig("x", out="here").out_path == Path("here")
    assert FetchConfig("x", flickr_since="2010-05-01").since.isoformat() == "2010-05-01T00:00:00"


# --- the sources -----------------------------------------------------------------------------


def test_every_source_declares_its_name_licence_service_and_politeness():
    assert list(SOURCES) == [  # data-flow order
        "lbm",
        "aerial",
        "osm",
        "flickr",
        "gsv",
        "amsterdam_panorama",
        "mapillary",
    ]
    config = FetchConfig("amsterdam")
    for name, source in SOURCES.items():
        assert issubclass(source, Source) and not inspect.isabstract(source)
        assert source.name == name
        assert isinstance(source.licence, str) and len(source.licence) > 10
        assert isinstance(source.service, str) and source.endpoint.startswith("https://")
        assert source.politeness and all(
            isinstance(p, Politeness) for p in source.politeness.values()
        )
        assert (source.key_env is None) == (source.key_help == "")
        built = source(config)  # no --endpoint, no --rate: the defaults
        assert built.endpoint == source.endpoint and built.politeness == source.politeness
    assert [s.name for s in SOURCES.values() if s.key_env] == ["flickr", "gsv", "mapillary"]
    assert [s.name for s in SOURCES.values() if s.feeds_grid] == ["lbm"]
    assert [s.name for s in SOURCES.values() if s.opt_in] == ["amsterdam_panorama", "mapillary"]


def test_endpoint_and_rate_options_reach_each_source(monkeypatch):
    config = FetchConfig(
        "amsterdam",
        endpoint={"wmts": "http://mirror.test/wmts"},
        rate={"all": 1.5, "flickr-images": 0},
    )
    aerial = AerialSource(config)
    assert aerial.endpoint == "http://mirror.test/wmts"
    assert AerialSource.endpoint.startswith("https://service.pdok.nl/")  # the default stays
    assert aerial.client().politeness.requests_per_second == 1.5
    flickr = FlickrSource(config)
    assert flickr.politeness["flickr"].requests_per_second == 1.5
    assert flickr.politeness["flickr-images"].requests_per_second == 0
    assert flickr.endpoint == FlickrSource.endpoint
    lbm = LbmSource(config).politeness["lbm"]
    assert lbm.requests_per_second == 1.5 and lbm.concurrency == 1  # only the rate changes
    assert Outline(config).politeness["pdok"].requests_per_second == 1.5
    monkeypatch.setenv("FLICKR_API_KEY", " a-key ")
    assert flickr.key() == "a-key" and flickr.client().secrets == ("a-key",)
    monkeypatch.delenv("FLICKR_API_KEY")
    assert flickr.key() is None and LbmSource.key() is None


class CounterSource(Source):
    """A source that downloads nothing: it writes how many it was asked for."""

    name = "counter"
    licence = "counted by the test, no licence needed"
    service = "counter"
    endpoint = "https://counter.invalid/api"
    politeness = {"counter": Politeness(requests_per_second=2.0)}

    def params(self, area: FetchArea) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "municipality": area.code}

    def estimate(self, root: DataRoot, area: FetchArea) -> Estimate:
        return Estimate("Counter service", 3, 3000, 2.0, "a note from the counter")

    def fetch(self, root: DataRoot, area: FetchArea, say=print) -> dict[str, Any]:
        path = root.root / "counter" / "count.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{area.name}: {len(read_grid(root.grid))} cells")
        say("counter: counted")
        return {"outputs": [str(path.relative_to(root.root))], "counted": 3}


@pytest.fixture
def registry():
    """:data:`SOURCES`, which a test may change, restored (in its order) after the test."""
    saved = dict(SOURCES)
    yield SOURCES
    SOURCES.clear()
    SOURCES.update(saved)


def test_a_registered_source_is_planned_fetched_and_recorded_without_other_edits(
    services, tmp_path, monkeypatch, registry
):
    monkeypatch.delenv("FLICKR_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_MAPS_API_KEY", raising=False)
    for name in ("aerial", "osm"):  # keep the test short: labels, grid, then the new source
        del registry[name]
    registry["counter"] = CounterSource
    out = tmp_path / "amsterdam"
    code, printed = fetch(services.config(out))
    assert code == 0, printed
    assert (
        "counter  Counter service: 3 requests, 0.0 MB, 2 s at the rate limit; a note from the "
        "counter" in printed
    )
    assert "flickr   skipped: no key: set FLICKR_API_KEY" in printed
    assert "counter: counted" in printed and "counter: done counted 3" in printed
    assert printed.index("grid: done") < printed.index("counter: fetching")
    assert (out / "counter" / "count.txt").read_text().startswith("Amsterdam: ")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["sources"] == ["lbm", "counter"]
    assert manifest["skipped"] == {
        "flickr": "no key: set FLICKR_API_KEY (https://www.flickr.com/services/api/keys/)",
        "gsv": "no key: set GOOGLE_MAPS_API_KEY (a Google Maps Platform key with the Street "
        "View Static API enabled)",
        "amsterdam_panorama": "not in --sources (runs only when named)",
        "mapillary": "not in --sources (runs only when named)",
    }
    assert manifest["licences"]["counter"] == CounterSource.licence
    assert manifest["endpoints"]["counter"] == CounterSource.endpoint
    step = manifest["steps"]["counter"]
    assert step["status"] == "done" and step["counted"] == 3
    assert step["licence"] == CounterSource.licence and step["outputs"] == ["counter/count.txt"]

    code, printed = fetch(services.config(out))
    assert code == 0 and "counter: done before, skipped (--redo counter runs it again)" in printed


def test_the_plan_counts_every_registered_source(services, tmp_path, registry):
    registry["counter"] = CounterSource
    config = services.config(tmp_path / "x", sources=["aerial"])
    area = Outline(config).find()
    chosen, skipped = choose_sources(config)
    assert list(chosen) == ["aerial"]
    assert skipped == dict.fromkeys(
        ["lbm", "osm", "flickr", "gsv", "amsterdam_panorama", "mapillary", "counter"],
        "not in --sources",
    )
    lines = make_plan(config, area, chosen, skipped)
    assert [line.source for line in lines] == ["pdok", *SOURCE_NAMES, "counter"]
    text = format_plan(area, config.out_path, lines).splitlines()
    assert text[-2] == "  counter  skipped: not in --sources"
    assert text[-1].startswith("  total: 8 requests")  # the outline's 1 and the aerial's 7

    chosen, skipped = choose_sources(services.config(tmp_path / "x", sources=None))
    assert "counter" in chosen and isinstance(chosen["counter"], CounterSource)


def test_the_manifest_records_plain_json_and_knows_what_is_done(tmp_path):
    root = DataRoot(tmp_path)
    (tmp_path / "out.txt").write_text("x")
    params = {"bbox": (1.0, 2.0), "file": Path("a/b.csv"), "year": 2020}
    manifest = Manifest(root, {"bbox_rd": (1.0, 2.0)})
    manifest.record("step", params, "done", outputs=["out.txt"], count=jsonable(3))
    again = Manifest(root, {"bbox_rd": (1.0, 2.0)})
    assert again.data["created"] == manifest.data["created"]
    assert again.data["steps"]["step"]["params"] == {
        "bbox": [1.0, 2.0],
        "file": "a/b.csv",
        "year": 2020,
    }
    assert again.done("step", params) and not again.done("step", params | {"year": 2018})
    (tmp_path / "out.txt").unlink()
    assert not again.done("step", params)  # its output is gone


def test_jsonable_and_utc_now():
    import numpy as np

    assert jsonable({1: (np.int64(2), np.array([0.5, np.nan])), "p": Path("a/b")}) == {
        "1": [2, [0.5, None]],
        "p": "a/b",
    }
    assert jsonable(float("inf")) is None and type(jsonable(np.float32(1.5))) is float
    assert utc_now().endswith("+00:00") and len(utc_now()) == 25
    assert len(utc_now("milliseconds")) == 29


# --- the fetch -------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_of_every_source_and_writes_nothing(
    services, tmp_path, monkeypatch
):
    monkeypatch.setenv("FLICKR_API_KEY", FLICKR_KEY)
    monkeypatch.setenv("GOOGLE_MAPS_API_KEY", GSV_KEY)
    out = tmp_path / "amsterdam"
    code, printed = fetch(services.config(out, dry_run=True, extra_years=[2018, 2016]))
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
    code, printed = fetch(services.config(tmp_path / "a", dry_run=True))
    assert code == 0
    assert "flickr   skipped: no key: set FLICKR_API_KEY" in printed
    assert "Google Street View" in printed

    with pytest.raises(ValueError, match="flickr needs an API key: set the environment variable"):
        fetch(services.config(tmp_path / "b", sources=["lbm", "flickr"]))
    assert not (tmp_path / "b").exists()


def test_an_unknown_municipality_or_missing_file_is_a_clear_error(services, tmp_path):
    with pytest.raises(ValueError, match="no municipality named 'Atlantis'"):
        fetch(services.config(tmp_path / "x", municipality="Atlantis"))
    with pytest.raises(FileNotFoundError, match="missing.osm: file not found"):
        fetch(services.config(tmp_path / "x", osm_file=str(tmp_path / "missing.osm")))
    assert not (tmp_path / "x").exists()


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

    assert "coverage per district" in summarize(root)

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
    code, printed = fetch(services.config(root, extra_years=[2018], gsv_headings=[0, 180]))
    assert code == 0
    assert services.image_requests() == before
    for step in ("lbm", "grid", "aerial", "osm", "flickr", "gsv"):
        assert f"{step}: done before, skipped" in printed

    code, printed = fetch(
        services.config(root, extra_years=[2018], gsv_headings=[0, 180], redo=["aerial", "gsv"])
    )
    assert code == 0 and "aerial: done" in printed and "gsv: done" in printed
    assert "lbm: done before, skipped" in printed
    assert services.image_requests() == before  # the clients skip what is on disk


def test_more_aerial_years_are_fetched_as_mosaics_named_for_their_year(services, fetched, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(fetched[0], root)
    before = sum(services.wmts.tile_requests.values())
    code, printed = fetch(services.config(root, dry_run=True, aerial_years=[2019]))
    assert code == 0 and "PDOK aerial 2020_ortho25 (level 10" in printed and "+ 2019" in printed
    code, printed = fetch(services.config(root, sources=["aerial"], aerial_years=[2019, 2020]))
    assert code == 0 and "aerial: done" in printed
    years = DataRoot(root).aerial_years()
    assert years == {2019: root / "aerial" / "2019.tif", 2020: root / "aerial" / "aerial.tif"}
    with rasterio.open(years[2019]) as later, rasterio.open(years[2020]) as first:
        assert later.tags()["WMTS_LAYER"] == "2019_ortho25"
        assert (later.bounds, later.res) == (first.bounds, first.res)
    # the 2019 tiles were asked for once each; the 2020 ones came from the tile cache
    assert sum(services.wmts.tile_requests.values()) - before == len(services.wmts.tile_requests)


def test_keys_never_reach_the_output_or_any_file(fetched):
    root, _, output = fetched
    for key in (FLICKR_KEY, GSV_KEY):
        assert key not in output
        for path in root.rglob("*"):
            if path.is_file():
                assert key.encode() not in path.read_bytes(), path


def test_the_open_street_level_sources_fetch_into_the_catalog_and_fusion_trains_on_them(
    services, tiny_demo, tmp_path, monkeypatch
):
    bbox = grid_bbox_wgs84(DataRoot(tiny_demo).grid)
    panoramas = install_amsterdam_panorama(services.server, bbox, count=5)
    images = install_mapillary(services.server, bbox, token=MAPILLARY_TOKEN, count=8)
    monkeypatch.setenv("MAPILLARY_TOKEN", MAPILLARY_TOKEN)
    out = tmp_path / "amsterdam"
    endpoints = services.endpoints | {
        "amsterdam_panorama": panoramas.endpoint,
        "mapillary": images.endpoint,
    }

    def config(**options: Any) -> FetchConfig:
        return services.config(
            out,
            sources=["lbm", "aerial", "amsterdam_panorama", "mapillary"],
            panorama_headings=[0, 120, 240],
            panorama_since="2018-01-01",
            endpoint=endpoints,
            **options,
        )

    code, printed = fetch(config())
    assert code == 0, printed
    assert "Amsterdam panoramas: 4 requests" in printed  # 3 panoramas since 2018, 1 page
    assert "Mapillary: " in printed and "CC BY-SA 4.0" in printed
    catalog = read_catalog(DataRoot(out).catalog, check_images=True)
    assert catalog.problems.empty
    counts = catalog.images["source"].value_counts().to_dict()
    assert counts == {"amsterdam_panorama": 3 * 3, "mapillary": 8}
    assert (
        catalog.images.loc[catalog.images["source"] == "amsterdam_panorama", "captured_at"]
        >= pd.Timestamp("2018-01-01", tz="UTC")
    ).all()
    steps = json.loads((out / MANIFEST).read_text())["steps"]
    assert steps["amsterdam_panorama"]["panoramas_per_year"] == {"2019": 2, "2021": 1}
    assert steps["mapillary"]["images"] == 8 and steps["mapillary"]["status"] == "done"
    assert steps["mapillary"]["licence"].startswith("Mapillary: every image CC BY-SA 4.0")
    for name in ("amsterdam_panorama", "mapillary"):
        assert (out / "cache" / "http" / f"{name}.sqlite").is_file()
    assert MAPILLARY_TOKEN not in printed
    for path in out.rglob("*"):
        if path.is_file():
            assert b"0b7c1e9d44aa" not in path.read_bytes(), path

    # the fetched labels, mosaic and the two open sources train a fusion run
    options = ["--data", str(out), "--schedule", "demo", "--epochs", "2", "--batch-size", "64"]
    options += ["--block-size", "300", "--ground", "amsterdam_panorama,mapillary"]
    code, _, error = run(["fusion", *options, "--device", "cpu"])
    assert code == 0, error
    trained = load_run(list_runs(DataRoot(out).runs, kind="fusion")["path"].iloc[0])
    assert trained.config["label"] == "aerial+amsterdam_panorama+mapillary"
    pooled = trained.metrics["ground_images"]  # the images inside the labelled cells
    assert set(pooled) == {"amsterdam_panorama", "mapillary"} and sum(pooled.values()) > 0
    assert pooled["amsterdam_panorama"] <= 9 and pooled["mapillary"] <= 8

    # a redo asks only the plan's questions again: the searches come from the cache
    asked = panoramas.api_requests, images.searches
    fetched_images = sum(panoramas.image_requests.values()), sum(images.thumb_requests.values())
    code, printed = fetch(config(redo=["amsterdam_panorama", "mapillary"]))
    assert code == 0, printed
    sample = min(4, len(tiles(bbox)))
    assert (panoramas.api_requests, images.searches) == (asked[0] + 1, asked[1] + sample)
    assert (
        sum(panoramas.image_requests.values()),
        sum(images.thumb_requests.values()),
    ) == fetched_images


def test_a_failing_step_stops_the_fetch_and_a_rerun_resumes_it(services, tiny_demo, tmp_path):
    out = tmp_path / "amsterdam"
    served = FetchArea("Amsterdam", "0363", "Noord-Holland", demo_outline(tiny_demo))
    bbox_rd = AerialSource.bbox_rd(served)
    first_tile = next(iter(rd_tile_matrix_set().nearest(4).tile_range(bbox_rd)))
    services.wmts.inject(*first_tile, Response("Forbidden", status=403))
    code, printed = fetch(services.config(out, sources=["lbm", "aerial"]))
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
    code, printed = fetch(services.config(out, sources=["lbm", "aerial"]))
    assert code == 0 and "lbm: done before, skipped" in printed
    assert sum(services.wmts.tile_requests.values()) == tiles_before + 1  # only the failed tile
    assert (out / "aerial" / "aerial.tif").is_file()


def test_a_downloaded_release_and_osm_file_are_imported(services, fetched, tiny_demo, tmp_path):
    demo, (root, _, _) = DataRoot(tiny_demo), fetched
    out = tmp_path / "amsterdam"
    code, printed = fetch(
        services.config(
            out,
            sources=["lbm", "osm"],
            extra_years=[2018, 2016],
            lbm_release=[str(demo.scores), str(demo.lbm_grid)],
            osm_file=str(root / "cache" / "osm" / "streets.osm"),
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


# --- several municipalities, one root --------------------------------------------------------


def test_the_config_takes_several_municipalities_or_a_whole_province():
    several = FetchConfig("westdorp, Oostdorp,westdorp")
    assert several.names == ["westdorp", "Oostdorp"] and not several.whole_province
    assert several.out_path == Path("data/westdorp-and-1-more")
    assert FetchConfig(["Bergen (NH)", "'s-Gravenhage"]).names == ["Bergen (NH)", "'s-Gravenhage"]
    province = FetchConfig("all", province="Noord-Holland")
    assert province.whole_province and province.out_path == Path("data/noord-holland")
    assert FetchConfig("ALL", province="Fryslân", out="here").out_path == Path("here")
    assert FetchConfig("amsterdam").names == ["amsterdam"]  # one name: as before
    with pytest.raises(ValueError, match="municipality 'all': give the province with --province"):
        FetchConfig("all")
    with pytest.raises(ValueError, match=r"municipality \['amsterdam', 'all'\]: 'all' stands"):
        FetchConfig("amsterdam,all", province="Noord-Holland")
    with pytest.raises(ValueError, match="municipality: give the municipality's official name"):
        FetchConfig(" , ")


@pytest.fixture(scope="module")
def region(services, tmp_path_factory):
    """One full fetch of Westdorp and Oostdorp with both keys set: root, exit code, output."""
    root = tmp_path_factory.mktemp("fetch") / "towns"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FLICKR_API_KEY", FLICKR_KEY)
        env.setenv("GOOGLE_MAPS_API_KEY", GSV_KEY)
        env.delenv("GOOGLE_MAPS_SIGNING_SECRET", raising=False)
        code, output = fetch(services.config(root, municipality="westdorp,oostdorp"))
    return root, code, output


def test_several_municipalities_are_one_root_over_their_union(region, tiny_demo):
    root, code, output = region
    assert code == 0, output
    cells = town_cells(tiny_demo)
    union = shapely.union_all(cell_polygons(np.concatenate(list(cells.values()))))
    km2 = union.area / 1e6
    assert f"fetch plan for Westdorp + Oostdorp: 2 municipalities (Flevoland), {km2:.1f} km2" in (
        output
    )
    assert "municipalities: Westdorp (9001), Oostdorp (9002)" in output
    assert "PDOK municipality outlines: 2 requests" in output

    grid = read_grid(DataRoot(root).grid)
    assert sorted(grid["cell_id"]) == sorted(np.concatenate(list(cells.values())))
    for name, code_, _ in TOWNS:
        theirs = grid[grid["gemeente_code"] == code_]
        assert set(theirs["cell_id"]) == set(cells[code_]) and len(theirs) > 0
        assert set(theirs["gemeente_naam"]) == set(theirs["district"]) == {name}

    paths = DataRoot(root)
    labels = read_lbm(paths.scores, paths.lbm_grid)
    demo = read_lbm(DataRoot(tiny_demo).scores, DataRoot(tiny_demo).lbm_grid)
    demo = demo[demo["jaar"] == 2020]
    for ids in cells.values():
        expected = set(demo.loc[demo["cell_id"].isin(ids), "cell_id"])
        assert set(labels.loc[labels["cell_id"].isin(ids), "cell_id"]) == expected
        assert expected  # labels of both towns, and none of the strip between them
    assert set(labels["cell_id"]) <= set(grid["cell_id"])
    assert grid["labelled"].sum() == labels["cell_id"].nunique()

    images = read_catalog(paths.catalog).images
    for source in ("flickr", "gsv"):
        rows = images[images["source"] == source]
        assert all(rows["cell_id"].isin(ids).any() for ids in cells.values()), source
    # Street View is looked up along the towns' streets only: a panorama lies within the 50 m
    # search radius of a town, never deep in the 300 m strip between them
    gsv_rows = images[images["source"] == "gsv"]
    assert shapely.contains_xy(union.buffer(60), gsv_rows["x"], gsv_rows["y"]).all()
    demo_ids = read_grid(DataRoot(tiny_demo).grid)["cell_id"].to_numpy()
    assert not shapely.contains_xy(union.buffer(60), *cell_center(demo_ids)).all()

    manifest = json.loads((root / MANIFEST).read_text())
    assert [(m["name"], m["code"], m["province"]) for m in manifest["municipalities"]] == [
        ("Westdorp", "9001", "Flevoland"),
        ("Oostdorp", "9002", "Flevoland"),
    ]
    assert manifest["asked"] == {"municipality": ["westdorp", "oostdorp"], "province": None}
    assert manifest["municipality"]["code"] == "9001,9002"
    assert manifest["municipality"]["area_km2"] == pytest.approx(union.area / 1e6, abs=1e-3)
    minx, miny, maxx, maxy = union.bounds
    margin = AerialSource.margin_m
    assert manifest["steps"]["aerial"]["params"]["bbox"] == [
        minx - margin,
        miny - margin,
        maxx + margin,
        maxy + margin,
    ]
    assert manifest["steps"]["lbm"]["params"]["bbox"] == [minx, miny, maxx, maxy]


def test_the_same_municipalities_continue_a_root_and_others_are_refused(
    services, region, fetched, monkeypatch
):
    root, code, _ = region
    assert code == 0
    monkeypatch.setenv("FLICKR_API_KEY", FLICKR_KEY)
    monkeypatch.setenv("GOOGLE_MAPS_API_KEY", GSV_KEY)
    before = services.image_requests()
    code, printed = fetch(services.config(root, municipality="Oostdorp,westdorp"))
    assert code == 0
    for step in STEP_NAMES:
        if step not in OPT_IN_SOURCES:  # a fetch without --sources leaves them out
            assert f"{step}: done before, skipped" in printed
    assert services.image_requests() == before

    manifest = (root / MANIFEST).read_bytes()
    others = {
        "westdorp": "[Westdorp (9001)]",
        "westdorp,oostdorp,amsterdam": "[Amsterdam (0363), Westdorp (9001), Oostdorp (9002)]",
    }
    for other, listed in others.items():
        for dry_run in (False, True):
            with pytest.raises(ValueError) as error:
                fetch(services.config(root, municipality=other, dry_run=dry_run))
            assert str(error.value) == (
                f"{root}: holds a fetch of [Westdorp (9001), Oostdorp (9002)], not of the "
                f"municipalities asked for {listed}; rerun with the same municipalities to "
                "continue it, or fetch into another --out"
            )
    assert (root / MANIFEST).read_bytes() == manifest
    amsterdam, _, _ = fetched
    with pytest.raises(ValueError, match=r"holds a fetch of \[Amsterdam \(0363\)\], not of"):
        fetch(services.config(amsterdam, municipality="westdorp,oostdorp", dry_run=True))


def test_a_province_fetches_every_municipality_it_holds(services, region, tmp_path):
    root, _, _ = region
    out = tmp_path / "flevoland"
    services.server.clear_log()
    code, printed = fetch(
        services.config(out, municipality="all", province="flevoland", sources=["lbm"])
    )
    assert code == 0, printed
    assert "fetch plan for Flevoland: 2 municipalities (Flevoland)" in printed
    assert "PDOK municipality outlines of a province: 1 requests" in printed
    asked = [
        r.args.get("ligt_in_provincie_naam")
        for r, _ in services.server.log
        if r.path.endswith("/gemeentegebied/items")
    ]
    assert asked == ["flevoland", "Flevoland"]  # as typed, then as PDOK writes it
    manifest = json.loads((out / MANIFEST).read_text())
    assert [m["code"] for m in manifest["municipalities"]] == ["9001", "9002"]
    assert manifest["asked"] == {"municipality": ["all"], "province": "flevoland"}
    grid = read_grid(DataRoot(out).grid)
    by_name = read_grid(DataRoot(root).grid)
    assert grid[["cell_id", "gemeente_code"]].equals(by_name[["cell_id", "gemeente_code"]])

    with pytest.raises(ValueError, match="no municipality lies in a province named 'Atlantis'"):
        fetch(services.config(tmp_path / "x", municipality="all", province="atlantis"))
    assert not (tmp_path / "x").exists()


def test_an_unknown_municipality_in_a_list_is_a_clear_error_before_anything_is_written(
    services, tmp_path
):
    with pytest.raises(ValueError) as error:
        fetch(services.config(tmp_path / "x", municipality="westdorp,atlantis,nergenshuizen"))
    message = str(error.value)
    assert "no municipality named 'Atlantis'" in message
    assert "no municipality named 'Nergenshuizen'" in message
    assert "Westdorp" not in message
    assert not (tmp_path / "x").exists()


def test_each_cell_lies_in_one_municipality():
    """A cell's municipality is the one holding its centre; on a shared border the first; just
    outside every outline the nearest."""
    west = Municipality("West", "1", "P", shapely.box(120000, 480000, 121050, 481000))
    east = Municipality("East", "2", "P", shapely.box(121050, 480000, 122000, 481000))
    x = np.array([120050.0, 121050.0, 121150.0, 121950.0, 122250.0, 119850.0])
    ids = cell_id(x, np.full(len(x), 480550.0))
    assert np.allclose(cell_center(ids)[0], x)  # the centres the test chose
    assert cell_municipalities(ids, [west, east]).tolist() == [0, 0, 1, 1, 1, 0]
    assert cell_municipalities(ids, [west]).tolist() == [0] * 6
