"""Contrastive pretraining end to end on the tiny demo city: runs, resume, evaluation, reuse."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from core.configs import ContrastiveConfig
from core.dataroot import DataRoot
from core.jobs import JobCancelled
from core.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from core.runs import list_runs, load_run
from core.sources.catalog import read_catalog, write_catalog
from train.contrastive import Views, augment, train_contrastive

TINY = {
    "epochs": 2,
    "steps_per_epoch": 2,
    "batch_size": 16,
    "dim": 16,
    "mlp_dim": 32,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_demo):
    copy = tmp_path_factory.mktemp("contrastive") / "city"
    shutil.copytree(tiny_demo, copy)
    return copy


def config(root, **changes) -> ContrastiveConfig:
    return ContrastiveConfig(data=str(root), **{**TINY, **changes})


def test_augment_gives_different_normalised_views_repeatably():
    pixels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    first = augment(pixels, torch.Generator().manual_seed(0), 0.35)
    again = augment(pixels, torch.Generator().manual_seed(0), 0.35)
    other = augment(pixels, torch.Generator().manual_seed(1), 0.35)
    assert first.shape == (8, 3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert first.is_contiguous(memory_format=torch.channels_last)
    assert float(first.min()) > -3 and float(first.max()) < 3  # ImageNet-normalised [0, 1] pixels


def reference_view(image: torch.Tensor, views: Views, i: int) -> torch.Tensor:
    """Image ``i``'s view written out one step at a time, each step as torchvision defines it."""
    x = image[None].double() / 255
    area, log_ratio = float(views.area[i]), float(views.log_ratio[i])
    width = min(math.sqrt(area * math.exp(log_ratio)), 1.0)
    height = min(math.sqrt(area / math.exp(log_ratio)), 1.0)
    theta = torch.tensor(
        [
            [width * float(views.flip[i]), 0.0, float(views.shift_x[i]) * (1 - width)],
            [0.0, height, float(views.shift_y[i]) * (1 - height)],
        ],
        dtype=torch.float64,
    )[None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)

    def luma(y: torch.Tensor) -> torch.Tensor:
        return 0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3]

    if views.jitter[i]:
        x = x * float(views.brightness[i])  # brightness: towards black
        grey_mean = luma(x).mean()
        x = grey_mean + (x - grey_mean) * float(views.contrast[i])  # contrast: the grey mean
        x = luma(x) + (x - luma(x)) * float(views.saturation[i])  # saturation: the luma
    x = x.clamp(0, 1)
    if views.grey[i]:
        x = luma(x).expand_as(x)
    if views.blur[i]:
        x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if views.solarize[i]:
        x = torch.where(x >= 0.5, 1 - x, x)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x - mean) / std)[0]


def test_augment_equals_each_step_done_image_by_image():
    pixels = torch.randint(0, 256, (64, 3, 12, 10), generator=torch.Generator().manual_seed(2))
    pixels = pixels.to(torch.uint8)
    views = Views.draw(64, torch.Generator().manual_seed(3), 0.35)
    for flag in (views.jitter, views.grey, views.blur, views.solarize, views.flip < 0):
        assert 0 < int(flag.sum()) < 64  # every branch is taken and left out
    out = views.apply(pixels)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    for i in range(64):
        expected = reference_view(pixels[i], views, i).float()
        torch.testing.assert_close(out[i], expected, rtol=0, atol=2e-5, msg=f"image {i}")


