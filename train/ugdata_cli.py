"""``python -m train ugdata``'s builder, :func:`core.ugdata.build_ugdata`, under its old name.

The building (in a temporary folder, renamed when complete) lives in :mod:`core.ugdata.build`;
this re-export stays only until ``train/__main__.py`` imports ``build_ugdata`` from
:mod:`core.ugdata`, then this module goes.
"""

from core.ugdata import build_ugdata

__all__ = ["build_ugdata"]
