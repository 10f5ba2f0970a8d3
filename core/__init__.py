"""Stadsbeeld: learning urban quality on Amsterdam's 100 m grid from aerial and street imagery."""

from importlib.resources import files
from pathlib import Path

#: The shipped data (``assets/``, package data of the installed package).
ASSETS = Path(str(files("assets")))
