"""Bad data that used to train silently wrong runs: each case ends in a clear error naming the
file and the problem, or in rows rejected with a warning, and never changes a stored file."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from PIL import Image
from rasterio.enums import Resampling
from rasterio.transform import from_origin

from core.configs import ContrastiveConfig
from core.dataroot import DataRoot
from core.datasets import aerial_patches, labelled_cells, street_images
from core.features import extract_features
from core.grid import cell_id
from core.runs import load_run
from core.sources.aerial import AerialRaster
from core.sources.catalog import read_catalog, write_catalog
from core.sources.lbm import read_lbm
from core.ugdata import build_ugdata, read_ugdata
from tests.bad_inputs.test_run_cases import assert_fails_cleanly
from tests.test_sources_lbm import grid_frame, score_table
from train.contrastive import train_contrastive
from train.contrastive_eval import Evaluation

DAM = (121_350.0, 487_250.0)  # RD metres, inside the Netherlands


# --- helpers ---------------------------------------------------------------------------------


def _state(paths: list[Path]) -> dict[Path, tuple[str, int]]:
    return {
        p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for folder in paths
        for p in ([folder] if folder.is_file() else sorted(folder.rglob("*")))
        if p.is_file()
    }


@contextmanager
def unchanged(*paths: Path) -> Iterator[None]:
    """Assert that no file under ``paths`` is added, removed or changed by the block."""
    before = _state(list(paths))
    yield
    assert _state(list(paths)) == before


def jpeg_bytes(seed: int = 0, px: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (px, px, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# --- labels ----------------------------------------------------------------------------------


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, Path]:
    """A valid two-file Leefbaarometer release (scores CSV + grid GeoPackage)."""
    scores = tmp_path / "scores.csv"
    score_table().to_csv(scores, index=False)
    grid = tmp_path / "grid.gpkg"
    grid_frame().to_file(grid, driver="GPKG")
    return scores, grid


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("won", 57.0, r"column 'won' has 1 values outside the plausible range -1.5..1.5"),
        ("lbm", 99.0, r"column 'lbm' has 1 values outside the plausible range 2..6"),
        ("lbm", 0.0, r"column 'lbm' has 1 values outside the plausible range 2..6"),
        ("afw", -999.0, r"column 'afw' has 1 values outside the plausible range -2..2"),
        ("fys", 7.5, r"column 'fys' has 1 values outside the plausible range -1.5..1.5"),
        ("jaar", 20200, r"column 'jaar' has 1 values outside the plausible range 1990\.\."),
        ("jaar", 202, r"column 'jaar' has 1 values outside the plausible range 1990\.\."),
    ],
)
def test_scores_out_of_range_are_an_error_naming_file_and_column(
    release: tuple[Path, Path], column: str, value: float, message: str
) -> None:
    scores, grid = release
    table = pd.read_csv(scores)
    table.loc[3, column] = value
    table.to_csv(scores, index=False)
    with unchanged(scores.parent), pytest.raises(ValueError, match=message) as caught:
        read_lbm(scores, grid)
    text = str(caught.value)
    assert str(scores) in text
    assert repr(str(table.loc[3, "grid_id"])) in text  # the example names the row


def test_a_missing_score_is_still_allowed(release: tuple[Path, Path]) -> None:
    scores, grid = release
    table = pd.read_csv(scores)
    table.loc[3, "won"] = np.nan
    table.to_csv(scores, index=False)
    assert read_lbm(scores, grid)["won"].isna().sum() == 1


def test_a_typo_year_never_becomes_the_latest_year(tiny_demo: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(tiny_demo / "labels", root / "labels")
    shutil.copy(tiny_demo / "grid.parquet", root / "grid.parquet")
    table = pd.read_csv(root / "labels" / "lbm_scores.csv")
    table.loc[0, "jaar"] = 20200
    table.to_csv(root / "labels" / "lbm_scores.csv", index=False)
    with unchanged(root), pytest.raises(ValueError, match=r"lbm_scores.csv: column 'jaar'"):
        labelled_cells(DataRoot(root), None, "won")


def test_the_demo_labels_pass_every_range(tiny_demo: Path) -> None:
    labels = read_lbm(
        tiny_demo / "labels" / "lbm_scores.csv", tiny_demo / "labels" / "lbm_grid.gpkg"
    )
    assert len(labels) > 0


# --- splits ----------------------------------------------------------------------------------


def test_a_split_without_test_cells_fails_before_training(tiny_demo: Path) -> None:
    with unchanged(tiny_demo / "labels"), pytest.raises(ValueError) as caught:
        labelled_cells(DataRoot(tiny_demo), None, "won", block_size=5000.0)
    text = str(caught.value)
    assert "lbm_scores.csv" in text and "labelled cells into 1 blocks of 5000 m" in text
    assert "leaves no val and no test cells" in text
    assert "smaller --block-size (e.g. 1200)" in text


def test_a_fine_split_still_works(tiny_demo: Path) -> None:
    cells = labelled_cells(DataRoot(tiny_demo), None, "won", block_size=300.0)
    assert set(cells["split"]) == {"train", "val", "test"}


# --- catalogs --------------------------------------------------------------------------------


def catalog_rows(folder: Path, rows: list[dict]) -> Path:
    """A catalog CSV in ``folder`` with one valid JPEG ``img/good.jpg`` and ``rows`` after it."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "img" / "good.jpg").write_bytes(jpeg_bytes())
    base = {"source": "gsv", "path": "img/good.jpg", "heading": 90.0, "x": DAM[0], "y": DAM[1]}
    base["captured_at"] = "2020-06-01"
    table = pd.DataFrame([{**base, "id": "good"}, *({**base, **row} for row in rows)])
    path = folder / "catalog.csv"
    table.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("row", "kind", "problem"),
    [
        (
            {"heading": 9999.0},
            "heading out of range",
            "heading 9999 is not a bearing within 0..360",
        ),
        ({"heading": -90.0}, "heading out of range", "heading -90 is not a bearing within 0..360"),
        ({"captured_at": "2099-01-01"}, "captured_at out of range", "is in the future"),
        ({"captured_at": "1995-05-01"}, "captured_at out of range", "before gsv images existed"),
        (
            {"source": "flickr", "captured_at": "2001-05-01"},
            "captured_at out of range",
            "before flickr images existed (2004-01-01)",
        ),
        ({"path": "/etc/passwd"}, "path outside root", "image path '/etc/passwd' lies outside"),
        ({"path": "../../x.jpg"}, "path outside root", "image path '../../x.jpg' lies outside"),
    ],
)
def test_implausible_catalog_rows_are_rejected_with_a_warning(
    tmp_path: Path, row: dict, kind: str, problem: str
) -> None:
    path = catalog_rows(tmp_path, [{"id": "bad", **row}])
    with (
        unchanged(tmp_path),
        pytest.warns(UserWarning, match=rf"catalog.csv: rejected 1 of 2.*{kind}"),
    ):
        catalog = read_catalog(path)
    assert catalog.images["id"].tolist() == ["good"]
    assert catalog.problems["kind"].tolist() == [kind]
    assert problem in catalog.problems["problem"][0]


