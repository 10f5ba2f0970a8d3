"""``python -m train``: subcommands with help, the demo build and its summary."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from train.__main__ import build_parser, main

SMALL = "bbox:121000,486000,122000,487000"


def test_help_lists_the_subcommands():
    result = subprocess.run(
        [sys.executable, "-m", "train", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout and "summary" in result.stdout


@pytest.mark.parametrize("command", ["demo", "summary"])
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out


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
    from train.__main__ import _fusion_config

    real = tmp_path / "real"
    real.mkdir()
    paper = _fusion_config(build_parser().parse_args(["fusion", "--data", str(real)]))
    assert (paper.aerial_backbone, paper.aerial_px, paper.epochs, paper.warmup_epochs) == (
        "resnet50",
        224,
        25,
        5,
    )
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo.json").write_text("{}")
    short = _fusion_config(
        build_parser().parse_args(["fusion", "--data", str(demo), "--epochs", "3"])
    )
    assert (short.aerial_backbone, short.epochs) == ("convnet_small", 3)
    forced = _fusion_config(
        build_parser().parse_args(["fusion", "--data", str(demo), "--schedule", "paper"])
    )
    assert forced.ground_backbone == "resnet50"


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
            "--block-size",
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
        "| aerial+gsv [places-like weights] |",
        "| aerial+gsv [random weights] |",
    ):
        assert row in table
    assert "share of that gap closed by building-filtered Flickr" in table
    before = pd.read_csv(out / "fusion_matrix.csv")
    assert len(before) == 9

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
    assert len(after) == 9 and set(after["configuration"]) == set(before["configuration"])
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
