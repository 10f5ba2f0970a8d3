"""The package installs into a fresh virtual environment, and its console script works there.

The new environment sees the test run's installed dependencies through a ``.pth`` line (so
nothing is downloaded), but not the project: before ``pip install -e .`` neither ``train`` nor
``stadsbeeld`` exists in it. pip checks every dependency of ``pyproject.toml`` against what it
sees (``--no-index``: a missing one fails the install) and builds with the setuptools the test
run has (a fresh environment's bundled one is too old for editable wheels).
"""

from __future__ import annotations

import subprocess
import sysconfig
import venv
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent


def run(*command: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_pip_install_e_gives_the_stadsbeeld_command_in_a_fresh_environment(tmp_path):
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    purelib = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).stdout.strip()
    )
    (purelib / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run(python, "-c", "import train", cwd=elsewhere).returncode != 0
    assert not (env / "bin" / "stadsbeeld").exists()

    run(python, "-m", "pip", "uninstall", "-y", "setuptools", cwd=tmp_path)
    install = run(
        python,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-build-isolation",
        "-e",
        REPO,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    stadsbeeld = env / "bin" / "stadsbeeld"
    help_text = run(stadsbeeld, "--help", cwd=elsewhere)
    assert help_text.returncode == 0 and "fusion-matrix" in help_text.stdout
    out = tmp_path / "centrum"
    demo = run(stadsbeeld, "demo", "--extent", "centrum", "--out", out, "--quiet", cwd=elsewhere)
    assert demo.returncode == 0, demo.stderr
    assert "Centrum" in demo.stdout and (out / "demo.json").is_file()
    cells = pd.read_parquet(out / "grid.parquet")
    assert len(cells) > 500 and set(cells["district"]) == {"Centrum"}
    # the shipped data is found through the package, from any working directory
    schedule = run(stadsbeeld, "fusion", "--schedule", "paper", "--print_config", cwd=elsewhere)
    assert schedule.returncode == 0 and "aerial_backbone: resnet50" in schedule.stdout