def test_an_old_photo_of_another_source_is_kept(tmp_path: Path) -> None:
    path = catalog_rows(tmp_path, [{"id": "old", "source": "other", "captured_at": "1995-05-01"}])
    assert sorted(read_catalog(path).images["id"]) == ["good", "old"]


def test_a_symlink_out_of_the_catalog_folder_is_rejected(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(jpeg_bytes(1))
    folder = tmp_path / "street"
    path = catalog_rows(folder, [{"id": "link", "path": "img/link.jpg"}])
    (folder / "img" / "link.jpg").symlink_to(outside)
    with unchanged(tmp_path), pytest.warns(UserWarning, match="1 path outside root"):
        catalog = read_catalog(path)
    assert catalog.images["id"].tolist() == ["good"]
    # Without file checks paths are compared as written: the link itself lies inside.
    assert sorted(read_catalog(path, check_files=False).images["id"]) == ["good", "link"]


def test_another_root_can_be_named(tmp_path: Path) -> None:
    folder = tmp_path / "street"
    path = catalog_rows(folder, [{"id": "up", "path": "../shared/up.jpg"}])
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "up.jpg").write_bytes(jpeg_bytes(2))
    assert sorted(read_catalog(path, root=tmp_path).images["id"]) == ["good", "up"]


def _truncated(folder: Path) -> bytes:
    return jpeg_bytes(3)[:-400]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (lambda folder: b"", "empty file"),
        (lambda folder: b"\xff\xd8 not really a jpeg" * 10, "not a readable image"),
        (_truncated, "not a readable image"),
        (lambda folder: b"<html>rate limited</html>", "not a readable image"),
    ],
)
def test_unreadable_images_are_rejected_before_training(
    tmp_path: Path, content, problem: str
) -> None:
    path = catalog_rows(tmp_path, [{"id": "bad", "path": "img/bad.jpg"}])
    (tmp_path / "img" / "bad.jpg").write_bytes(content(tmp_path))
    with unchanged(tmp_path), pytest.warns(UserWarning, match="1 unreadable image"):
        catalog = read_catalog(path, check_images=True)
    assert catalog.images["id"].tolist() == ["good"]
    assert problem in catalog.problems["problem"][0]
    assert str(tmp_path / "img" / "bad.jpg") in catalog.problems["problem"][0]


