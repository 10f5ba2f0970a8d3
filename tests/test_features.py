"""The frozen-encoder feature cache: hits, misses, invalidation, resumption, pooling."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from core.dataroot import DataRoot
from core.datasets import street_images
from core.features import FeatureSet, extract_features, pool_by_cell
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
