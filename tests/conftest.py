"""Shared fixtures: one tiny demo city per test session (built in a few seconds)."""

from __future__ import annotations

import pytest

from core.demo import DemoConfig, build_demo

#: About 150 cells around De Pijp and the Amstel, with GSV, Flickr and every file format.
TINY_EXTENT = "bbox:121000,485000,122500,486000"


@pytest.fixture(scope="session")
def tiny_config() -> DemoConfig:
    """How the tiny demo city is built (rebuild with it to compare)."""
    return DemoConfig(seed=7, extent=TINY_EXTENT, flickr_photos=6000, workers=1)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory, tiny_config):
    """A tiny demo data root shared by the tests (do not modify its inputs)."""
    root = tmp_path_factory.mktemp("tiny") / "demo"
    build_demo(root, tiny_config, show_progress=False)
    return root
