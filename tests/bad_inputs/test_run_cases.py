"""Bad inputs around runs: run ids, symbolic links, checkpoints and config files.

Each case asserts the exact outcome (a clear error naming the id or the file; exit code 2 from
the command line) and that nothing stored changed: every file under the test's folder, links
included, is byte for byte what it was, and nothing was added.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.runs import RunWriter, list_runs, load_run
from train.cli import main

# The evaluations list the runs first: the link out of the runs folder is skipped with a warning
# (asserted in test_list_runs_never_lists_a_linked_run).
pytestmark = pytest.mark.filterwarnings("ignore:skipping run .*a symbolic link:UserWarning")

#: A well-formed id that no run has.
UNKNOWN = "contrastive-20260101-000000-abcd"
#: Sorts after every real run: the newest, and so the default, if it were listed.
LINKED = "contrastive-29991231-235959-ffff"


def complete_run(runs: Path, kind: str = "contrastive", config: dict | None = None) -> str:
    with RunWriter(runs, kind, config or {"objective": "temporal", "seed": 0}) as run:
        run.write_predictions(
            pd.DataFrame({"cell_id": [1], "split": ["test"], "true": [0.0], "predicted": [0.0]})
        )
        run.write_metrics({"recall@1": 0.5})
        run.save_model({"w": np.ones((2, 2), dtype=np.float32)})
    (runs / run.run_id / "backbone.safetensors").write_bytes(
        (runs / run.run_id / "model.safetensors").read_bytes()
    )
    return run.run_id


@pytest.fixture
def world(tmp_path):
    """``data/runs`` with a complete and a failed run, a link to a run outside, and
    ``outside/`` holding a complete run and a failed one that ids must never reach."""
    runs, outside = tmp_path / "data" / "runs", tmp_path / "outside"
    inside = complete_run(runs)
    with pytest.raises(RuntimeError), RunWriter(runs, "contrastive", {"seed": 1}) as failed:
        raise RuntimeError("interrupted")
    foreign = complete_run(outside)
    with pytest.raises(RuntimeError), RunWriter(outside, "contrastive", {"seed": 2}) as lost:
        raise RuntimeError("interrupted")
    (runs / LINKED).symlink_to(outside / foreign, target_is_directory=True)
    return {
        "root": tmp_path,
        "data": tmp_path / "data",
        "runs": runs,
        "inside": inside,
        "failed": failed.run_id,
        "foreign": foreign,
        "lost": lost.run_id,
    }


def snapshot(folder: Path) -> dict[str, object]:
    """Every entry under ``folder``: a file's bytes, a link's target, a folder's name."""
    entries: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            entries[key] = ("link", os.readlink(path))
        elif path.is_file():
            entries[key] = path.read_bytes()
        else:
            entries[key] = "folder"
    return entries


def assert_fails_cleanly(world, capsys, argv: list[str], message: str) -> None:
    """``stadsbeeld argv`` exits with 2, one ``error:`` line matching ``message``, no traceback,
    and leaves every stored file as it was."""
    before = snapshot(world["root"])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert snapshot(world["root"]) == before


# --- run ids on the command line ----------------------------------------------------------------


def test_resume_of_a_path_out_of_the_runs_folder(world, capsys):
    bad = f"../../outside/.failed-{world['lost']}"
    data = str(world["data"])
    assert_fails_cleanly(
        world,
        capsys,
        ["contrastive", "--data", data, "--resume", bad],
        rf"'{re.escape(bad)}' is not a run id \(<kind>-<yyyymmdd-hhmmss>-<4 hex>\)",
    )


def test_resume_of_a_complete_run(world, capsys):
    data, run_id = str(world["data"]), world["inside"]
    assert_fails_cleanly(
        world,
        capsys,
        ["contrastive", "--data", data, "--resume", run_id],
        rf"runs/{run_id}: run {run_id} is complete; nothing to resume",
    )