@pytest.mark.parametrize("objective", ["temporal", "unified"])
def test_a_run_saves_encoder_embeddings_and_pair_statistics(root, objective):
    run_id = train_contrastive(config(root, objective=objective), log=lambda _: None)
    run = load_run(DataRoot(root).runs / run_id)
    ids, matrix = run.embeddings()
    catalog = read_catalog(DataRoot(root).catalog, check_files=False).images
    assert set(ids) == set(catalog.loc[catalog["source"] == "gsv", "cell_id"])
    assert matrix.shape[1] == 128 and np.isfinite(matrix).all()  # convnet_small features
    rules = ["temporal", "spatial", "global"] if objective == "unified" else ["temporal"]
    assert sorted(run.metrics["pairs"]) == sorted(rules)
    assert run.metrics["pairs"]["temporal"]["count"] > 0
    assert [c for c in run.epochs.columns if c.startswith("loss_")] == [f"loss_{r}" for r in rules]
    predictions = run.predictions()
    assert {"train", "holdout"} == set(predictions["split"])
    assert (run.path / "backbone.safetensors").is_file()
    assert not (run.path / "checkpoint.safetensors").exists()


def test_temporal_pairs_of_the_panorama_source_come_from_place_and_time_alone(root):
    from core.pairs import PairConfig, temporal_pairs
    from train.contrastive import source_images

    run_id = train_contrastive(
        config(root, objective="temporal", source="amsterdam_panorama"), log=lambda _: None
    )
    run = load_run(DataRoot(root).runs / run_id)
    assert run.config["source"] == "amsterdam_panorama"
    assert run.metrics["pairs"]["temporal"]["count"] > 0
    catalog = read_catalog(DataRoot(root).catalog, check_files=False).images
    ids, _ = run.embeddings()
    assert set(ids) == set(catalog.loc[catalog["source"] == "amsterdam_panorama", "cell_id"])
    # every panorama has its own id per capture: the pairs join different panoramas of one
    # place and heading, captured in different years, found by position and time only
    images = source_images(DataRoot(root), "amsterdam_panorama")
    images = images.merge(catalog[["id", "pano_id"]], on="id")
    pairs = temporal_pairs(images, PairConfig())
    a, b = images.iloc[pairs["a"]], images.iloc[pairs["b"]]
    assert len(pairs) and (a["pano_id"].to_numpy() != b["pano_id"].to_numpy()).all()
    years = a["captured_at"].dt.year.to_numpy(), b["captured_at"].dt.year.to_numpy()
    assert (years[0] != years[1]).all()


