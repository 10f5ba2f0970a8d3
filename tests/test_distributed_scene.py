"""The scene filter, perception and the caches on several processes: gloo ranks on CPU.

The trainers run under ``torchrun`` and are compared with one process within a tolerance (each
CPU rank normalises its BatchNorm layers over its own slice of the batch). The caches are
compared exactly: the ranks form the same batches one process would, so a feature cache filled
by two ranks, or resumed after a rank was killed, equals the one-process cache bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from core.dataroot import DataRoot
from core.datasets import street_images
from core.features import extract_features, load_pixels
from core.runs import EPOCHS_FILE, list_runs, load_run
from core.scenes import scores_path
from tests.test_distributed import _visible, kill_rank_one

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
#: Per-epoch training loss of two CPU ranks vs one process (BatchNorm over half the batch);
#: measured differences are about 1%.
LOSS_RTOL = 0.05
#: Held-out accuracy of two CPU ranks vs one process: 5 of the ~50 held-out photos (scene
#: filter), 5% of the held-out votes (perception).
SCENE_ACCURACY_ATOL, PAIR_ACCURACY_ATOL = 0.1, 0.05

#: One rank of a cache fill: ``fill.py TABLE CACHE pixels|features|both PX BATCH``.
FILL = """
    import sys
    import pandas as pd
    from core.distributed import Ranks
    from core.features import extract_features, load_pixels

    table, cache, what, px, batch = sys.argv[1:]
    images, ranks = pd.read_parquet(table), Ranks("cpu")
    if what in ("pixels", "both"):
        load_pixels(images, int(px), cache, workers=0, ranks=ranks, batch_size=int(batch))
    if what in ("features", "both"):
        extract_features(images, "convnet_small", None, cache, px=int(px), batch_size=int(batch),
                         workers=0, device="cpu", chunk_batches=1, ranks=ranks)
    """


@pytest.fixture(scope="module")
def city(tiny_demo, tmp_path_factory) -> Path:
    """A copy of the tiny city: this module's runs and caches are its own."""
    root = tmp_path_factory.mktemp("distributed_scene") / "city"
    shutil.copytree(tiny_demo, root, ignore=shutil.ignore_patterns("runs", "cache"))
    return root