def test_resume_of_an_unknown_run(world, capsys):
    data = str(world["data"])
    assert_fails_cleanly(
        world,
        capsys,
        ["contrastive", "--data", data, "--resume", UNKNOWN],
        rf"no interrupted run {UNKNOWN} \(\.tmp-{UNKNOWN} or \.failed-{UNKNOWN}\)",
    )


def test_resume_of_a_run_linked_from_outside(world, capsys):
    # a link named like an interrupted run, pointing at one outside the runs folder
    (world["runs"] / f".failed-{UNKNOWN}").symlink_to(
        world["root"] / "outside" / f".failed-{world['lost']}"
    )
    data = str(world["data"])
    assert_fails_cleanly(
        world,
        capsys,
        ["contrastive", "--data", data, "--resume", UNKNOWN],
        rf"\.failed-{UNKNOWN}: run {UNKNOWN} is a symbolic link to .*outside",
    )


def test_contrastive_eval_of_a_path(world, capsys):
    bad = f"../../outside/{world['foreign']}"
    assert_fails_cleanly(
        world,
        capsys,
        ["contrastive-eval", bad, "--data", str(world["data"])],
        rf"'{re.escape(bad)}' is not a run id",
    )


def test_contrastive_eval_of_a_linked_run(world, capsys):
    assert_fails_cleanly(
        world,
        capsys,
        ["contrastive-eval", LINKED, "--data", str(world["data"])],
        rf"runs/{LINKED}: run {LINKED} is a symbolic link to .*outside/{world['foreign']}, outside",
    )


def test_uge_bench_of_a_path(world, capsys):
    assert_fails_cleanly(
        world,
        capsys,
        ["uge-bench", "../..", "--data", str(world["data"])],
        r"'\.\./\.\.' is not a run id",
    )


def test_uge_bench_of_an_id_with_a_trailing_newline(world, capsys):
    bad = f"{world['inside']}\n"
    assert_fails_cleanly(
        world, capsys, ["uge-bench", bad, "--data", str(world["data"])], r"is not a run id"
    )


def test_uge_bench_of_an_unknown_run(world, capsys):
    assert_fails_cleanly(
        world,
        capsys,
        ["uge-bench", UNKNOWN, "--data", str(world["data"])],
        rf"runs/{UNKNOWN}: run folder not found",
    )


def test_weights_given_as_a_path_to_a_run_folder(world, capsys):
    bad = f"../outside/{world['foreign']}"  # a folder, not a weights file
    assert_fails_cleanly(
        world,
        capsys,
        ["fusion", "--data", str(world["data"]), "--ground_weights", bad],
        rf"{re.escape(bad)}: neither a weights file nor a run id",
    )


def test_weights_given_as_a_linked_run(world, capsys):
    assert_fails_cleanly(
        world,
        capsys,
        ["fusion", "--data", str(world["data"]), "--aerial_weights", LINKED],
        rf"runs/{LINKED}: run {LINKED} is a symbolic link to .*, outside",
    )


def test_a_run_whose_config_holds_a_python_object_tag(world, capsys):
    config = world["runs"] / world["inside"] / "config.yaml"
    config.write_text("objective: !!python/object/apply:os.system ['touch PWNED']\n")
    assert_fails_cleanly(
        world,
        capsys,
        ["contrastive-eval", world["inside"], "--data", str(world["data"])],
        rf"{world['inside']}/config.yaml: not valid YAML \(could not determine a constructor",
    )
    assert not Path("PWNED").exists()


# --- config files -----------------------------------------------------------------------------


def test_a_config_file_with_a_python_object_tag(world, capsys, monkeypatch):
    monkeypatch.chdir(world["root"])
    evil = world["root"] / "evil.yaml"
    evil.write_text("epochs: !!python/object/apply:os.system ['touch PWNED']\n")
    assert_fails_cleanly(
        world,
        capsys,
        ["fusion", "--data", str(world["data"]), "--config", str(evil)],
        rf"{re.escape(str(evil))}: not a valid --config YAML file \(could not determine a "
        r"constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'",
    )
    assert not (world["root"] / "PWNED").exists()


