"""Progress reporting: one callback type for the whole library.

A function that takes a long time accepts ``progress: Progress | None = None`` and calls it with
a dict of named values whenever there is something to tell; the caller shows them (a bar, a log
line) or passes them on (the job worker stores them as the job's progress). Only the keys that
apply are given, and a callback ignores those it does not know:

- ``done`` and ``total``: items finished so far and the number there are (images, rows, ...);
- ``stage``: which part of the work is running (``"aerial mosaic"``, a training stage, ...);
- ``epoch``, ``epochs``, ``loss`` and validation metrics (``val_kendall_tau``, ...): training;
- ``run_id``: the run being written, as soon as it exists.

An exception raised by the callback stops the work (a job worker cancels a job that way).
Showing progress bars is a separate on/off setting, ``show_progress``, where a function has bars.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Called with named progress values (see the module docstring).
Progress = Callable[[dict[str, Any]], None]
