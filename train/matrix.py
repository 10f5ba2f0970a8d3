"""``python -m train fusion-matrix``: the paper's experiment matrix, over several seeds.

Every configuration runs on the same spatial split and training seed as the others of its seed,
so differences are paired. The table reports Kendall's tau per configuration (mean and standard
deviation over seeds) and the paper's two derived figures, computed per seed and then averaged:

- gain of aerial+GSV over aerial: (tau(aerial+GSV) - tau(aerial)) / tau(aerial);
- share of that gap closed by building-filtered Flickr:
  (tau(aerial+Flickr building) - tau(aerial)) / (tau(aerial+GSV) - tau(aerial)).

Where the catalog holds the open sources (the City of Amsterdam's panoramas, Mapillary), each
adds an ``aerial+<source>`` row and both together an ``aerial+amsterdam_panorama+mapillary``
row.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from core.configs import FusionConfig
from core.dataroot import DataRoot
from core.experiments import summarise_matrix
from core.io import write_atomic
from core.runs import load_run, run_path
from train.fusion import train_fusion

#: Open street-level sources the matrix adds where the catalog has them: each on its own and
#: all of them pooled (``--ground amsterdam_panorama,mapillary``).
OPEN_SOURCES = ("amsterdam_panorama", "mapillary")


def matrix_configs(
    base: FusionConfig,
    scene_run: str,
    ground_weights: dict[str, str | None],
    sources: Iterable[str] = (),
) -> list[FusionConfig]:
    """The configurations of the matrix.

    Args:
        base: shared settings (data, target, schedule, backbones).
        scene_run: the scene filter run for the outdoor and building subsets.
        ground_weights: name -> weights file of the ground encoders to compare; the first one is
            the default used by every other configuration.
        sources: the catalog's sources; those of :data:`OPEN_SOURCES` among them get
            ``aerial+<source>`` rows, and two or more of them a row of them pooled.
    """
    default_weights = next(iter(ground_weights.values()))

    def make(name: str, **changes) -> FusionConfig:
        return replace(
            base, name=name, scene_run=scene_run, ground_weights=default_weights, **changes
        )

    configs = [
        make("aerial", ground=None),
        make("gsv", aerial=False, ground="gsv"),
        make("aerial+gsv", ground="gsv"),
        make("aerial+flickr(all)", ground="flickr", flickr_subset="all"),
        make("aerial+flickr(outdoor)", ground="flickr", flickr_subset="outdoor"),
        make("aerial+flickr(building)", ground="flickr", flickr_subset="building"),
    ]
    present = [s for s in OPEN_SOURCES if s in set(sources)]
    groups = [[s] for s in present] + ([present] if len(present) > 1 else [])
    configs += [make("aerial+" + "+".join(g), ground=",".join(g)) for g in groups]
    for name, weights in list(ground_weights.items())[1:]:
        configs.append(
            replace(make(f"aerial+gsv [{name} weights]", ground="gsv"), ground_weights=weights)
        )
    return configs


def run_matrix(configs: list[FusionConfig], seeds: list[int], log=print) -> pd.DataFrame:
    """Train every configuration for every seed; one row per (configuration, seed)."""
    rows = []
    for seed in seeds:
        for config in configs:
            run_id = train_fusion(replace(config, seed=seed, split_seed=seed), log=lambda _: None)
            run = load_run(run_path(DataRoot(Path(config.data)).runs, run_id))
            rows.append(
                {
                    "configuration": config.label,
                    "seed": seed,
                    "run_id": run_id,
                    "test_kendall_tau": run.metrics["test_kendall_tau"],
                    "test_spearman": run.metrics["test_spearman"],
                    "test_r2": run.metrics["test_r2"],
                    "ground_weights": config.ground_weights or "random",
                }
            )
            log(
                f"seed {seed} {config.label}: test tau {rows[-1]['test_kendall_tau']:.3f} ({run_id})"
            )
    return pd.DataFrame(rows)


def merge_results(existing: Path, new: pd.DataFrame) -> pd.DataFrame:
    """``new`` rows added to an earlier report's rows, replacing rows of the same configuration
    and seed (so a matrix can be extended one configuration at a time)."""
    if not existing.is_file():
        return new
    earlier = pd.read_csv(existing)
    replaced = earlier.set_index(["configuration", "seed"]).index.isin(
        new.set_index(["configuration", "seed"]).index
    )
    return pd.concat([earlier[~replaced], new], ignore_index=True)


def write_report(results: pd.DataFrame, out: Path, schedule: str) -> tuple[Path, Path]:
    """Write ``fusion_matrix.csv`` (per run) and ``fusion_matrix.md`` (the summary table)."""
    table, derived = summarise_matrix(results)
    csv = write_atomic(out / "fusion_matrix.csv", lambda tmp: results.to_csv(tmp, index=False))
    lines = [
        f"# Fusion experiment matrix ({schedule})",
        "",
        f"Kendall's tau (tau-b) on the test blocks, mean ± std over seeds {sorted(int(s) for s in results['seed'].unique())}.",
        "",
        "| configuration | tau | spearman | R² |",
        "|---|---|---|---|",
    ]
    for name, row in table.iterrows():
        std = "" if np.isnan(row["tau_std"]) else f" ± {row['tau_std']:.3f}"
        lines.append(
            f"| {name} | {row['tau_mean']:.3f}{std} | {row['spearman_mean']:.3f} | {row['r2_mean']:.3f} |"
        )
    if derived:
        lines += [
            "",
            f"- aerial+GSV over aerial: {100 * derived['gsv_gain_over_aerial_mean']:+.0f}% tau "
            f"(± {100 * derived['gsv_gain_over_aerial_std']:.0f}%)",
            f"- share of that gap closed by building-filtered Flickr: "
            f"{100 * derived['gap_closed_by_building_flickr_mean']:.0f}% "
            f"(± {100 * derived['gap_closed_by_building_flickr_std']:.0f}%)",
        ]
    lines += ["", "Runs: " + ", ".join(results["run_id"])]
    md = write_atomic(out / "fusion_matrix.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return csv, md
