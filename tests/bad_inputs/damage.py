"""Helpers shared by the dashboard's bad-input cases (AppTest) and their browser twins
(``tests/test_browser.py``): a small run to damage, a snapshot of what is stored, an image bomb."""

from __future__ import annotations

import hashlib
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from core.dataroot import DataRoot
from core.grid import read_grid
from core.runs import RunWriter
from core.sources.catalog import read_catalog


def write_run(runs_root: Path, ids: np.ndarray, label: str) -> str:
    """A small fusion-like run with predictions and embeddings; returns its id."""
    rng = np.random.default_rng(len(label))
    with RunWriter(runs_root, "fusion", {"label": label, "target": "won", "seed": 0}) as run:
        run.write_metrics({"test_kendall_tau": 0.3})
        true = rng.normal(size=len(ids))
        run.write_predictions(
            pd.DataFrame(
                {
                    "cell_id": ids,
                    "split": np.where(np.arange(len(ids)) % 3 == 0, "test", "train"),
                    "true": true,
                    "predicted": true + rng.normal(scale=0.1, size=len(ids)),
                }
            )
        )
        run.write_embeddings(ids, rng.normal(size=(len(ids), 4)))
    time.sleep(0.01)  # distinct creation times: the second run is the newest
    return run.run_id


def write_prediction(
    runs_root: Path, ids: np.ndarray, year: int, members: list[str], data: str | None = None
) -> str:
    """A prediction folder as ``stadsbeeld predict`` writes one (kind ``prediction``): ``year``'s
    scores of every cell by the runs ``members``, their mean, spread and per-member columns, so
    that two of them of other years make a change on the Monitor page; returns its id.

    ``data`` is the data root the config names (default: the runs folder's parent); predictions
    of one change must name the same one.
    """
    rng = np.random.default_rng(year)
    scores = rng.normal(4.0 + 0.01 * (year - 2020), 0.2, size=(len(members), len(ids)))
    table = pd.DataFrame(
        {
            "cell_id": ids,
            "split": "unseen",
            "true": np.nan,
            "predicted": scores.mean(axis=0),
            "uncertainty": scores.std(axis=0, ddof=1),
            "year": year,
            **{f"member_{i}": row for i, row in enumerate(scores)},
        }
    )
    config = {
        "data": data or str(runs_root.parent),
        "year": year,
        "label": f"fusion x{len(members)} ({year})",
        "target": "won",
        "members": [{"run_id": m} for m in members],
    }
    with RunWriter(runs_root, "prediction", config) as run:
        run.write_metrics({"cells": len(ids), "members": len(members), "year": year})
        run.write_predictions(table)
    return run.run_id


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file (bytes hash, mtime) and folder under ``root``."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_dir():
            state[key] = ("dir",)
        else:
            state[key] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return state


def street_images_of_a_cell(root: Path, at_least: int = 1) -> tuple[int, list[str]]:
    """The first grid cell with ``at_least`` GSV images, and their catalog paths (relative to the
    catalog's folder)."""
    catalog = DataRoot(root).catalog
    images = pd.DataFrame(read_catalog(catalog, check_files=False).images)
    grid_ids = set(read_grid(DataRoot(root).grid)["cell_id"])
    gsv = images[(images["source"] == "gsv") & images["cell_id"].isin(grid_ids)]
    counts = gsv["cell_id"].value_counts(sort=False)
    cell = int(gsv["cell_id"][gsv["cell_id"].map(counts) >= at_least].iloc[0])
    return cell, gsv[gsv["cell_id"] == cell]["path"].tolist()


def truncate(path: Path) -> None:
    """Cut a file to its first half."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds almost none (an image bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