@pytest.fixture(scope="module")
def images(city, tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    """The city's GSV images (1,224) and the Parquet table the rank script reads them from."""
    table = street_images(DataRoot(city), "gsv")[["id", "path"]]
    path = tmp_path_factory.mktemp("images") / "images.parquet"
    table.to_parquet(path)
    return table, path


def _train(command: list[str], args: list[str]) -> tuple[str, str]:
    """Run ``python -m train ARGS`` after ``command``; its stdout and the id of its run."""
    done = subprocess.run(
        [*command, "-m", "train", *args], capture_output=True, text=True, env=ENV, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, re.search(r" run (\w+-\d{8}-\d{6}-[0-9a-f]{4})", done.stdout).group(1)


def _two_and_one(root: Path, args: list[str]):
    """The runs of ``args`` trained by one process and by two gloo ranks, and the ranks' log."""
    runs = DataRoot(root).runs
    _, one = _train([sys.executable], [*args, "--data", str(root)])
    before = set(list_runs(runs)["run_id"])
    log, two = _train([*TORCHRUN, "--nproc-per-node=2"], [*args, "--data", str(root)])
    assert set(list_runs(runs)["run_id"]) - before == {two}  # one run folder, by rank 0
    one, two = load_run(runs / one), load_run(runs / two)
    assert (one.config["processes"], two.config["processes"]) == (1, 2)
    assert "x 2 process(es)" in (two.path / "log.txt").read_text()
    np.testing.assert_allclose(two.epochs["train_loss"], one.epochs["train_loss"], rtol=LOSS_RTOL)
    assert (two.path / "backbone.safetensors").is_file()
    return one, two, log


@pytest.mark.slow  # whole torchrun runs: `pytest -m slow`
def test_two_gloo_ranks_train_the_scene_filter_like_one_process(city):
    one, two, log = _two_and_one(city, ["scene-filter", "--epochs", "3"])
    assert log.count("scene epoch 1:") == 1  # rank 0 speaks for the run
    assert two.metrics["held_out_accuracy"] == pytest.approx(
        one.metrics["held_out_accuracy"], abs=SCENE_ACCURACY_ATOL
    )
    # every photo scored once, in order, from the ranks' gathered shares
    a, b = (pd.read_parquet(scores_path(DataRoot(city), run.run_id)) for run in (one, two))
    np.testing.assert_array_equal(a["id"], b["id"])
    probabilities = b.filter(like="p_").to_numpy()
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=2e-3)
    assert (b.filter(like="p_").idxmax(axis=1) == a.filter(like="p_").idxmax(axis=1)).mean() > 0.8
    assert len(two.predictions()) == len(b)


@pytest.mark.slow  # whole torchrun runs: `pytest -m slow`
def test_two_gloo_ranks_train_perception_like_one_process(city):
    one, two, log = _two_and_one(city, ["perception", "--epochs", "2"])
    assert log.count("perception epoch 1:") == 1 and log.count("ground weights at") == 1
    assert set(two.metrics) == set(one.metrics)  # every category judged on the whole split
    for name, value in one.metrics.items():
        assert two.metrics[name] == pytest.approx(value, abs=PAIR_ACCURACY_ATOL), name


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        pytest.param(["scene-filter", "--epochs", "200"], "scene", id="scene-filter"),
        # 16 px: a perception epoch (24,000 votes) at 32 px takes 15 s on the busy 2 cores
        pytest.param(
            ["perception", "--epochs", "200", "--px", "16"], "perception", id="perception"
        ),
    ],
)
def test_a_killed_rank_fails_the_trainer_cleanly(city, tmp_path, args, kind):
    """SIGKILL rank 1 after an epoch: torchrun fails, rank 0 stops, no run becomes visible."""
    runs = DataRoot(city).runs
    before, scores = _visible(runs), set(DataRoot(city).catalog.parent.glob("scene_scores-*"))
    launcher = subprocess.Popen(
        [*TORCHRUN, "--nproc-per-node=2", "-m", "train", *args, "--data", str(city)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # rank 0 appends each epoch to the run folder it is writing, beside runs/ and hidden
        kill_rank_one(
            psutil.Process(launcher.pid),
            lambda: any(runs.glob(f".tmp-{kind}-*/{EPOCHS_FILE}")),
            launcher.wait,
        )
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode != 0
    assert _visible(runs) == before  # no half-written run folder is visible
    listed = list_runs(runs)
    assert listed.empty or set(listed["run_id"]) <= before
    assert set(DataRoot(city).catalog.parent.glob("scene_scores-*")) == scores


# --- the caches, filled by ranks -----------------------------------------------------------------


def _fill(script: Path, table: Path, cache: Path, what: str, px: int, batch: int):
    """Two ranks filling ``cache`` under torchrun (started, not waited for)."""
    return subprocess.Popen(
        [*TORCHRUN, "--nproc-per-node=2", str(script), str(table), str(cache), what]
        + [str(px), str(batch)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def fill_script(tmp_path) -> Path:
    script = tmp_path / "fill.py"
    script.write_text(textwrap.dedent(FILL))
    return script


def test_two_ranks_fill_the_caches_like_one_process(images, fill_script, tmp_path):
    table, path = images
    done = _fill(fill_script, path, tmp_path / "two", "both", 32, 64)
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-3000:]
    pixels = load_pixels(table, 32, tmp_path / "one", workers=0)
    np.testing.assert_array_equal(load_pixels(table, 32, tmp_path / "two", workers=0), pixels)
    one = extract_features(table, "convnet_small", None, tmp_path / "one", px=32, batch_size=64)
    two = extract_features(table, "convnet_small", None, tmp_path / "two", px=32, batch_size=64)
    np.testing.assert_array_equal(np.asarray(two.matrix), np.asarray(one.matrix))
    assert sorted(p.name for p in two.folder.iterdir()) == [
        "features.npy",
        "index.parquet",
        "meta.json",
    ]  # the ranks' progress records are gone once the cache is complete
    assert json.loads((two.folder / "meta.json").read_text())["done"] == len(table)
    assert not list((tmp_path / "two").glob("*.partial"))


def _rank(parent: psutil.Process, rank: int) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


def _records(cache: Path) -> list[dict]:
    records = []
    for path in cache.glob("**/done-*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (ValueError, OSError):
            continue
    return records


@pytest.mark.parametrize(
    ("what", "resume_ranks"), [("features", 1), ("features", 2), ("pixels", 2)]
)
def test_a_killed_rank_leaves_a_cache_the_next_run_resumes(
    images, fill_script, tmp_path, what, resume_ranks
):
    """SIGKILL rank 1 halfway through its slice; torchrun stops rank 0. The rerun, on one
    process or two ranks, completes the same cache as a clean fill, and keeps the rows the
    records say are written (a marked row stays marked: it resumed, it did not restart)."""
    table, path = images
    cache = tmp_path / "cache"
    launcher = _fill(fill_script, path, cache, what, 16, 8)
    try:
        deadline = time.monotonic() + 300
        while True:  # rank 1's slice ends at the last row; wait until it is partly written
            mine = [r for r in _records(cache) if r["start"] > 0 and r["stop"] == len(table)]
            if mine and 0 < mine[0]["done"] < len(table) - mine[0]["start"]:
                break
            if launcher.poll() is not None:
                raise AssertionError(f"ended before rank 1 was halfway: {launcher.communicate()}")
            assert time.monotonic() < deadline, "rank 1 recorded no progress"
            time.sleep(0.01)
        victim = _rank(psutil.Process(launcher.pid), 1)
        assert victim is not None
        victim.send_signal(signal.SIGKILL)
        launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            for child in psutil.Process(launcher.pid).children(recursive=True):
                child.kill()
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode != 0
    if what == "features":
        (folder,) = cache.iterdir()
        assert json.loads((folder / "meta.json").read_text())["done"] < len(table)
        store = folder / "features.npy"
    else:
        assert not list(cache.glob("pixels-*.npy"))
        (store,) = cache.glob("*.partial/pixels.npy")
    marked = max(r["start"] for r in _records(cache) if r["done"] > 0)  # rank 1's first row
    rows = np.load(store, mmap_mode="r+")
    rows[marked] = 7
    rows.flush()
    del rows

    if resume_ranks == 1:
        extract_features(table, "convnet_small", None, cache, px=16, batch_size=8, workers=0)
    else:
        rerun = _fill(fill_script, path, cache, what, 16, 8)
        _, err = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, err[-3000:]
    if what == "features":
        resumed = extract_features(table, "convnet_small", None, cache, px=16, batch_size=8)
        clean = extract_features(
            table, "convnet_small", None, tmp_path / "clean", px=16, batch_size=8
        )
        expected = np.array(clean.matrix)
        expected[marked] = 7
        np.testing.assert_array_equal(np.asarray(resumed.matrix), expected)
        assert sorted(p.name for p in resumed.folder.iterdir()) == [
            "features.npy",
            "index.parquet",
            "meta.json",
        ]
    else:
        resumed = load_pixels(table, 16, cache, workers=0)
        expected = np.array(load_pixels(table, 16, tmp_path / "clean", workers=0))
        expected[marked] = 7
        np.testing.assert_array_equal(resumed, expected)
        assert sorted(p.name for p in cache.iterdir()) == [Path(resumed.filename).name]


# --- load_pixels holds one batch, not the image set ----------------------------------------------

#: Peak memory (kB) of ``load_pixels`` on the city's GSV images repeated ``times`` times.
PEAK = """
    import sys
    import pandas as pd
    from core.features import load_pixels

    table, cache, times, px = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    images = pd.read_parquet(table)
    images = pd.concat([images] * times, ignore_index=True)
    images["id"] = [f"{i}-{k}" for k, i in enumerate(images["id"])]  # a set of distinct images
    load_pixels(images.iloc[:64], px, cache + "-warm", workers=0, batch_size=64)  # warm the imports

    def status(field):
        with open("/proc/self/status") as lines:
            return next(int(line.split()[1]) for line in lines if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak resident set size (VmHWM) to the current one
    before = status("VmRSS")
    pixels = load_pixels(images, px, cache, workers=0, batch_size=64)
    assert pixels.shape == (len(images), 3, px, px)
    print(status("VmHWM") - before)
    """


def test_load_pixels_memory_does_not_grow_with_the_number_of_images(images, tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's peak-RSS reset")
    _, table = images
    script = tmp_path / "peak.py"
    script.write_text(textwrap.dedent(PEAK))
    px, row_bytes = 64, 3 * 64 * 64
    peaks, sizes = {}, {}
    for times in (1, 4):
        done = subprocess.run(
            [sys.executable, str(script), str(table), str(tmp_path / f"x{times}"), str(times)]
            + [str(px)],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        peaks[times] = int(done.stdout.split()[-1]) * 1024
        sizes[times] = times * len(images[0]) * row_bytes
    # the 4x set's array is 60 MB: holding it (or the list of batches before a concatenate)
    # would raise the peak by at least that much; one batch of 64 images is 0.8 MB
    assert peaks[4] < sizes[4] / 4, peaks
    assert peaks[4] - peaks[1] < (sizes[4] - sizes[1]) / 4, peaks
