"""The synthetic Amsterdam demo city: see README.md in this folder for its generative story."""

from core.demo.build import MANIFEST, DemoConfig, build_demo, extent_cells

__all__ = ["MANIFEST", "DemoConfig", "build_demo", "extent_cells"]
