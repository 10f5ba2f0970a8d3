"""Stadsbeeld: learning urban quality on Amsterdam's 100 m grid from aerial and street imagery."""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
