"""Positive pairs for spatiotemporal contrastive pretraining (UrbanSTCL, arXiv 2502.04638).

Two of the paper's three rules need a pair table; the third (global: two augmentations of one
image) needs none. Both tables hold unordered pairs ``a < b`` of row positions into the image
table they were built from (``images.iloc[a]``), so they stay valid whatever its index is.

- temporal: the same place (less than ``temporal_max_distance_m`` apart) and heading (circular
  difference at most ``temporal_max_heading_deg``) on different capture days at least
  ``temporal_min_gap_months`` apart. Images without a heading or capture time never pair.
- spatial: images of different places, at least ``spatial_min_distance_m`` (so the same
  panorama at another heading or year is not a spatial pair) and at most ``spatial_buffer_m`` apart, at most
  ``spatial_max_per_image`` partners per image, chosen at random with the seed.

Candidates come from one KD-tree radius query; every rule after it is a vectorised filter, so
the demo city's ~92k GSV images take under a second for both tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from core.io import require_columns

#: Days in an average month, for month thresholds.
DAYS_PER_MONTH = 30.44
TEMPORAL_COLUMNS = ("a", "b", "distance_m", "heading_diff_deg", "gap_days")
SPATIAL_COLUMNS = ("a", "b", "distance_m")
QUANTILES = {"min": 0.0, "p25": 0.25, "median": 0.5, "p75": 0.75, "max": 1.0}
_NS_PER_DAY = 86_400 * 10**9


@dataclass(frozen=True)
class PairConfig:
    """Thresholds of the pair rules.

    Attributes:
        temporal_max_distance_m: temporal partners are less than this far apart.
        temporal_max_heading_deg: largest circular heading difference of temporal partners.
        temporal_min_gap_months: smallest capture-time gap of temporal partners (30.44-day
            months); partners are on different days even when this is 0.
        spatial_min_distance_m: spatial partners are at least this far apart: other places,
            so spatial and temporal positives stay apart.
        spatial_buffer_m: spatial partners are at most this far apart.
        spatial_max_per_image: most spatial partners of one image; None for no cap.
        seed: picks the spatial partners kept under the cap.
    """

    temporal_max_distance_m: float = 5.0
    temporal_max_heading_deg: float = 30.0
    temporal_min_gap_months: float = 12.0
    spatial_min_distance_m: float = 5.0
    spatial_buffer_m: float = 100.0
    spatial_max_per_image: int | None = 8
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "temporal_max_distance_m": self.temporal_max_distance_m > 0,
            "temporal_max_heading_deg": 0 <= self.temporal_max_heading_deg <= 180,
            "temporal_min_gap_months": self.temporal_min_gap_months >= 0,
            "spatial_buffer_m": self.spatial_buffer_m > 0,
            "spatial_min_distance_m": 0 <= self.spatial_min_distance_m < self.spatial_buffer_m,
            "spatial_max_per_image": self.spatial_max_per_image is None
            or self.spatial_max_per_image >= 1,
        }
        bad = [f"{name}={getattr(self, name)!r}" for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"PairConfig: invalid {', '.join(bad)} (distances > 0, spatial minimum below the "
                "buffer, heading in [0, 180], gap >= 0, cap >= 1 or None)"
            )

    def describe_temporal(self) -> str:
        """The temporal rule in words, for messages."""
        return (
            f"same place (< {self.temporal_max_distance_m:g} m), same heading "
            f"(within {self.temporal_max_heading_deg:g} deg) and capture dates at least "
            f"{self.temporal_min_gap_months:g} months apart"
        )


class NoTemporalPairs(ValueError):
    """A catalog yields no temporal pairs, so the temporal objective cannot train on it."""


def temporal_pairs(
    images: pd.DataFrame, config: PairConfig = PairConfig(), source: str = "images"
) -> pd.DataFrame:
    """Temporal positive pairs: the same place and heading at different capture dates.

    Args:
        images: street-level images with ``x, y`` (metres, a projected CRS such as RD New),
            ``heading`` (degrees, NaN allowed) and ``captured_at`` (times, NaT allowed).
        config: the thresholds.
        source: what ``images`` is (e.g. the catalog path), for error messages.

    Returns:
        Pairs sorted by ``a, b`` with columns :data:`TEMPORAL_COLUMNS`; possibly empty (see
        :func:`require_temporal`).

    Raises:
        ValueError: naming ``source``, for missing columns or bad values.
    """
    candidates = _temporal_candidates(images, config, source)
    keep = (
        (candidates["distance_m"] < config.temporal_max_distance_m)
        & (candidates["heading_diff_deg"] <= config.temporal_max_heading_deg)
        & candidates["other_day"]
        & (candidates["gap_days"] >= config.temporal_min_gap_months * DAYS_PER_MONTH)
    )
    return candidates.loc[keep, list(TEMPORAL_COLUMNS)].reset_index(drop=True)


def require_temporal(
    pairs: pd.DataFrame, images: pd.DataFrame, config: PairConfig, source: str
) -> pd.DataFrame:
    """Return ``pairs``, or raise :class:`NoTemporalPairs` explaining why there are none.

    Args:
        pairs: the output of :func:`temporal_pairs` for ``images`` and ``config``.
        images: the images the pairs were built from.
        config: the thresholds they were built with.
        source: what ``images`` is (e.g. the catalog path and source), for the message.
    """
    if len(pairs):
        return pairs
    times = _utc_times(images["captured_at"], source)
    days = pd.Series(times.dt.floor("D").dropna().unique()).sort_values()
    headed = int(pd.to_numeric(images["heading"], errors="coerce").notna().sum())
    if len(images) < 2:
        cause = f"only {len(images)} image(s)"
    elif len(days) == 0:
        cause = "no image has a capture date"
    elif len(days) == 1:
        cause = f"a single capture date ({days.iloc[0]:%Y-%m-%d})"
    elif headed < 2:
        cause = f"{headed} image(s) with a heading"
    else:
        span = (days.iloc[-1] - days.iloc[0]).days / DAYS_PER_MONTH
        cause = (
            f"{len(days)} distinct capture dates ({days.iloc[0]:%Y-%m-%d} to "
            f"{days.iloc[-1]:%Y-%m-%d}, {span:.1f} months) but "
            f"{_closest_miss(images, config, source)}"
        )
    raise NoTemporalPairs(
        f"{source}: no temporal pairs among {len(images)} images: {cause}; temporal pairs need "
        f"the {config.describe_temporal()}. Use a catalog with repeated captures of the same "
        "places, or another objective (spatial, global)"
    )


def spatial_pairs(
    images: pd.DataFrame, config: PairConfig = PairConfig(), source: str = "images"
) -> pd.DataFrame:
    """Spatial positive pairs: images of different places within the buffer, capped per image.

    Under the cap, pairs are kept in a random order (from ``config.seed``) whenever both images
    still have room, so dense areas do not dominate and every image keeps partners when it can.

    Args:
        images: street-level images with ``x, y`` in metres.
        config: the buffer, cap and seed.
        source: what ``images`` is, for error messages.

    Returns:
        Pairs sorted by ``a, b`` with columns :data:`SPATIAL_COLUMNS`.

    Raises:
        ValueError: naming ``source``, for missing columns or positions.
    """
    xy = _positions(images, source)
    ab = _tree_pairs(xy, config.spatial_buffer_m)
    ab = ab[_distances(xy, ab) >= config.spatial_min_distance_m]
    if config.spatial_max_per_image is not None:
        rng = np.random.default_rng(config.seed)
        ab = ab[_capped(ab, len(xy), config.spatial_max_per_image, rng.permutation(len(ab)))]
    return pd.DataFrame(
        {"a": ab[:, 0], "b": ab[:, 1], "distance_m": _distances(xy, ab)},
        columns=list(SPATIAL_COLUMNS),
    )


def pair_statistics(pairs: pd.DataFrame, n_images: int) -> dict:
    """Counts and distributions of a pair table, JSON-serialisable.

    Args:
        pairs: a temporal or spatial pair table.
        n_images: how many images the pairs index into.

    Returns:
        ``count``, ``n_images``, ``images_with_a_partner`` (share of images), ``partners_per_image``
        (mean and max over all images) and min/p25/median/p75/max of ``distance_m`` and, when
        the columns exist, ``gap_days`` and ``heading_diff_deg`` (None when there are no pairs).
    """
    require_columns(pairs, ("a", "b", "distance_m"), "pair table")
    ends = np.concatenate([pairs["a"].to_numpy(), pairs["b"].to_numpy()]).astype(np.int64)
    if len(ends) and (ends.min() < 0 or ends.max() >= n_images):
        raise ValueError(f"pair table: positions outside 0..{n_images - 1}")
    partners = np.bincount(ends, minlength=n_images)
    stats: dict = {
        "count": len(pairs),
        "n_images": int(n_images),
        "images_with_a_partner": float((partners > 0).mean()) if n_images else 0.0,
        "partners_per_image": {
            "mean": float(partners.mean()) if n_images else 0.0,
            "max": int(partners.max()) if n_images else 0,
        },
    }
    for column in ("distance_m", "gap_days", "heading_diff_deg"):
        if column in pairs.columns:
            values = pairs[column].to_numpy(dtype=np.float64)
            stats[column] = {
                name: float(np.quantile(values, q)) if len(values) else None
                for name, q in QUANTILES.items()
            }
    return stats


def _temporal_candidates(images: pd.DataFrame, config: PairConfig, source: str) -> pd.DataFrame:
    """Every pair within the temporal distance, with the quantities the other rules test."""
    require_columns(images, ("x", "y", "heading", "captured_at"), source)
    xy = _positions(images, source)
    heading = _headings(images["heading"], source)
    times = _utc_times(images["captured_at"], source)
    # int64 nanoseconds keep the filter vectorised; NaT rows never pair (masked below)
    dated = times.notna().to_numpy()
    ns = times.dt.tz_convert(None).to_numpy(dtype="datetime64[ns]").view(np.int64)
    ab = _tree_pairs(xy, config.temporal_max_distance_m)
    a, b = ab[:, 0], ab[:, 1]
    turn = np.abs(heading[a] - heading[b]) % 360.0
    both_dated = dated[a] & dated[b]
    gap = np.where(both_dated, np.abs(ns[a] - ns[b]), 0)
    return pd.DataFrame(
        {
            "a": a,
            "b": b,
            "distance_m": _distances(xy, ab),
            "heading_diff_deg": np.minimum(turn, 360.0 - turn),  # NaN for a missing heading
            "gap_days": np.where(both_dated, gap / _NS_PER_DAY, np.nan),
            "other_day": both_dated & (ns[a] // _NS_PER_DAY != ns[b] // _NS_PER_DAY),
        }
    )


def _closest_miss(images: pd.DataFrame, config: PairConfig, source: str) -> str:
    """Which temporal rule stops the pairs, in words."""
    c = _temporal_candidates(images, config, source)
    place = c[c["distance_m"] < config.temporal_max_distance_m]
    if place.empty:
        return f"no two images are less than {config.temporal_max_distance_m:g} m apart"
    same = place[place["heading_diff_deg"] <= config.temporal_max_heading_deg]
    if same.empty:
        return (
            f"no two images at the same place have headings within "
            f"{config.temporal_max_heading_deg:g} deg"
        )
    longest = same["gap_days"].max() / DAYS_PER_MONTH
    if math.isnan(longest):
        return "no two images at the same place and heading both have a capture date"
    return (
        f"the longest gap between images of the same place and heading ({len(same)} such "
        f"pairs) is {longest:.1f} months"
    )


def _capped(ab: np.ndarray, n: int, cap: int, priority: np.ndarray) -> np.ndarray:
    """Mask of the pairs a greedy pass in ``priority`` order keeps with ``cap`` per image.

    Sequential greedy is a Python loop over every pair; instead each round keeps, at once, every
    pair that is among the ``room`` best remaining pairs of both its images. Such a pair would
    be kept by the sequential pass too, and the best remaining pair always qualifies, so the
    rounds end with the same result, in a handful of vectorised passes over one sort.
    """
    keep = np.zeros(len(ab), dtype=bool)
    room = np.full(n, cap, dtype=np.int64)
    # each pair twice, once under each image, best first within an image; filtering keeps order
    pair = np.tile(np.arange(len(ab)), 2)
    end = ab.T.ravel()
    order = np.argsort(end * len(ab) + priority[pair])  # one int64 key: ~8x faster than lexsort
    pair, end = pair[order], end[order]
    while len(pair):
        position = np.arange(len(end))
        first = np.r_[True, end[1:] != end[:-1]]
        rank = position - np.maximum.accumulate(np.where(first, position, 0))
        won = np.bincount(pair[rank < room[end]], minlength=len(ab)) == 2
        if not won.any():
            break
        keep |= won
        room -= np.bincount(ab[won].ravel(), minlength=n)
        open_ = ~keep & (room[ab[:, 0]] > 0) & (room[ab[:, 1]] > 0)
        stays = open_[pair]
        pair, end = pair[stays], end[stays]
    return keep


def _positions(images: pd.DataFrame, source: str) -> np.ndarray:
    """``(n, 2)`` float positions, checked finite."""
    require_columns(images, ("x", "y"), source)
    try:
        xy = images[["x", "y"]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: x, y must be numbers ({exc})") from exc
    bad = np.flatnonzero(~np.isfinite(xy).all(axis=1))
    if len(bad):
        raise ValueError(
            f"{source}: {len(bad)} images without a finite position x, y "
            f"(rows {bad[:5].tolist()}{' ...' if len(bad) > 5 else ''})"
        )
    return xy


def _headings(values: pd.Series, source: str) -> np.ndarray:
    """Headings as floats; NaN where missing, an error where not a number."""
    numbers = pd.to_numeric(values, errors="coerce")
    bad = np.flatnonzero((numbers.isna() & values.notna()).to_numpy())
    if len(bad):
        raise ValueError(
            f"{source}: heading {values.iloc[bad[0]]!r} (row {bad[0]}) is not a number "
            f"({len(bad)} such rows)"
        )
    return numbers.to_numpy(dtype=np.float64)


def _utc_times(values: pd.Series, source: str) -> pd.Series:
    """Capture times as UTC timestamps; times without a zone are taken as UTC, as the catalog
    reader does."""
    try:
        times = pd.to_datetime(values, utc=True, format="ISO8601")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: captured_at is not a time column ({exc})") from exc
    return pd.Series(times, index=values.index)


def _tree_pairs(xy: np.ndarray, radius: float) -> np.ndarray:
    """``(m, 2)`` int64 pairs ``a < b`` at most ``radius`` apart, sorted so that results do not
    hang on the tree's order."""
    ab = np.sort(cKDTree(xy).query_pairs(radius, output_type="ndarray").astype(np.int64), axis=1)
    return ab[np.argsort(ab[:, 0] * len(xy) + ab[:, 1])]


def _distances(xy: np.ndarray, ab: np.ndarray) -> np.ndarray:
    return np.hypot(*(xy[ab[:, 0]] - xy[ab[:, 1]]).T)