def test_an_interrupted_run_resumes_to_the_same_weights(root):
    straight = train_contrastive(config(root, epochs=3, seed=5), log=lambda _: None)

    def stop_after_epoch_2(values):
        if values.get("epoch") == 2:
            raise JobCancelled("stopped for the test")

    with pytest.raises(JobCancelled):
        train_contrastive(
            config(root, epochs=3, seed=5), log=lambda _: None, progress=stop_after_epoch_2
        )
    failed = next(
        p for p in DataRoot(root).runs.iterdir() if p.name.startswith(".failed-contrastive")
    )
    assert (failed / "checkpoint.safetensors").is_file()
    run_id = failed.name.removeprefix(".failed-")
    assert run_id not in set(list_runs(DataRoot(root).runs)["run_id"])

    resumed = train_contrastive(config(root, resume=run_id), log=lambda _: None)
    assert resumed == run_id
    epochs = load_run(DataRoot(root).runs / run_id).epochs
    assert epochs["epoch"].tolist() == [1, 2, 3]
    a = load_file(DataRoot(root).runs / straight / "backbone.safetensors")
    b = load_file(DataRoot(root).runs / run_id / "backbone.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_resume_of_a_complete_run_is_refused(root):
    run_id = train_contrastive(config(root, epochs=1), log=lambda _: None)
    with pytest.raises(FileExistsError, match="complete"):
        train_contrastive(config(root, resume=run_id), log=lambda _: None)


def test_single_capture_date_is_a_clear_cli_error(root, tmp_path):
    copy = tmp_path / "one-date"
    # hard links: the images are checked before training; write_catalog replaces the catalog
    shutil.copytree(
        root, copy, copy_function=os.link, ignore=shutil.ignore_patterns("runs", "cache")
    )
    catalog = pd.DataFrame(
        read_catalog(copy / "street" / "catalog.parquet", check_files=False).images
    )
    catalog["captured_at"] = pd.Timestamp("2020-06-01", tz="UTC")
    write_catalog(
        catalog.drop(columns=["geometry", "cell_id"]), copy / "street" / "catalog.parquet"
    )
    result = subprocess.run(
        [sys.executable, "-m", "train", "contrastive", "--data", str(copy), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "single capture date" in result.stderr and "Traceback" not in result.stderr


def test_evaluation_report_and_the_encoder_as_fusion_ground_weights(root, tmp_path):
    from core.configs import FusionConfig
    from train.contrastive_eval import evaluate, write_report
    from train.fusion import train_fusion

    runs = [
        train_contrastive(config(root, objective=o, seed=1), log=lambda _: None)
        for o in ("spatial", "global")
    ]
    results = evaluate(DataRoot(root), runs, {"random": None}, log=lambda _: None, device="cpu")
    assert results["encoder"].tolist() == ["spatial", "global", "random"]
    for column in (
        "recall@1",
        "recall@10",
        "socioeconomic_r2",
        "perception_accuracy",
        "perception_auc",
    ):
        assert results[column].notna().all(), column
    assert (results["recall@10"] >= results["recall@1"]).all()
    csv, md = write_report(results, tmp_path, "tiny")
    assert pd.read_csv(csv)["run_id"].notna().sum() == 2 and "| spatial | 1 |" in md.read_text()

    fusion = train_fusion(
        FusionConfig(
            data=str(root),
            epochs=1,
            block_size=300.0,
            aerial_px=32,
            ground_weights=str(DataRoot(root).runs / runs[0] / "backbone.safetensors"),
        ),
        log=lambda _: None,
    )
    assert (
        load_run(DataRoot(root).runs / fusion)
        .config["ground_weights"]
        .endswith("backbone.safetensors")
    )


def test_unified_weights_select_the_rules():
    assert ContrastiveConfig(
        objective="unified", loss_weights={"temporal": 0.5, "spatial": 0.0, "global": 1.0}
    ).rules == {"temporal": 0.5, "global": 1.0}
    assert ContrastiveConfig(objective="spatial").rules == {"spatial": 1.0}
    with pytest.raises(ValueError, match="unknown rules"):
        ContrastiveConfig(objective="unified", loss_weights={"colour": 1.0})
    with pytest.raises(ValueError, match="objective"):
        ContrastiveConfig(objective="nearby")
    with pytest.raises(ValueError, match="PairConfig"):
        replace(ContrastiveConfig(), pairs={"spatial_buffer_m": -1})


def test_a_contrastive_run_repeats_from_its_own_config(root):
    from safetensors.numpy import load_file

    from core.runs import BACKBONE_FILE, list_runs, load_run
    from train.cli import main

    def new_run(before: set[str]):
        runs = list_runs(root / "runs", kind="contrastive")
        (path,) = runs.loc[~runs["run_id"].isin(before), "path"]
        return load_run(path)

    existing = set(list_runs(root / "runs", kind="contrastive")["run_id"])
    options = ["--data", str(root), "--objective", "unified", "--seed", "5", "--epochs", "1"]
    tiny = ["--steps-per-epoch", "2", "--batch-size", "16", "--dim", "16", "--mlp-dim", "32"]
    assert main(["contrastive", *options, *tiny, "--device", "cpu"]) == 0
    first = new_run(existing)
    assert main(["contrastive", "--config", str(first.path / "config.yaml")]) == 0
    second = new_run(existing | {first.run_id})
    assert second.config == first.config
    timing = "images_per_s"  # the only measured value that may differ
    assert {k: v for k, v in second.metrics.items() if k != timing} == {
        k: v for k, v in first.metrics.items() if k != timing
    }
    weights = [load_file(run.path / BACKBONE_FILE) for run in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        np.testing.assert_array_equal(weights[0][name], weights[1][name])
