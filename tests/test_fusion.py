"""The fusion model, its training recipe, run folders and the experiment matrix, on a tiny city."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from core.configs import FusionConfig
from core.dataroot import DataRoot
from core.datasets import labelled_cells
from core.experiments import summarise_matrix
from core.models.backbones import create_backbone, save_backbone
from core.models.fusion import FusionRegressor
from core.runs import list_runs, load_run
from train.fusion import predict_run, train_fusion
from train.matrix import write_report

QUICK = {"epochs": 2, "batch_size": 64, "block_size": 300.0}  # enough blocks for three splits


def test_merge_is_addition_then_bn_fc_fc():
    torch.manual_seed(0)
    model = FusionRegressor(create_backbone("convnet_small"), ground_dim=128).eval()
    aerial, ground = torch.randn(4, 3, 32, 32), torch.randn(4, 128)
    has = torch.ones(4, dtype=torch.bool)
    expected = torch.relu(model.fc(model.norm(model.aerial(aerial) + ground)))
    torch.testing.assert_close(model.embed(aerial, ground, has), expected)
    assert model.embed(aerial, ground, has).shape == (4, 100)
    assert model(aerial, ground, has).shape == (4,)


@pytest.mark.parametrize(
    ("aerial", "ground_dim", "projection"),
    [(True, 64, torch.nn.Linear), (True, None, None), (False, 64, torch.nn.Identity)],
)
def test_unimodal_and_projected_variants(aerial, ground_dim, projection):
    model = FusionRegressor(create_backbone("convnet_small") if aerial else None, ground_dim).eval()
    x = torch.randn(3, 3, 32, 32) if aerial else None
    g = torch.randn(3, ground_dim) if ground_dim else None
    has = torch.ones(3, dtype=torch.bool) if ground_dim else None
    assert model(x, g, has).shape == (3,)
    if projection is None:
        assert model.ground is None
    else:
        assert isinstance(model.ground, projection)


def test_cells_without_ground_images_use_the_learned_missing_vector():
    model = FusionRegressor(create_backbone("convnet_small"), ground_dim=128).eval()
    aerial = torch.randn(2, 3, 32, 32)
    has = torch.tensor([True, False])
    first = model(aerial, torch.randn(2, 128), has)
    second = model(aerial, torch.randn(2, 128), has)
    assert first[0] != second[0]  # real features matter
    assert first[1] == second[1]  # an image-less cell ignores its (zero) features
    with torch.no_grad():
        model.missing.add_(1.0)
    assert model(aerial, torch.randn(2, 128), has)[1] != first[1]


def test_a_model_needs_some_input():
    with pytest.raises(ValueError, match="needs an aerial backbone, ground features, or both"):
        FusionRegressor(None, None)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"aerial": False, "ground": None}, "needs aerial imagery, ground imagery, or both"),
        ({"ground": "Street View"}, r"\['street view'\] are not source names"),
        ({"ground": "gsv,mapillary,gsv"}, r"\['gsv'\] given more than once"),
        ({"ground": " , "}, "give a source"),
        ({"ground": "flickr", "flickr_subset": "building"}, "needs --scene-run"),
        ({"ground": "gsv,flickr", "flickr_subset": "outdoor"}, "needs --scene-run"),
        ({"flickr_subset": "night"}, "flickr_subset must be one of"),
    ],
)
def test_bad_configurations_are_clear_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        FusionConfig(**changes)


def test_ground_takes_one_source_or_several_and_labels_them():
    assert FusionConfig(ground="mapillary").label == "aerial+mapillary"
    several = FusionConfig(ground=" amsterdam_panorama, Mapillary ")
    assert several.ground == "amsterdam_panorama,mapillary"  # as config.yaml records it
    assert several.sources == ("amsterdam_panorama", "mapillary")
    assert several.label == "aerial+amsterdam_panorama+mapillary"
    listed = FusionConfig(aerial=False, ground=["gsv", "flickr"], flickr_subset="all")
    assert listed.ground == "gsv,flickr" and listed.label == "gsv+flickr(all)"
    assert FusionConfig.from_dict({"ground": listed.ground}).sources == ("gsv", "flickr")
    assert FusionConfig(ground=None).sources == ()


@pytest.fixture(scope="module")
def ground_weights(tiny_demo):
    path = tiny_demo.parent / "ground.safetensors"
    save_backbone(create_backbone("convnet_small", seed=3), path)
    return path


def test_train_writes_a_run_that_reloads_to_identical_predictions(tiny_demo, ground_weights):
    config = FusionConfig(
        data=str(tiny_demo), ground="gsv", ground_weights=str(ground_weights), **QUICK
    )
    run_id = train_fusion(config, log=lambda _: None)
    run = load_run(DataRoot(tiny_demo).runs / run_id)
    predictions = run.predictions()
    assert set(predictions["split"]) == {"train", "val", "test"}
    assert {"cell_id", "true", "predicted", "residual", "district", "ground_images"} <= set(
        predictions.columns
    )
    ids, embeddings = run.embeddings()
    np.testing.assert_array_equal(ids, predictions["cell_id"])
    assert embeddings.shape == (len(ids), 100)
    assert {"test_kendall_tau", "test_spearman", "test_r2", "test_mae", "best_epoch"} <= set(
        run.metrics
    )
    assert len(run.epochs) == 2 and run.config["label"] == "aerial+gsv"
    again = predict_run(run.path)
    np.testing.assert_allclose(again["predicted"], predictions["predicted"], rtol=1e-5, atol=1e-6)
    assert run_id in set(list_runs(DataRoot(tiny_demo).runs, kind="fusion")["run_id"])


def test_the_ground_branch_stays_frozen(tiny_demo, ground_weights):
    digest = hashlib.sha256(ground_weights.read_bytes()).hexdigest()
    config = FusionConfig(
        data=str(tiny_demo), ground="gsv", ground_weights=str(ground_weights), **QUICK
    )
    run_id = train_fusion(config, log=lambda _: None)
    assert hashlib.sha256(ground_weights.read_bytes()).hexdigest() == digest
    caches = list((DataRoot(tiny_demo).cache / "features").glob("convnet_small-*/features.npy"))
    snapshot = {p: np.array(np.load(p)) for p in caches}
    train_fusion(config, log=lambda _: None)
    for path, before in snapshot.items():
        np.testing.assert_array_equal(np.load(path), before)
    # The fusion model holds no ground encoder parameters at all: only the merge.
    state = load_run(DataRoot(tiny_demo).runs / run_id).state_dict()
    assert not any(k.startswith("ground.") and "conv" in k for k in state)
    assert {k for k in state if not k.startswith("aerial.")} == {
        "missing",
        "norm.weight",
        "norm.bias",
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
        "fc.weight",
        "fc.bias",
        "out.weight",
        "out.bias",
    }


def test_ground_only_and_sparse_flickr_run(tiny_demo, ground_weights):
    for config in (
        FusionConfig(
            data=str(tiny_demo),
            aerial=False,
            ground="gsv",
            ground_weights=str(ground_weights),
            **QUICK,
        ),
        FusionConfig(data=str(tiny_demo), ground="flickr", **QUICK),
    ):
        run = load_run(DataRoot(tiny_demo).runs / train_fusion(config, log=lambda _: None))
        predictions = run.predictions()
        assert np.isfinite(predictions["predicted"]).all()
        if config.ground == "flickr":
            assert (
                predictions["ground_images"] == 0
            ).any()  # image-less cells are kept and predicted


def test_fusion_on_two_sources_pools_their_images_per_cell(tiny_demo, ground_weights):
    from core.features import extract_features, pool_by_cell
    from core.sources.catalog import images_per_cell, read_catalog
    from train.fusion import ground_inputs

    sources = ("amsterdam_panorama", "mapillary")
    config = FusionConfig(
        data=str(tiny_demo), ground=",".join(sources), ground_weights=str(ground_weights), **QUICK
    )
    run = load_run(DataRoot(tiny_demo).runs / train_fusion(config, log=lambda _: None))
    assert run.config["ground"] == "amsterdam_panorama,mapillary"
    assert run.config["label"] == run.metrics["label"] == "aerial+amsterdam_panorama+mapillary"
    predictions = run.predictions()
    assert np.isfinite(predictions["predicted"]).all()
    ids = predictions["cell_id"].to_numpy()
    catalog = read_catalog(DataRoot(tiny_demo).catalog).images
    counts = images_per_cell(catalog, ids)
    assert run.metrics["ground_images"] == {s: int(counts[s].sum()) for s in sources}
    assert all(run.metrics["ground_images"].values())
    np.testing.assert_array_equal(
        predictions["ground_images"], counts[list(sources)].sum(axis=1).to_numpy()
    )
    # the pooled vector is the mean over every image of both sources in the cell
    pooled, per_source = ground_inputs(config, DataRoot(tiny_demo), ids, log=lambda _: None)
    assert list(per_source.columns) == list(sources)
    both = catalog[catalog["source"].isin(sources)].sort_values("id", ignore_index=True)
    features = extract_features(
        both, "convnet_small", str(ground_weights), DataRoot(tiny_demo).cache / "features"
    )
    expected, total = pool_by_cell(
        features, pd.Series(both["cell_id"].to_numpy(), index=both["id"].to_numpy()), ids
    )
    np.testing.assert_array_equal(per_source.sum(axis=1).to_numpy(), total)
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)


def test_missing_or_mismatched_ground_weights_are_clear_errors(tiny_demo, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        train_fusion(
            FusionConfig(
                data=str(tiny_demo), ground_weights=str(tmp_path / "nope.safetensors"), **QUICK
            )
        )
    other = tmp_path / "resnet.safetensors"
    save_backbone(create_backbone("resnet18"), other)
    with pytest.raises(ValueError, match="resnet.safetensors: checkpoint of backbone 'resnet18'"):
        train_fusion(FusionConfig(data=str(tiny_demo), ground_weights=str(other), **QUICK))
    assert not any(p.name.startswith(".tmp-") for p in DataRoot(tiny_demo).runs.glob("*"))


def test_nan_labels_are_dropped_with_a_count(tiny_demo, tmp_path):
    source, copy = DataRoot(tiny_demo), DataRoot(tmp_path / "root")
    for path in (source.grid, source.lbm_grid):
        target = copy.root / path.relative_to(source.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    scores = pd.read_csv(source.scores)
    latest = scores["jaar"] == scores["jaar"].max()
    scores.loc[scores.index[latest][:5], "won"] = np.nan
    scores.to_csv(copy.scores, index=False)
    with pytest.warns(
        UserWarning, match=f"target 'won': dropped 5 of {latest.sum()} cells without a value"
    ):
        cells = labelled_cells(copy, None, "won", block_size=300.0)  # three non-empty splits
    assert len(cells) == latest.sum() - 5


def test_matrix_summary_and_derived_figures(tmp_path):
    results = pd.DataFrame(
        [
            {
                "configuration": c,
                "seed": s,
                "run_id": f"r{s}{c}",
                "test_kendall_tau": t,
                "test_spearman": t,
                "test_r2": t,
                "ground_weights": "x",
            }
            for s, taus in {0: (0.2, 0.3, 0.25), 1: (0.3, 0.5, 0.35)}.items()
            for c, t in zip(("aerial", "aerial+gsv", "aerial+flickr(building)"), taus, strict=True)
        ]
    )
    table, derived = summarise_matrix(results)
    assert table.loc["aerial+gsv", "tau_mean"] == pytest.approx(0.4)
    assert derived["gsv_gain_over_aerial_mean"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert derived["gap_closed_by_building_flickr_mean"] == pytest.approx((0.5 + 0.25) / 2)
    csv, md = write_report(results, tmp_path, "demo")
    assert pd.read_csv(csv).shape[0] == 6
    text = md.read_text()
    assert (
        "| aerial+gsv | 0.400 ± 0.141 |" in text
        and "gap closed by building-filtered Flickr: 38%" in text
    )


def test_default_runs_are_reused_only_when_their_settings_match(tmp_path):
    from core.runs import RunWriter
    from train.demo_runs import _latest

    root = DataRoot(tmp_path)
    made = {}
    for weights in (None, "a.safetensors"):
        with RunWriter(
            root.runs, "fusion", {"label": "aerial", "target": "won", "ground_weights": weights}
        ) as run:
            run.write_metrics({"test_kendall_tau": 0.1})
            run.write_predictions(
                pd.DataFrame({"cell_id": [1], "split": ["test"], "true": [0.0], "predicted": [0.0]})
            )
        made[weights] = run.run_id
    assert _latest(root, "fusion", label="aerial", ground_weights=None) == made[None]
    assert (
        _latest(root, "fusion", label="aerial", ground_weights="a.safetensors")
        == made["a.safetensors"]
    )
    assert _latest(root, "fusion", label="aerial", ground_weights="b.safetensors") is None
