"""``fetch.json``: what each step of a fetch did, when, from where, with which parameters."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from core.dataroot import DataRoot
from core.io import jsonable, utc_now, write_atomic

MANIFEST = "fetch.json"


class Manifest:
    """``fetch.json`` of a data root, rewritten (atomically) after every step.

    It holds ``created``, ``updated``, the header of the latest fetch (the area and its
    municipalities, years, sources, endpoints, licences, ...) and ``steps``: per step its
    ``status`` (``done`` or ``failed``), ``finished``, ``params``, ``licence`` and what it
    returned (``outputs``, counts) or its ``error``. Never a key. Reading it writes nothing.
    """

    def __init__(self, root: DataRoot, header: Mapping[str, Any]) -> None:
        self.path = root.root / MANIFEST
        self.root = root
        try:
            old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.path}: not valid JSON ({exc})") from None
        #: What the file held before this fetch (empty for a new root).
        self.previous: dict[str, Any] = old
        self.data = {
            "created": old.get("created", utc_now()),
            **jsonable(header),
            "steps": old.get("steps", {}),
        }

    def municipalities(self) -> list[dict[str, Any]]:
        """The municipalities the root's earlier fetch covered (``name``, ``code``, ...); empty
        for a new root. A root fetched before several municipalities were possible records
        only ``municipality``."""
        old = self.previous
        return old.get("municipalities") or ([old["municipality"]] if "municipality" in old else [])

    def done(self, step: str, params: Mapping[str, Any]) -> bool:
        """Whether ``step`` is recorded as done with these parameters and its outputs exist."""
        entry = self.data["steps"].get(step, {})
        return (
            entry.get("status") == "done"
            and entry.get("params") == jsonable(params)
            and all((self.root.root / p).exists() for p in entry.get("outputs", []))
        )

    def record(self, step: str, params: Mapping[str, Any], status: str, **info: Any) -> None:
        """Record a step's outcome and rewrite the file atomically."""
        self.data["steps"][step] = jsonable(
            {"status": status, "finished": utc_now(), "params": params, **info}
        )
        self.data["updated"] = utc_now()
        text = json.dumps(self.data, indent=2)
        write_atomic(self.path, lambda tmp: tmp.write_text(text))
