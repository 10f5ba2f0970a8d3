"""The small shared helpers of core.io: timestamps, JSON-safe values and folder builds."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from core.io import building, jsonable, move_folder, utc_now


def test_utc_now_is_iso_utc_at_the_asked_precision():
    seconds, millis = utc_now(), utc_now("milliseconds")
    assert seconds.endswith("+00:00") and "." not in seconds
    assert len(millis.split("+")[0].rsplit(".", 1)[1]) == 3
    for text in (seconds, millis):
        stamp = datetime.fromisoformat(text)
        assert stamp.tzinfo is not None and stamp.utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - stamp) < timedelta(seconds=5)


def test_jsonable_gives_plain_json_values():
    value = {
        "n": np.int64(3),
        "x": np.float32(0.5),
        "flag": np.bool_(True),
        "nan": float("nan"),
        "inf": np.float64("inf"),
        "array": np.array([[1.0, np.nan], [2.0, 3.0]]),
        "tuple": (1, Path("a/b")),
        "path": Path("runs/x"),
        1: {"nested": [np.int32(4), -math.inf]},
    }
    plain = jsonable(value)
    assert plain == {
        "n": 3,
        "x": 0.5,
        "flag": True,
        "nan": None,
        "inf": None,
        "array": [[1.0, None], [2.0, 3.0]],
        "tuple": [1, "a/b"],
        "path": "runs/x",
        "1": {"nested": [4, None]},
    }
    assert type(plain["n"]) is int and type(plain["x"]) is float and type(plain["flag"]) is bool
    assert json.loads(json.dumps(plain, allow_nan=False)) == plain


def test_building_renames_the_finished_folder_into_place(tmp_path):
    out = tmp_path / "deep" / "city"
    with building(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".city.building-")
        (tmp / "a.txt").write_text("done")
    assert (out / "a.txt").read_text() == "done"
    assert not tmp.exists()
    with pytest.raises(FileExistsError, match="already exists"), building(out):
        pass
    assert sorted(p.name for p in out.parent.iterdir()) == ["city"]


def test_building_leaves_nothing_when_the_build_fails(tmp_path):
    out = tmp_path / "city"
    with pytest.raises(RuntimeError, match="boom"), building(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_building_replaces_an_existing_folder_only_when_done(tmp_path):
    out = tmp_path / "city"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), building(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["city"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # a failed build keeps the old one
    with building(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["city"]  # the old one is gone
    assert [p.name for p in out.iterdir()] == ["new.txt"]


def test_move_folder_refuses_an_existing_target_even_an_empty_one(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    (tmp_path / "dst").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        move_folder(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "src" / "f").is_file()
    assert move_folder(tmp_path / "src", tmp_path / "dst", replace=True) == tmp_path / "dst"
    assert (tmp_path / "dst" / "f").is_file() and not (tmp_path / "src").exists()
