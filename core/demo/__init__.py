"""The synthetic Amsterdam demo city: see README.md in this folder for its generative story."""

from core.demo.build import GENERATOR_VERSION, MANIFEST, DemoConfig, build_demo, extent_cells

__all__ = ["GENERATOR_VERSION", "MANIFEST", "DemoConfig", "build_demo", "extent_cells"]