def test_a_jpeg_with_a_trailer_is_readable(tmp_path: Path) -> None:
    path = catalog_rows(tmp_path, [{"id": "trailer", "path": "img/trailer.jpg"}])
    (tmp_path / "img" / "trailer.jpg").write_bytes(jpeg_bytes(4) + os.urandom(10_000))
    assert sorted(read_catalog(path, check_images=True).images["id"]) == ["good", "trailer"]


def test_feature_extraction_skips_unreadable_images_with_one_warning(
    tiny_demo: Path, tmp_path: Path
) -> None:
    """A corrupt, a truncated, a missing and an escaping image in a real data root: training's
    image set leaves them out (one warning naming the catalog), and extraction runs through."""
    root = tmp_path / "root"
    street = root / "street"
    images = read_catalog(tiny_demo / "street" / "catalog.parquet").images
    images = images[images["source"] == "gsv"].sort_values("id").iloc[:12]
    rows = []
    for image in images.itertuples():
        target = street / "images" / f"{image.id}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image.path, target)
        rows.append(
            {
                "id": image.id,
                "source": "gsv",
                "path": f"images/{image.id}.jpg",
                "heading": image.heading,
                "captured_at": image.captured_at,
                "x": image.x,
                "y": image.y,
            }
        )
    (street / "images" / f"{rows[0]['id']}.jpg").write_bytes(b"garbage")
    (street / "images" / f"{rows[1]['id']}.jpg").write_bytes(
        (street / "images" / f"{rows[1]['id']}.jpg").read_bytes()[:300]
    )
    (street / "images" / f"{rows[2]['id']}.jpg").unlink()
    rows[3]["path"] = "../../../etc/passwd"
    pd.DataFrame(rows).to_parquet(street / "catalog.parquet", index=False)

    with unchanged(street), pytest.warns(UserWarning) as caught:
        chosen = street_images(DataRoot(root), "gsv")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "catalog.parquet: rejected 4 of 12 images" in messages[0]
    assert "2 unreadable image" in messages[0] and "1 missing file" in messages[0]
    assert "1 path outside root" in messages[0]
    assert chosen["id"].tolist() == [r["id"] for r in rows[4:]]
    features = extract_features(
        chosen, "convnet_small", None, tmp_path / "cache", px=32, workers=0, device="cpu"
    )
    assert features.matrix.shape[0] == 8 and np.isfinite(features.matrix).all()


