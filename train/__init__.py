"""Command line of Stadsbeeld: ``python -m train --help``."""
