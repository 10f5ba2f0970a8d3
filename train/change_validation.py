"""``python -m train validate-change``: is predicted change real change? A held-out-year test.

What a sceptical planner would ask before trusting the Monitor page: fusion runs learn the
labels of an earlier release only (with that year's imagery, street images from a window
around it), then predict the earlier and the last release from each year's imagery. On the
held-out test cells (one spatial split shared by every seed) the predicted change is compared
with the true change of the labels:

- Kendall's tau of predicted vs true change, and the share of cells whose true change exceeds a
  threshold where the predicted change has the same sign;
- the error of the last release's scores predicted by the model, against the planner's default
  of carrying the previous release forward ("nothing changed"), and against that release plus
  the model's predicted change;
- the calibration of the ensemble's 50% and 90% intervals, for the scores and for the change;
- the same per district, and the same for a model that only sees the aerial mosaic.

Each configuration is trained once per seed; seeds give the spread and form the ensemble. The
prediction folders stay in the root's runs (the Monitor page shows them); the report is written
to ``reports/change_validation.{json,csv,md}``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from core.configs import ChangeValidationConfig, FusionConfig, PredictConfig
from core.dataroot import DataRoot
from core.grid import read_grid
from core.io import jsonable, utc_now, write_atomic
from core.metrics import kendall_tau_b, mae
from core.monitor import VALIDATION_FILE, member_columns
from core.runs import load_run
from core.sources.lbm import read_lbm
from train.fusion import train_fusion
from train.predict import coverage, predict

#: The configurations compared: the fusion model and one that sees only the aerial mosaic.
CONFIGURATIONS = {"aerial+gsv": {"ground": "gsv"}, "aerial": {"ground": None}}


def release_years(root: DataRoot, config: ChangeValidationConfig) -> tuple[int, int]:
    """(earlier, last) release: the config's, else the root's last two label years.

    Raises:
        ValueError: if the root has fewer than two label years, or the years are not labelled.
    """
    years = sorted(read_lbm(root.scores, root.lbm_grid)["jaar"].unique())
    test = config.test_year if config.test_year is not None else years[-1]
    earlier = [y for y in years if y < test]
    train = config.train_year if config.train_year is not None else (earlier or [None])[-1]
    for year, what in ((train, "train_year"), (test, "test_year")):
        if year not in years:
            raise ValueError(f"{root.scores}: {what} {year} has no labels; label years {years}")
    if train >= test:
        raise ValueError(f"train_year {train} must be before test_year {test}")
    return int(train), int(test)


def change_scores(
    predicted_change: np.ndarray,
    predicted_after: np.ndarray,
    true_before: np.ndarray,
    true_after: np.ndarray,
    threshold: float,
) -> dict[str, float]:
    """The held-out-year scores of one model (or the ensemble mean) on a set of cells."""
    true_change = true_after - true_before
    large = np.abs(true_change) > threshold
    agree = np.sign(predicted_change[large]) == np.sign(true_change[large])
    return {
        "cells": int(len(true_change)),
        "tau_change": kendall_tau_b(predicted_change, true_change),
        "large_changes": int(large.sum()),
        "sign_agreement": float(agree.mean()) if large.any() else float("nan"),
        "mae_model": mae(predicted_after, true_after),
        "mae_carry_forward": mae(true_before, true_after),
        "mae_carry_forward_plus_change": mae(true_before + predicted_change, true_after),
    }


def _train_and_predict(
    config: ChangeValidationConfig, name: str, years: tuple[int, int], log
) -> tuple[str, str]:
    """Train one configuration per seed on the earlier release; predict both years."""
    runs = []
    for seed in config.seeds:
        fusion = FusionConfig(
            data=config.data,
            year=years[0],
            seed=seed,
            split_seed=config.split_seed,
            window_years=config.window_years,
            epochs=config.epochs,
            device=config.device,
            name=f"{name} (change validation {years[0]})",
            **(config.fusion | CONFIGURATIONS[name]),
        )
        runs.append(train_fusion(fusion, log=log))
    predicted = []
    for year in years:
        request = PredictConfig(
            run=runs,
            data=config.data,
            year=year,
            window_years=config.window_years,
            device=config.device,
        )
        predicted.append(predict(request, log=log))
    return predicted[0], predicted[1]


def validate_change(config: ChangeValidationConfig, log=print) -> dict:
    """Run the held-out-year validation and write its report; returns it.

    Raises:
        ValueError: for a root without two label years (naming them).
    """
    root = DataRoot(Path(config.data))
    years = release_years(root, config)
    districts = read_grid(root.grid).set_index("cell_id")["district"]
    report = {"config": asdict(config), "train_year": years[0], "test_year": years[1]}
    tables, summary = [], {}
    for name in CONFIGURATIONS:
        log(f"{name}: training {len(config.seeds)} seed(s) on {years[0]}, predicting {years}")
        before_id, after_id = _train_and_predict(config, name, years, log)
        before = load_run(root.runs / before_id).predictions().set_index("cell_id")
        after = load_run(root.runs / after_id).predictions().set_index("cell_id")
        test = after.index[(after["split"] == "test") & after["true"].notna()]
        test = test[before.loc[test, "true"].notna()]
        a, b = before.loc[test], after.loc[test]
        true_before, true_after = a["true"].to_numpy(), b["true"].to_numpy()
        true_change = true_after - true_before
        threshold = (
            config.change_threshold
            if config.change_threshold is not None
            else float(np.std(true_change))
        )
        members = member_columns(b)
        per_seed = pd.DataFrame(
            [
                change_scores(
                    b[m].to_numpy() - a[m].to_numpy(),
                    b[m].to_numpy(),
                    true_before,
                    true_after,
                    threshold,
                )
                for m in members
            ]
        )
        member_change = b[members].to_numpy() - a[members].to_numpy()
        change_std = member_change.std(axis=1, ddof=1)
        ensemble_change = member_change.mean(axis=1)
        summary[name] = {
            "runs": {"before": before_id, "after": after_id},
            "threshold": threshold,
            "mean": per_seed.mean().to_dict(),
            "std": per_seed.std(ddof=1).to_dict(),
            "ensemble": change_scores(
                ensemble_change, b["predicted"].to_numpy(), true_before, true_after, threshold
            ),
            "calibration_scores": coverage(
                b["predicted"].to_numpy(), b["uncertainty"].to_numpy(), true_after
            ),
            "calibration_change": coverage(ensemble_change, change_std, true_change),
        }
        for district, rows in pd.Series(np.arange(len(test)), index=test).groupby(
            districts.reindex(test).fillna("").to_numpy()
        ):
            i = rows.to_numpy()
            scores = change_scores(
                ensemble_change[i],
                b["predicted"].to_numpy()[i],
                true_before[i],
                true_after[i],
                threshold,
            )
            tables.append({"configuration": name, "district": district or "(none)", **scores})
    report |= {"configurations": summary, "created": utc_now()}
    per_district = pd.DataFrame(tables)
    folder = root.reports
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(
        folder / VALIDATION_FILE,
        lambda tmp: tmp.write_text(json.dumps(jsonable(report), indent=2)),
    )
    write_atomic(
        folder / "change_validation.csv", lambda tmp: per_district.to_csv(tmp, index=False)
    )
    markdown = report_markdown(report, per_district)
    write_atomic(folder / "change_validation.md", lambda tmp: tmp.write_text(markdown))
    log(markdown)
    return report


def report_markdown(report: dict, per_district: pd.DataFrame) -> str:
    """The report as Markdown tables: the summary over seeds, then per district."""
    years = f"{report['train_year']} -> {report['test_year']}"
    lines = [
        f"Held-out-year validation: trained on {report['train_year']}, predicting {years}, "
        f"test cells, {len(report['config']['seeds'])} seeds (mean ± std; ensemble in brackets)",
        "",
        "| model | tau of change | sign agreement (large changes) | MAE model | MAE carry forward "
        "| MAE carry forward + change | 50% / 90% coverage (scores) | 50% / 90% coverage (change) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["configurations"].items():
        m, d, e = s["mean"], s["std"], s["ensemble"]

        def cell(key: str, m=m, d=d, e=e) -> str:
            return f"{m[key]:.3f} ± {d[key]:.3f} [{e[key]:.3f}]"

        cs, cc = s["calibration_scores"], s["calibration_change"]
        lines.append(
            f"| {name} | {cell('tau_change')} | {cell('sign_agreement')} "
            f"(n={e['large_changes']}, > {s['threshold']:.3f}) | {cell('mae_model')} "
            f"| {e['mae_carry_forward']:.3f} | {cell('mae_carry_forward_plus_change')} "
            f"| {cs['coverage_50']:.2f} / {cs['coverage_90']:.2f} "
            f"| {cc['coverage_50']:.2f} / {cc['coverage_90']:.2f} |"
        )
    lines += [
        "",
        "Per district (ensemble):",
        "",
        "| model | district | cells | tau of change | sign agreement | MAE carry forward "
        "| MAE carry forward + change |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in per_district.itertuples():
        lines.append(
            f"| {row.configuration} | {row.district} | {row.cells} | {row.tau_change:.3f} "
            f"| {row.sign_agreement:.2f} | {row.mae_carry_forward:.4f} "
            f"| {row.mae_carry_forward_plus_change:.4f} |"
        )
    return "\n".join(lines) + "\n"
