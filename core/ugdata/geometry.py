"""Bearings, compass words, edge features and distances, and the keyed RNG of every draw."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

COMPASS = ("north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west")


def bearing_deg(dx: np.ndarray | float, dy: np.ndarray | float) -> np.ndarray:
    """Compass bearing of a displacement in degrees: 0 = north (+y), 90 = east (+x), clockwise."""
    return np.mod(np.degrees(np.arctan2(dx, dy)), 360.0)


def compass(bearing: float) -> str:
    """The 8-point compass word (``north``, ``north-east``, ...) of a bearing in degrees."""
    return COMPASS[int(((float(bearing) % 360.0) + 22.5) // 45.0) % 8]


def edge_features(xy_from: np.ndarray, xy_to: np.ndarray) -> dict[str, np.ndarray]:
    """Straight-line length, bearing, dx and dy (metres / degrees) from ``xy_from`` to ``xy_to``.

    Args:
        xy_from: (n, 2) start coordinates in a metric CRS.
        xy_to: (n, 2) end coordinates.
    """
    d = np.asarray(xy_to, dtype=float) - np.asarray(xy_from, dtype=float)
    return {
        "length": np.hypot(d[:, 0], d[:, 1]),
        "bearing": bearing_deg(d[:, 0], d[:, 1]),
        "dx": d[:, 0],
        "dy": d[:, 1],
    }


def format_distance(metres: float) -> str:
    """``"80 m"`` (rounded to 10 m, at least 10 m) below 1 km, ``"1.2 km"`` above."""
    if metres < 995:
        return f"{max(10, int(round(metres / 10.0)) * 10)} m"
    return f"{metres / 1000:.1f} km"


class KeyedRng:
    """A small seeded RNG (splitmix64) keyed by text: one cheap, independent stream per sample.

    ``KeyedRng(f"{seed}|caption|{image_id}")`` gives the same draws for the same seed and key
    whatever else is built, so a sample does not change when images are added or reordered.
    """

    _MASK = (1 << 64) - 1

    def __init__(self, key: str) -> None:
        self._state = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")

    def _next(self) -> int:
        self._state = (self._state + 0x9E3779B97F4A7C15) & self._MASK
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return z ^ (z >> 31)

    def random(self) -> float:
        """A float in [0, 1)."""
        return (self._next() >> 11) / float(1 << 53)

    def randrange(self, n: int) -> int:
        """An int in [0, n)."""
        return self._next() % n  # bias below 2**-40 for the small n used here

    def randint(self, a: int, b: int) -> int:
        """An int in [a, b]."""
        return a + self.randrange(b - a + 1)

    def choice(self, options: Sequence[Any]) -> Any:
        """One element of ``options``."""
        return options[self.randrange(len(options))]

    def shuffle(self, items: list[Any]) -> None:
        """Shuffle ``items`` in place (Fisher-Yates)."""
        for i in range(len(items) - 1, 0, -1):
            j = self.randrange(i + 1)
            items[i], items[j] = items[j], items[i]
