"""Run folders: the writer's temp -> final/failed renames, reading back, listing."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.runs import RunWriter, list_runs, load_run, new_run_id, parse_run_id, run_path

CONFIG = {"model": "fusion", "target": "won", "epochs": 3, "lr": 1e-3, "modalities": ["aerial"]}
IDS = np.array([12134872, 12134873, 12144872], dtype=np.int64)


def predictions() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "cell_id": IDS,
            "split": ["train", "val", "test"],
            "true": [0.1, -0.2, 0.3],
            "predicted": [0.12, -0.1, 0.25],
            "district": ["Centrum", "Zuid", "West"],
        }
    )


def write_complete(writer: RunWriter, tau: float = 0.4) -> None:
    writer.write_predictions(predictions())
    writer.write_metrics({"kendall_tau": tau, "r2": float("nan"), "per_split": {"test": tau}})


def test_new_run_id_format_and_parse():
    run_id = new_run_id("fusion-matrix")
    assert re.fullmatch(r"fusion-matrix-\d{8}-\d{6}-[0-9a-f]{4}", run_id)
    kind, created = parse_run_id(run_id)
    assert kind == "fusion-matrix"
    assert abs(pd.Timestamp.now(tz="UTC") - created) < pd.Timedelta(minutes=1)
    for bad in ("", "../x", ".hidden", "a b"):
        with pytest.raises(ValueError, match="run kind"):
            new_run_id(bad)
    with pytest.raises(ValueError, match="not a run id"):
        parse_run_id("my-best-run")


def test_happy_path_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(3, 5)).astype(np.float32)
    weights = {"head.weight": rng.normal(size=(1, 4)).astype(np.float32), "step": np.arange(3)}
    with RunWriter(tmp_path, "fusion", CONFIG) as run:
        assert run.path.name == f".tmp-{run.run_id}"
        assert (run.path / "config.yaml").is_file()  # written at once
        run.log("start")
        run.log_epoch(epoch=1, loss=0.5, val_tau=None)
        run.log_epoch(epoch=2, loss=0.25, val_tau=0.3)
        run.progress(epoch=2, loss=np.float32(0.25), val_tau=0.3)
        write_complete(run)
        run.write_embeddings(IDS, matrix)
        run.save_model(weights, {"backbone": "resnet18", "width": 512})
    final = tmp_path / run.run_id
    assert run.path == final and final.is_dir()
    assert not list(tmp_path.glob(".tmp-*"))

    loaded = load_run(final)
    assert loaded.run_id == run.run_id
    assert loaded.config == CONFIG and list(loaded.config) == list(CONFIG)  # order kept
    assert loaded.metrics == {"kendall_tau": 0.4, "r2": None, "per_split": {"test": 0.4}}
    assert list(loaded.epochs.columns) == ["epoch", "loss", "val_tau"]
    assert loaded.epochs["loss"].tolist() == [0.5, 0.25]
    assert math.isnan(loaded.epochs["val_tau"][0])
    assert json.loads((final / "progress.json").read_text())["epoch"] == 2
    assert "start" in (final / "log.txt").read_text()

    frame = loaded.predictions()
    pd.testing.assert_frame_equal(frame, predictions())
    assert frame["cell_id"].dtype == np.int64

    ids, vectors = loaded.embeddings()
    assert ids.dtype == np.int64 and vectors.dtype == np.float32
    np.testing.assert_array_equal(ids, IDS)
    np.testing.assert_array_equal(vectors, matrix)

    state = loaded.state_dict()
    assert state.keys() == weights.keys()
    for name, value in weights.items():
        np.testing.assert_array_equal(state[name], value)
    assert loaded.model_metadata() == {"backbone": "resnet18", "width": "512"}


def test_torch_tensors_are_accepted(tmp_path):
    torch = pytest.importorskip("torch")
    layer = torch.nn.Linear(4, 2)
    embedding = torch.randn(3, 4, requires_grad=True)
    with RunWriter(tmp_path, "fusion", CONFIG) as run:
        write_complete(run)
        run.write_embeddings(torch.from_numpy(IDS), embedding)
        run.save_model({**layer.state_dict(), "half": torch.ones(2, dtype=torch.bfloat16)})
    loaded = load_run(run.path)
    np.testing.assert_array_equal(loaded.embeddings()[1], embedding.detach().numpy())
    state = loaded.state_dict()
    np.testing.assert_array_equal(state["weight"], layer.weight.detach().numpy())
    assert state["half"].dtype == np.float32


def test_list_runs_flattens_and_orders(tmp_path):
    with RunWriter(tmp_path, "fusion", CONFIG) as first:
        write_complete(first, tau=0.3)
    with RunWriter(tmp_path, "contrastive", {**CONFIG, "model": "moco"}) as second:
        write_complete(second, tau=0.5)
    old = "fusion-20200101-000000-abcd"
    shutil.copytree(first.path, tmp_path / old)

    runs = list_runs(tmp_path)
    assert list(runs.columns[:4]) == ["run_id", "kind", "created", "path"]
    assert runs["run_id"].iloc[-1] == old  # newest first
    assert set(runs["run_id"]) == {first.run_id, second.run_id, old}
    row = runs.set_index("run_id").loc[second.run_id]
    assert row["kind"] == "contrastive"
    assert row["config.model"] == "moco" and row["config.epochs"] == 3
    assert row["metrics.kendall_tau"] == 0.5
    assert "config.modalities" not in runs.columns  # only top-level scalars
    assert "metrics.per_split" not in runs.columns
    assert row["path"] == tmp_path / second.run_id

    assert list_runs(tmp_path, kind="fusion")["run_id"].tolist() == [first.run_id, old]
    assert list_runs(tmp_path / "missing").empty


def test_failed_run_is_kept_apart_with_traceback(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), RunWriter(tmp_path, "fusion", CONFIG) as run:
        write_complete(run)
        raise RuntimeError("boom")
    assert run.path == tmp_path / f".failed-{run.run_id}"
    log = (run.path / "log.txt").read_text()
    assert "Traceback" in log and "RuntimeError: boom" in log
    assert not (tmp_path / run.run_id).exists()
    assert not list(tmp_path.glob(".tmp-*"))
    assert list_runs(tmp_path).empty


def test_missing_predictions_fails_the_run(tmp_path):
    with (
        pytest.raises(RuntimeError, match=r"missing \['predictions.parquet'\]"),
        RunWriter(tmp_path, "fusion", CONFIG) as run,
    ):
        run.write_metrics({"kendall_tau": 0.4})
    assert run.path.name.startswith(".failed-")
    assert "missing ['predictions.parquet']" in (run.path / "log.txt").read_text()
    assert list_runs(tmp_path).empty


def test_list_runs_skips_corrupt_run_with_warning(tmp_path):
    with RunWriter(tmp_path, "fusion", CONFIG) as good:
        write_complete(good)
    with RunWriter(tmp_path, "fusion", CONFIG) as bad:
        write_complete(bad)
    (bad.path / "metrics.json").write_text("{not json")
    (tmp_path / "notes").mkdir()  # not a run: no metrics.json, ignored silently
    with pytest.warns(UserWarning, match=rf"{bad.run_id}/metrics.json: not valid JSON"):
        runs = list_runs(tmp_path)
    assert runs["run_id"].tolist() == [good.run_id]


def test_load_run_errors_name_the_file(tmp_path):
    with RunWriter(tmp_path, "fusion", CONFIG) as run:
        write_complete(run)
    loaded = load_run(run.path)
    with pytest.raises(FileNotFoundError, match="embeddings.parquet"):
        loaded.embeddings()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        loaded.state_dict()
    (run.path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors"):
        loaded.state_dict()
    (run.path / "predictions.parquet").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="predictions.parquet"):
        loaded.predictions()
    (run.path / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        load_run(run.path)
    (run.path / "config.yaml").write_text("a: [unclosed")
    with pytest.raises(ValueError, match="config.yaml: not valid YAML"):
        load_run(run.path)
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        load_run(tmp_path / "nope")


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not YAML-serialisable"):
        RunWriter(tmp_path, "fusion", {"lr": np.float64(0.1)})
    assert not list(tmp_path.iterdir())  # nothing created for a rejected config
    with pytest.raises(RuntimeError, match="boom"), RunWriter(tmp_path, "fusion", CONFIG) as run:
        with pytest.raises(ValueError, match=r"predictions.parquet: missing columns \['split'\]"):
            run.write_predictions(predictions().drop(columns="split"))
        with pytest.raises(ValueError, match="cell_id must be integers"):
            run.write_predictions(predictions().astype({"cell_id": float}))
        with pytest.raises(ValueError, match=r"matrix must be \(3, dim\)"):
            run.write_embeddings(IDS, np.zeros((2, 4)))
        with pytest.raises(ValueError, match="1 duplicate cell ids"):
            run.write_embeddings(IDS[[0, 0, 1]], np.zeros((3, 4)))
        with pytest.raises(ValueError, match="1 of 3 embeddings hold NaN"):
            run.write_embeddings(IDS, np.array([[0.0], [np.nan], [1.0]]))
        run.log_epoch(epoch=1, loss=0.5)
        with pytest.raises(ValueError, match=r"metrics.csv: new columns \['lr'\]"):
            run.log_epoch(epoch=2, lr=0.1)
        raise RuntimeError("boom")


def test_import_does_not_load_torch():
    # A fresh interpreter: this test process may have imported torch already.
    code = "import sys, core.runs, core.metrics; print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_an_interrupted_run_resumes_in_place(tmp_path):
    with (
        pytest.raises(RuntimeError, match="boom"),
        RunWriter(tmp_path, "probe", {"lr": 0.1}) as run,
    ):
        run.log_epoch(epoch=1, loss=1.0)
        run.log_epoch(epoch=2, loss=0.5)
        raise RuntimeError("boom")
    assert (tmp_path / f".failed-{run.run_id}").is_dir()
    resumed = RunWriter.resume(tmp_path, run.run_id)
    assert resumed.path == tmp_path / f".tmp-{run.run_id}" and resumed.config == {"lr": 0.1}
    resumed.keep_epochs(1)
    with resumed:
        resumed.log_epoch(epoch=2, loss=0.4)
        resumed.write_metrics({"done": True})
        resumed.write_predictions(
            pd.DataFrame({"cell_id": [1], "split": ["test"], "true": [0.0], "predicted": [0.0]})
        )
    finished = load_run(tmp_path / run.run_id)
    assert finished.epochs["epoch"].tolist() == [1, 2] and finished.epochs["loss"].tolist() == [
        1.0,
        0.4,
    ]
    assert "resumed from .failed-" in (tmp_path / run.run_id / "log.txt").read_text()
    with pytest.raises(FileExistsError, match="complete"):
        RunWriter.resume(tmp_path, run.run_id)
    with pytest.raises(FileNotFoundError, match="no interrupted run"):
        RunWriter.resume(tmp_path, "probe-20260101-000000-abcd")


# --- run ids become folders only through run_path ----------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["../outside", "..", "fusion-20260101-000000-abcd/../../x", "/etc", ".tmp-x", "", "a/b"],
)
def test_run_path_refuses_what_is_not_a_run_id(tmp_path, bad):
    with pytest.raises(ValueError, match="is not a run id"):
        run_path(tmp_path, bad)


def test_run_path_refuses_a_symlink_out_of_the_root(tmp_path):
    root, outside = tmp_path / "runs", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "fusion-20260101-000000-abcd").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=r"symbolic link to .*elsewhere, outside"):
        run_path(root, "fusion-20260101-000000-abcd")
    inside = root / "store"
    inside.mkdir()
    (root / "fusion-20260101-000000-beef").symlink_to(inside, target_is_directory=True)
    assert run_path(root, "fusion-20260101-000000-beef") == root / "fusion-20260101-000000-beef"
    assert run_path(root, "x-20260101-000000-0000", prefix=".tmp-") == root / (
        ".tmp-x-20260101-000000-0000"
    )


def test_list_runs_skips_a_symlinked_run_outside_the_root(tmp_path):
    root, outside = tmp_path / "runs", tmp_path / "elsewhere"
    with RunWriter(root, "fusion", {"lr": 0.1}) as run:
        write_complete(run)
    with RunWriter(outside, "fusion", {"lr": 9.0}) as foreign:
        write_complete(foreign)
    # sorts last, so it would be the newest run and the dashboard's default
    (root / "fusion-29990101-000000-ffff").symlink_to(outside / foreign.run_id)
    with pytest.warns(UserWarning, match=r"fusion-29990101-000000-ffff: a symbolic link to"):
        runs = list_runs(root)
    assert runs["run_id"].tolist() == [run.run_id]


def test_resume_refuses_a_path_for_a_run_id(tmp_path):
    root = tmp_path / "runs"
    with pytest.raises(RuntimeError), RunWriter(tmp_path / "other", "probe", {}) as run:
        raise RuntimeError("boom")
    root.mkdir()
    before = sorted(p.name for p in (tmp_path / "other").iterdir())
    for bad in (f"../other/.failed-{run.run_id}", f"../other/{run.run_id}"):
        with pytest.raises(ValueError, match="is not a run id"):
            RunWriter.resume(root, bad)
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == before
    assert list(root.iterdir()) == []


def test_resolve_weights_takes_a_file_or_a_run_id_only(tmp_path):
    pytest.importorskip("torch")
    from train.common import resolve_weights

    root, outside = tmp_path / "runs", tmp_path / "elsewhere" / "runs-x"
    outside.mkdir(parents=True)
    (outside / "backbone.safetensors").write_bytes(b"x")
    root.mkdir()
    with pytest.raises(FileNotFoundError, match=r"\.\./elsewhere/runs-x: neither a weights file"):
        resolve_weights(root, "../elsewhere/runs-x")
    run_id = "contrastive-20260101-000000-abcd"
    (root / run_id).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        resolve_weights(root, run_id)
    assert resolve_weights(root, str(outside / "backbone.safetensors")) == str(
        outside / "backbone.safetensors"
    )
