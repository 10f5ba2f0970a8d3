"""``python -m train``: subcommands with help, the demo build and its summary."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import typing

import pandas as pd
import pytest
import yaml

from core.configs import OBJECTIVES
from train.cli import COMMANDS, build_parser, main, normalise

SMALL = "bbox:121000,486000,122000,487000"


def test_help_lists_the_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "train", "--help"], capture_output=True, text=True, check=True
    )
    for name in COMMANDS:
        assert f"  {name} " in result.stdout


def parsed(name: str, *argv: str) -> dict:
    """The options ``stadsbeeld name argv`` resolves to."""
    parser = build_parser(name)
    return parser.parse_args(normalise(parser, name, list(argv))).as_dict()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_of_every_command_has_help(name, capsys):
    assert main([name, "--help"]) == 0
    assert "--" in capsys.readouterr().out
    for action in build_parser(name)._actions:
        if action.dest in ("help", "print_config") or not action.help:
            assert action.dest in ("help", "print_config"), f"{name}: {action.dest} has no help"
            continue
        # jsonargparse appends "(type: ..., default: ...)"; the docstring's text comes first
        assert not action.help.lstrip().startswith("(type"), f"{name} --{action.dest}: no help"


def test_choices_are_listed_and_match_the_registries():
    from core.configs import Backbone
    from core.models.backbones import BACKBONES
    from core.sources.lbm import SCORE_COLUMNS

    assert set(typing.get_args(Backbone)) == set(BACKBONES)
    help_text = build_parser("fusion").format_help()
    assert "{" + ",".join(typing.get_args(Backbone)) + "}" in help_text
    for name in BACKBONES:
        assert parsed("fusion", "--aerial-backbone", name)["aerial_backbone"] == name
    assert "{" + ",".join([*SCORE_COLUMNS, "lbm_class"]) + "}" in help_text
    assert "{" + ",".join(OBJECTIVES) + "}" in build_parser("contrastive").format_help()


def test_the_option_spellings_users_know_keep_working():
    fusion = parsed(
        "fusion",
        "--no-aerial",
        "--ground",
        "flickr",
        "--aerial-backbone",
        "resnet18",
        "--epochs",
        "3",
    )
    assert (fusion["aerial"], fusion["ground"], fusion["aerial_backbone"], fusion["epochs"]) == (
        False,
        "flickr",
        "resnet18",
        3,
    )
    assert parsed("fusion", "--ground", "none")["ground"] is None
    matrix = parsed(
        "fusion-matrix",
        "--seeds",
        "0",
        "1",
        "--compare-weights",
        "a=x.safetensors",
        "--compare-weights",
        "b=run-1",
        "--only",
        "aerial",
        "aerial+gsv",
    )
    assert matrix["seeds"] == [0, 1]
    assert matrix["compare_weights"] == {"a": "x.safetensors", "b": "run-1"}
    assert matrix["only"] == ["aerial", "aerial+gsv"]
    contrastive = parsed(
        "contrastive", "--loss-weights", "1", "0.5", "1", "--max-distance", "7", "--buffer", "50"
    )
    assert contrastive["loss_weights"] == {"temporal": 1.0, "spatial": 0.5, "global": 1.0}
    assert contrastive["pairs"]["temporal_max_distance_m"] == 7.0
    assert contrastive["pairs"]["spatial_buffer_m"] == 50.0
    scene = parsed("scene-filter", "--building-scenes", "building,street", "--threshold", "0.4")
    assert scene["filter"]["building_scenes"] == ("building", "street")
    assert scene["filter"]["threshold"] == 0.4
    assert parsed("contrastive-eval", "r1", "r2", "--compare-weights", "x=y")["runs"] == [
        "r1",
        "r2",
    ]
    assert parsed("uge-bench", "r1")["run_ids"] == ["r1"]
    worker = parsed("worker", "--once", "--exit-when-idle", "5")
    assert worker["once"] is True and worker["exit_when_idle"] == 5.0
    # and jsonargparse's own spelling
    assert parsed("fusion", "--aerial_px", "48", "--aerial", "false")["aerial_px"] == 48


def test_unknown_options_and_bad_values_are_one_error_line(capsys):
    assert main(["fusion", "--aerial-backbone", "resnet1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "resnet1000" in err and "Traceback" not in err
    assert main(["fusion", "--no-such-option", "1"]) == 2
    assert "--no-such-option" in capsys.readouterr().err
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_print_config_prints_the_resolved_options(tmp_path, capsys):
    assert main(["fusion", "--data", str(tmp_path), "--epochs", "4", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["epochs"] == 4 and printed["aerial_backbone"] == "resnet50"  # paper: not a demo
    config = tmp_path / "mine.yaml"
    config.write_text("epochs: 7\nground: flickr\n")
    assert main(["fusion", "--data", str(tmp_path), "--config", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["epochs"], printed["ground"], printed["aerial_px"]) == (7, "flickr", 224)
    assert (
        main(
            [
                "fusion",
                "--config",
                str(config),
                "--epochs",
                "2",
                "--data",
                str(tmp_path),
                "--print_config",
            ]
        )
        == 0
    )
    assert yaml.safe_load(capsys.readouterr().out)["epochs"] == 2  # later options win


def test_demo_builds_prints_a_summary_and_respects_existing_output(tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--extent",
        SMALL,
        "--out",
        str(out),
        "--flickr-photos",
        "2000",
        "--workers",
        "1",
        "--quiet",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "cells:" in printed and "gsv" in printed and "coverage per district" in printed
    assert "Centrum" in printed

    assert main(args) == 2  # exists: neither --force nor --if-missing
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--if-missing"]) == 0
    assert "already built" in capsys.readouterr().out
    manifest = json.loads((out / "demo.json").read_text())
    (out / "demo.json").write_text(json.dumps({**manifest, "generator_version": 1}))
    assert main([*args, "--if-missing"]) == 0  # an older city is kept, with a note
    assert "built by demo generator 1" in capsys.readouterr().out
    assert main([*args, "--if-missing", "--seed", "3"]) == 2
    assert "holds another demo city ({'seed': 7})" in capsys.readouterr().err

    before = (out / "demo.json").read_text()
    assert main([*args, "--force", "--seed", "8"]) == 0
    assert (out / "demo.json").read_text() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no staging folders left

    capsys.readouterr()
    assert main(["summary", "--data", str(out)]) == 0
    assert "labelled" in capsys.readouterr().out


def test_fusion_schedule_is_the_papers_on_real_data_and_short_on_the_demo(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    paper = parsed("fusion", "--data", str(real))
    assert (
        paper["aerial_backbone"],
        paper["aerial_px"],
        paper["epochs"],
        paper["warmup_epochs"],
    ) == (
        "resnet50",
        224,
        25,
        5,
    )
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo.json").write_text("{}")
    short = parsed("fusion", "--data", str(demo), "--epochs", "3")
    assert (short["aerial_backbone"], short["epochs"]) == ("convnet_small", 3)
    forced = parsed("fusion", "--data", str(demo), "--schedule", "paper")
    assert forced["ground_backbone"] == "resnet50"
    assert parsed("contrastive", "--schedule", "paper")["backbone"] == "vit_base"
    assert parsed("uge", "--schedule", "paper")["temperature"] == 0.01


def test_fusion_matrix_command_on_a_tiny_city(tiny_demo, tmp_path, capsys):
    out = tmp_path / "reports"
    code = main(
        [
            "fusion-matrix",
            "--data",
            str(tiny_demo),
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--block_size",
            "300",
            "--out",
            str(out),
            "--compare-weights",
            "random-again=random",
        ]
    )
    assert code == 0
    table = (out / "fusion_matrix.md").read_text()
    for row in (
        "| aerial |",
        "| gsv |",
        "| aerial+gsv |",
        "| aerial+flickr(all) |",
        "| aerial+flickr(outdoor) |",
        "| aerial+flickr(building) |",
        "| aerial+amsterdam_panorama |",
        "| aerial+mapillary |",
        "| aerial+amsterdam_panorama+mapillary |",
        "| aerial+gsv [places-like weights] |",
        "| aerial+gsv [random weights] |",
    ):
        assert row in table
    assert "share of that gap closed by building-filtered Flickr" in table
    before = pd.read_csv(out / "fusion_matrix.csv")
    assert len(before) == 12

    # Extending the matrix: one configuration again, merged into the report in place of its rows.
    extra = "aerial+gsv [random-again weights]"
    code = main(
        [
            "fusion-matrix",
            "--data",
            str(tiny_demo),
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--block-size",
            "300",
            "--out",
            str(out),
            "--compare-weights",
            "random-again=random",
            "--only",
            extra,
        ]
    )
    assert code == 0
    after = pd.read_csv(out / "fusion_matrix.csv")
    assert len(after) == 12 and set(after["configuration"]) == set(before["configuration"])
    old, new = (
        frame.set_index("configuration")["run_id"].sort_index() for frame in (before, after)
    )
    changed = new != old
    assert changed[changed].index.tolist() == [extra]
    assert (
        main(
            [
                "fusion-matrix",
                "--data",
                str(tiny_demo),
                "--seeds",
                "0",
                "--out",
                str(out),
                "--only",
                "nope",
            ]
        )
        == 2
    )


def test_bad_input_is_one_error_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("STADSBEELD_TRACEBACK", raising=False)
    assert main(["scene-filter", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "catalog file not found" in err and "Traceback" not in err
    monkeypatch.setenv("STADSBEELD_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="catalog file not found"):
        main(["scene-filter", "--data", str(tmp_path)])


def _new_run(root, kind: str, before: set[str]):
    """The one run of ``kind`` that is not among ``before``."""
    from core.runs import list_runs, load_run

    runs = list_runs(root / "runs", kind=kind)
    (path,) = runs.loc[~runs["run_id"].isin(before), "path"]
    return load_run(path)


def test_a_fusion_run_repeats_from_its_own_config(tiny_demo, tmp_path):
    root = tmp_path / "city"
    shutil.copytree(tiny_demo, root, ignore=shutil.ignore_patterns("runs"))
    options = ["--data", str(root), "--epochs", "2", "--block-size", "300", "--seed", "3"]
    assert main(["fusion", *options, "--ground", "flickr", "--aerial-px", "32"]) == 0
    first = _new_run(root, "fusion", set())
    assert main(["fusion", "--config", str(first.path / "config.yaml")]) == 0
    second = _new_run(root, "fusion", {first.run_id})
    assert second.config == first.config
    assert second.metrics == first.metrics and first.metrics["test_kendall_tau"] != 0
    pd.testing.assert_frame_equal(second.predictions(), first.predictions())


def test_fetch_takes_the_municipality_and_its_old_option_spellings():
    fetch = parsed(
        "fetch",
        "amsterdam",
        "--sources",
        "lbm,aerial",
        "--extra-years",
        "2018",
        "2016",
        "--endpoint",
        "wmts=http://127.0.0.1:9/wmts",
        "--rate",
        "all=0",
        "--gsv-headings",
        "0",
        "180",
        "--lbm-release",
        "scores.csv,grid.gpkg",
        "--redo",
        "aerial",
        "osm",
        "--dry-run",
    )
    assert fetch["municipality"] == "amsterdam"
    assert fetch["sources"] == ["lbm", "aerial"] and fetch["extra_years"] == [2018, 2016]
    assert fetch["endpoint"] == {"wmts": "http://127.0.0.1:9/wmts"} and fetch["rate"] == {
        "all": 0.0
    }
    assert fetch["gsv_headings"] == [0.0, 180.0] and fetch["redo"] == ["aerial", "osm"]
    assert fetch["lbm_release"] == ["scores.csv", "grid.gpkg"] and fetch["dry_run"] is True
    assert main(["fetch", "amsterdam", "--rate", "nope=3"]) == 2


def test_fetch_takes_several_municipalities_or_all_of_a_province():
    assert parsed("fetch", "amsterdam,amstelveen,diemen")["municipality"] == (
        "amsterdam,amstelveen,diemen"
    )
    assert parsed("fetch", "[amsterdam, 'Bergen (NH)']")["municipality"] == [
        "amsterdam",
        "Bergen (NH)",
    ]
    province = parsed("fetch", "all", "--province", "Noord-Holland")
    assert (province["municipality"], province["province"]) == ("all", "Noord-Holland")
    assert main(["fetch", "all", "--dry-run"]) == 2  # which province: a clear error
