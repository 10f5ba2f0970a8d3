"""The frozen-encoder feature cache and the pixel cache: hits, misses, invalidation,
resumption, how missing rows are shared among ranks, pooling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.dataroot import DataRoot
from core.datasets import street_images
from core.features import (
    FeatureSet,
    ImageFiles,
    _missing,
    _share,
    extract_features,
    load_pixels,
    pool_by_cell,
)
from core.models.backbones import create_backbone, save_backbone


@pytest.fixture
def images(tiny_demo):
    return street_images(DataRoot(tiny_demo), "gsv").iloc[:300].reset_index(drop=True)


def test_cache_hit_reuses_the_features(images, tmp_path):
    first = extract_features(images, "convnet_small", None, tmp_path, px=32, workers=0)
    stamp = (first.folder / "features.npy").stat().st_mtime_ns
    second = extract_features(images, "convnet_small", None, tmp_path, px=32, workers=0)
    assert second.folder == first.folder
    assert (second.folder / "features.npy").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first.matrix, second.matrix)
    assert first.matrix.shape == (300, 128) and np.abs(first.matrix).sum() > 0


def test_features_equal_a_plain_forward(images, tmp_path):
    features = extract_features(images, "convnet_small", None, tmp_path, px=32, workers=0)
    model = create_backbone("convnet_small").eval()
    from core.features import ImageFiles
    from core.models.backbones import normalise

    batch = torch.stack([ImageFiles(list(images["path"][:8]), 32)[i] for i in range(8)])
    with torch.no_grad():
        expected = model(normalise(batch)).numpy()
    np.testing.assert_allclose(features.matrix[:8], expected, rtol=1e-4, atol=1e-5)


def test_other_weights_or_sizes_never_share_a_cache(images, tmp_path):
    random = extract_features(images, "convnet_small", None, tmp_path, px=32, workers=0)
    weights = tmp_path / "other.safetensors"
    save_backbone(create_backbone("convnet_small", seed=5), weights)
    other = extract_features(images, "convnet_small", weights, tmp_path, px=32, workers=0)
    bigger = extract_features(images, "convnet_small", None, tmp_path, px=48, workers=0)
    assert len({random.folder, other.folder, bigger.folder}) == 3
    assert not np.allclose(random.matrix, other.matrix)


def test_changed_weights_file_invalidates(images, tmp_path):
    weights = tmp_path / "w.safetensors"
    save_backbone(create_backbone("convnet_small", seed=1), weights)
    before = extract_features(images, "convnet_small", weights, tmp_path, px=32, workers=0)
    save_backbone(create_backbone("convnet_small", seed=2), weights)  # same name, new content
    after = extract_features(images, "convnet_small", weights, tmp_path, px=32, workers=0)
    assert after.folder != before.folder
    assert not np.allclose(before.matrix, after.matrix)


def test_interrupted_extraction_resumes(images, tmp_path):
    full = np.array(
        extract_features(
            images,
            "convnet_small",
            None,
            tmp_path / "a",
            px=32,
            workers=0,
            batch_size=50,
            chunk_batches=1,
        ).matrix
    )
    partial = extract_features(
        images,
        "convnet_small",
        None,
        tmp_path / "b",
        px=32,
        workers=0,
        batch_size=50,
        chunk_batches=1,
    )
    # Pretend the process died after 100 rows: rows past that were never written.
    meta_path = partial.folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "done": 100}))
    store = np.load(partial.folder / "features.npy", mmap_mode="r+")
    store[100:] = 0
    store.flush()
    calls = []
    resumed = extract_features(
        images,
        "convnet_small",
        None,
        tmp_path / "b",
        px=32,
        workers=0,
        batch_size=50,
        chunk_batches=1,
        progress=lambda values: calls.append(values["done"]),
    )
    assert calls[0] == 150  # started at row 100, not 0
    np.testing.assert_allclose(resumed.matrix, full, rtol=1e-5, atol=1e-6)


def test_missing_rows_are_shared_among_ranks_in_whole_batches():
    # rows 0-9 and 30-34 are written; 10-29 and 35-99 are missing
    missing = _missing([(0, 10), (30, 35), (0, 4)], 100)
    assert missing == [(10, 30), (35, 100)]
    assert _share(missing, 8, 0, 1) == missing  # one process takes everything
    # 3 batches from row 10 (8, 8, 4 rows) and 9 from row 35: 12 batches, 6 per rank
    assert _share(missing, 8, 0, 2) == [(10, 30), (35, 59)]
    assert _share(missing, 8, 1, 2) == [(59, 100)]
    for world in (1, 2, 3, 5, 16):
        shares = [_share(missing, 8, rank, world) for rank in range(world)]
        rows = [row for share in shares for first, stop in share for row in range(first, stop)]
        assert rows == [row for first, stop in missing for row in range(first, stop)]
        for share in shares:  # every slice starts at a batch boundary of its interval
            assert all((first - 10) % 8 == 0 or (first - 35) % 8 == 0 for first, _ in share)
    assert _missing([(0, 100)], 100) == []


def test_pixels_equal_a_plain_decode_and_are_reused(images, tmp_path):
    pixels = load_pixels(images, 32, tmp_path, workers=0, batch_size=64)
    expected = np.stack([ImageFiles(list(images["path"]), 32)[i].numpy() for i in range(300)])
    np.testing.assert_array_equal(pixels, expected)
    assert [p.name for p in tmp_path.iterdir()] == [Path(pixels.filename).name]  # no .partial
    stamp = Path(pixels.filename).stat().st_mtime_ns
    again = load_pixels(images, 32, tmp_path, workers=0, batch_size=64)
    assert Path(again.filename).stat().st_mtime_ns == stamp
    assert load_pixels(images.iloc[:0], 32, tmp_path).shape == (0, 3, 32, 32)


def test_interrupted_pixel_fill_resumes(images, tmp_path):
    full = np.array(load_pixels(images, 32, tmp_path / "a", workers=0, batch_size=64))
    done = load_pixels(images, 32, tmp_path / "b", workers=0, batch_size=64)
    # Put the file back as a process killed after 128 rows leaves it: in the temporary folder,
    # with a record of the rows written; mark a written row to see that it is not redone.
    final = Path(done.filename)
    partial = final.with_name(final.name + ".partial")
    partial.mkdir()
    store = partial / "pixels.npy"
    final.rename(store)
    rows = np.load(store, mmap_mode="r+")
    rows[128:] = 0
    rows[5] = 7
    rows.flush()
    (partial / "done-0-300.json").write_text(json.dumps({"start": 0, "stop": 300, "done": 128}))
    resumed = load_pixels(images, 32, tmp_path / "b", workers=0, batch_size=64)
    expected = full.copy()
    expected[5] = 7
    np.testing.assert_array_equal(resumed, expected)
    assert not partial.exists()


def test_mismatching_cache_metadata_is_an_error(images, tmp_path):
    features = extract_features(images, "convnet_small", None, tmp_path, px=32, workers=0)
    meta_path = features.folder / "meta.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "backbone": "resnet18"}))
    with pytest.raises(ValueError, match="meta.json: feature cache was made for"):
        extract_features(images, "convnet_small", None, tmp_path, px=32, workers=0)


def test_unreadable_image_names_the_file(images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a jpeg")
    bad = pd.concat(
        [images.iloc[:2], pd.DataFrame({"id": ["x"], "path": [str(broken)]})], ignore_index=True
    )
    with pytest.raises(ValueError, match="broken.jpg: not a readable image"):
        extract_features(bad, "convnet_small", None, tmp_path / "cache", px=32, workers=0)


def test_pooling_averages_per_cell_and_counts_empty_cells():
    features = FeatureSet(
        ids=np.array(["a", "b", "c", "d"]),
        matrix=np.array([[1.0, 0], [3, 2], [5, 5], [7, 7]], np.float32),
        folder=None,
    )
    cells = pd.Series(
        [10, 10, 20, 99], index=["a", "b", "c", "d"]
    )  # d lies outside the cells asked for
    pooled, counts = pool_by_cell(
        features, cells, np.array([20, 10, 30]), keep=np.array([True, True, False, True])
    )
    np.testing.assert_allclose(pooled, [[0, 0], [2, 1], [0, 0]])
    np.testing.assert_array_equal(counts, [0, 2, 0])