# --- images of contrastive training and UGData ----------------------------------------------


@pytest.fixture
def linked_city(tiny_demo: Path, tmp_path: Path) -> Path:
    """A copy of the tiny demo city made of hard links (quick): replace a file, never write
    into one, or the shared city changes too."""
    root = tmp_path / "city"
    shutil.copytree(
        tiny_demo, root, copy_function=os.link, ignore=shutil.ignore_patterns("runs", "cache")
    )
    return root


def break_images(root: Path, keep: int | None = None) -> tuple[Path, Path, list[str]]:
    """Truncate the first GSV image (by id) and delete the second; with ``keep``, the catalog
    is cut to its first ``keep`` GSV rows first. Returns the truncated and the deleted file
    and their two ids."""
    path = root / "street" / "catalog.parquet"
    images = read_catalog(path, check_files=False).images
    gsv = images[images["source"] == "gsv"].sort_values("id", ignore_index=True)
    if keep is not None:
        gsv = gsv.iloc[:keep]
        write_catalog(pd.DataFrame(gsv.drop(columns=["geometry", "cell_id"])), path)
    truncated, deleted = Path(gsv["path"][0]), Path(gsv["path"][1])
    content = truncated.read_bytes()
    truncated.unlink()  # a hard link into the shared city
    truncated.write_bytes(content[: len(content) // 3])  # a download cut off mid-scan
    deleted.unlink()
    return truncated, deleted, gsv["id"][:2].tolist()


def _catalog_warning(caught: list) -> str:
    (message,) = [str(w.message) for w in caught if "catalog.parquet: rejected" in str(w.message)]
    return message


def test_a_contrastive_run_leaves_out_a_truncated_and_a_missing_image(linked_city: Path) -> None:
    """Pretraining used to read the catalog unchecked and stop in the DataLoader; now the run
    (and its evaluation's image set) leaves both out, with one warning naming both files."""
    truncated, deleted, ids = break_images(linked_city)
    config = ContrastiveConfig(
        data=str(linked_city),
        objective="global",
        epochs=1,
        steps_per_epoch=1,
        batch_size=8,
        dim=8,
        mlp_dim=16,
        device="cpu",
    )
    with unchanged(linked_city / "street"), pytest.warns(UserWarning) as caught:
        run_id = train_contrastive(config, log=lambda _: None)
    message = _catalog_warning(caught)
    assert "rejected 2 of" in message and "1 unreadable image" in message
    assert "1 missing file" in message
    assert f"{truncated}: not a readable image" in message
    assert f"image file not found: {deleted}" in message
    catalog = read_catalog(linked_city / "street" / "catalog.parquet", check_files=False).images
    n_gsv = int((catalog["source"] == "gsv").sum())
    assert load_run(DataRoot(linked_city).runs / run_id).predictions()["images"].sum() == n_gsv - 2
    with pytest.warns(UserWarning, match="rejected 2 of"):
        evaluation = Evaluation(DataRoot(linked_city), config)
    assert not evaluation.images["id"].isin(ids).any()
    assert len(evaluation.images) == n_gsv - 2


def test_contrastive_without_a_readable_image_is_an_error_naming_both_files(
    linked_city: Path, capsys
) -> None:
    truncated, deleted, _ = break_images(linked_city, keep=2)
    with pytest.warns(UserWarning, match="rejected 2 of 2 images"):
        assert_fails_cleanly(
            {"root": linked_city},
            capsys,
            ["contrastive", "--data", str(linked_city), "--device", "cpu"],
            rf"catalog.parquet: no usable 'gsv' images; 2 rows were rejected \(row 0: "
            rf"{re.escape(str(truncated))}: not a readable image .*; "
            rf"row 1: image file not found: {re.escape(str(deleted))}\)",
        )


def test_ugdata_is_built_without_a_truncated_or_missing_image(
    linked_city: Path, tmp_path: Path
) -> None:
    """UGE training decodes every image a sample names: the build leaves both out (one warning
    naming them), so no sample names them."""
    truncated, deleted, _ = break_images(linked_city)
    out = tmp_path / "ugdata"
    with unchanged(linked_city), pytest.warns(UserWarning) as caught:
        manifest = build_ugdata(str(linked_city), str(out), max_images=None)
    message = _catalog_warning(caught)
    assert f"{truncated}: not a readable image" in message
    assert f"image file not found: {deleted}" in message
    n_images = len(
        read_catalog(linked_city / "street" / "catalog.parquet", check_files=False).images
    )
    assert manifest["images"] == n_images - 2
    data = read_ugdata(out)
    named = {str(data.image_path(s)) for s in data.files["train.jsonl"]}
    assert len(named) == n_images - 2
    assert not named & {str(truncated), str(deleted)}


def test_ugdata_without_a_readable_image_is_an_error_and_writes_nothing(
    linked_city: Path, tmp_path: Path
) -> None:
    break_images(linked_city, keep=2)
    with (
        unchanged(linked_city),
        pytest.warns(UserWarning, match="rejected 2 of 2 images"),
        pytest.raises(ValueError, match=r"catalog.parquet: no usable images to build UGData"),
    ):
        build_ugdata(str(linked_city), str(tmp_path / "ugdata"))
    assert not (tmp_path / "ugdata").exists()


def test_uge_reads_ugdata_without_samples_of_an_image_broken_since_the_build(
    linked_city: Path, tmp_path: Path
) -> None:
    """The folder was built from good images; one is corrupt by the time UGE trains on it."""
    out = tmp_path / "ugdata"
    build_ugdata(str(linked_city), str(out), max_images=60)
    data = read_ugdata(out)
    broken = data.image_path(data.files["train.jsonl"][0])
    broken.unlink()  # a hard link into the shared city
    broken.write_bytes(b"<html>rate limited</html>")
    naming = [s for s in data.files["train.jsonl"] if data.image_path(s) == broken]
    with unchanged(linked_city, out), pytest.warns(UserWarning) as caught:
        checked = read_ugdata(out, check_images=True)
    (message,) = [str(w.message) for w in caught]
    assert f"left out {len(naming)} of {len(data.files['train.jsonl'])} samples" in message
    assert f"{broken}: not a readable image" in message
    assert len(checked.files["train.jsonl"]) == len(data.files["train.jsonl"]) - len(naming)
    assert broken not in {checked.image_path(s) for s in checked.files["train.jsonl"]}
    assert len(read_ugdata(out).files["train.jsonl"]) == len(data.files["train.jsonl"])


# --- rasters ---------------------------------------------------------------------------------


def write_raster(
    path: Path,
    left: float,
    top: float,
    pixel: float,
    size: int | tuple[int, int],
    fill: int | None = 120,
    **profile: object,
) -> Path:
    """An RGB GeoTIFF in EPSG:28992 filled with ``fill`` (None: nothing written, sparse)."""
    width, height = (size, size) if isinstance(size, int) else size
    meta = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:28992",
        "transform": from_origin(left, top, pixel, pixel),
        **profile,
    }
    with rasterio.open(path, "w", **meta) as dst:
        if fill is not None:
            dst.write(np.full((3, height, width), fill, np.uint8))
    return path


def cells_around(x: float, y: float, n: int = 3) -> np.ndarray:
    return cell_id(x + 100.0 * np.arange(n), np.full(n, y))


def test_a_raster_covering_none_of_the_cells_is_an_error(tmp_path: Path) -> None:
    raster = write_raster(tmp_path / "rotterdam.tif", 92_000, 438_000, 4.0, 200)
    with unchanged(tmp_path), AerialRaster(raster) as source, pytest.raises(ValueError) as caught:
        source.patches(cells_around(*DAM), 256.0, 16)
    text = str(caught.value)
    assert "rotterdam.tif: the raster covers none of the 3 cells" in text
    assert "raster bounds (92000.0, 437200.0, 92800.0, 438000.0)" in text
    assert "cells' bounds (121300.0, 487200.0, 121600.0, 487300.0)" in text


def test_a_raster_covering_some_cells_warns_with_counts_and_bounds(tmp_path: Path) -> None:
    raster = write_raster(tmp_path / "part.tif", DAM[0] - 200, DAM[1] + 200, 4.0, 100)
    cells = np.concatenate([cells_around(*DAM, 1), cells_around(DAM[0] + 5000, DAM[1], 1)])
    with (
        unchanged(tmp_path),
        AerialRaster(raster) as source,
        pytest.warns(
            UserWarning, match=r"part.tif: 1 of 2 cells lie entirely outside.*raster bounds"
        ),
    ):
        images, status = source.patches(cells, 100.0, 8)
    assert status["outside"].tolist() == [False, True]


def test_a_huge_raster_without_overviews_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    """A sparse tiled BigTIFF declaring 200,000 x 152,000 pixels: a few KiB on disk."""
    raster = write_raster(
        tmp_path / "huge.tif",
        110_000,
        495_000,
        0.125,
        (200_000, 152_000),
        fill=None,
        tiled=True,
        blockxsize=512,
        blockysize=512,
        BIGTIFF="YES",
        SPARSE_OK="TRUE",
    )
    assert raster.stat().st_size < 10_000_000
    with unchanged(tmp_path), AerialRaster(raster) as source, pytest.raises(ValueError) as caught:
        source.patches(cells_around(*DAM), 256.0, 64)
    text = str(caught.value)
    assert "huge.tif: a 256 m patch at 64 px shrinks 32x from 0.125 m pixels" in text
    assert "has no overviews" in text and "2048 x 2048 full-resolution pixels" in text
    assert f"gdaladdo -r average {raster} 2 4 8 16 32" in text
    assert "rio overview --build 2,4,8,16,32 --resampling average" in text


def test_a_fine_raster_with_overviews_reads(tmp_path: Path) -> None:
    raster = write_raster(tmp_path / "fine.tif", DAM[0] - 256, DAM[1] + 256, 0.25, 2048, tiled=True)
    with rasterio.open(raster, "r+") as dst:
        dst.build_overviews([2, 4, 8, 16], Resampling.average)
    with AerialRaster(raster) as source:
        images, _ = source.patches(cells_around(*DAM, 1), 128.0, 16)
    assert (images == 120).all()


@pytest.mark.parametrize("nodata", [None, 255])
def test_a_raster_without_data_warns_about_blank_patches(tmp_path: Path, nodata) -> None:
    fill = 0 if nodata is None else nodata
    raster = write_raster(
        tmp_path / "empty.tif", DAM[0] - 400, DAM[1] + 400, 4.0, 200, fill=fill, nodata=nodata
    )
    with (
        unchanged(tmp_path),
        AerialRaster(raster) as source,
        pytest.warns(UserWarning, match=r"empty.tif: 3 of 3 patches inside the raster are blank"),
    ):
        images, _ = source.patches(cells_around(*DAM), 100.0, 8)
    assert len(images) == 3  # reported, still cut: the caller decides


def test_training_patches_from_a_raster_elsewhere_fail_and_cache_nothing(tmp_path: Path) -> None:
    """The run used to complete with constant predictions; now nothing is cut or cached."""
    root = DataRoot(tmp_path / "root")
    (root.root / "aerial").mkdir(parents=True)
    write_raster(root.root / "aerial" / "aerial.tif", 92_000, 438_000, 4.0, 200)
    with unchanged(root.root), pytest.raises(ValueError, match=r"aerial.tif: the raster covers"):
        aerial_patches(root, cells_around(*DAM), 256.0, 16)
    assert not root.cache.exists()