def test_a_config_file_with_a_wrong_type(world, capsys):
    wrong = world["root"] / "wrong.yaml"
    wrong.write_text("epochs: many\n")
    assert_fails_cleanly(
        world,
        capsys,
        ["fusion", "--data", str(world["data"]), "--config", str(wrong)],
        rf'Parser key "epochs":\s+Expected a <class \'int\'>\. Got value: many '
        rf"\(in --config {re.escape(str(wrong))}\)",
    )


def test_a_config_file_that_is_a_list(world, capsys):
    listed = world["root"] / "list.yaml"
    listed.write_text("- epochs\n- 3\n")
    assert_fails_cleanly(
        world, capsys, ["fusion", "--data", str(world["data"]), "--config", str(listed)], r"error: "
    )


# --- the library: listing, reading checkpoints ----------------------------------------------------


def test_list_runs_never_lists_a_linked_run(world):
    before = snapshot(world["root"])
    with pytest.warns(UserWarning, match=rf"{LINKED}: a symbolic link to .*outside"):
        runs = list_runs(world["runs"])
    assert runs["run_id"].tolist() == [world["inside"]]
    assert snapshot(world["root"]) == before


def test_a_pickle_renamed_to_model_safetensors(world):
    path = world["runs"] / world["inside"] / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": np.ones(2)}))
    before = snapshot(world["root"])
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}: not a readable safetensors file"
    ):
        load_run(world["runs"] / world["inside"]).state_dict()
    assert snapshot(world["root"]) == before


def test_a_truncated_model_safetensors(world):
    path = world["runs"] / world["inside"] / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-5])
    before = snapshot(world["root"])
    run = load_run(world["runs"] / world["inside"])
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(path))}: not a readable safetensors file"
    ):
        run.state_dict()
    assert snapshot(world["root"]) == before


@pytest.mark.parametrize("damage", ["pickle", "truncated"])
def test_bad_weights_files_never_load(world, damage):
    pytest.importorskip("torch")
    from core.models.backbones import create_backbone

    path = world["root"] / "weights.safetensors"
    if damage == "pickle":
        path.write_bytes(pickle.dumps({"stem.weight": np.ones(2)}))
    else:
        good = world["runs"] / world["inside"] / "backbone.safetensors"
        path.write_bytes(good.read_bytes()[:20])
    before = snapshot(world["root"])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        create_backbone("convnet_small", weights=path)
    assert snapshot(world["root"]) == before


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", f"a/{UNKNOWN}", "/tmp", f" {UNKNOWN}"])
def test_resume_refuses_what_is_not_a_run_id(world, bad):
    before = snapshot(world["root"])
    with pytest.raises(ValueError, match=rf"{re.escape(repr(bad))} is not a run id"):
        RunWriter.resume(world["runs"], bad)
    assert snapshot(world["root"]) == before


def test_a_run_kind_that_would_leave_the_runs_folder(world):
    before = snapshot(world["root"])
    with pytest.raises(ValueError, match=r"run kind '\.\./x': use letters, digits"):
        RunWriter(world["runs"], "../x", {})
    assert snapshot(world["root"]) == before


def test_a_scene_run_id_names_no_file_outside_the_street_folder(world):
    from core.dataroot import DataRoot
    from core.scenes import scene_verdicts, scores_path

    root = DataRoot(world["data"])
    before = snapshot(world["root"])
    for bad in ("../../outside/x", "../runs/x"):
        with pytest.raises(ValueError, match=rf"{re.escape(repr(bad))} is not a run id"):
            scores_path(root, bad)
        with pytest.raises(ValueError, match=rf"{re.escape(repr(bad))} is not a run id"):
            scene_verdicts(root, bad)
    assert scores_path(root, UNKNOWN).name == f"scene_scores-{UNKNOWN}.parquet"
    assert snapshot(world["root"]) == before
