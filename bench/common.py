"""The benchmark registry, timing helper, machine info and atomic result writing."""

from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from core.io import utc_now

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

Benchmark = Callable[..., dict[str, Any]]


class _Entry:
    def __init__(self, name: str, fn: Benchmark, params: dict[str, Any]) -> None:
        self.name, self.fn, self.params = name, fn, params


REGISTRY: dict[str, _Entry] = {}


def register(name: str, **params: Any) -> Callable[[Benchmark], Benchmark]:
    """Register ``fn(**params) -> dict of results`` as benchmark ``name``.

    ``params`` are the defaults; they are passed to the function as keyword arguments and
    recorded in the result file (``--repeat`` on the command line overrides ``repeat``).
    """

    def decorate(fn: Benchmark) -> Benchmark:
        if name in REGISTRY and REGISTRY[name].fn is not fn:
            raise ValueError(f"benchmark {name!r} registered twice")
        REGISTRY[name] = _Entry(name, fn, dict(params))
        return fn

    return decorate


def discover() -> dict[str, str]:
    """Import every ``bench/bench_*.py`` so its benchmarks register.

    Returns:
        ``{module: error}`` for modules that failed to import (the others still register).
    """
    failed: dict[str, str] = {}
    for path in sorted(BENCH_DIR.glob("bench_*.py")):
        module = f"{__package__}.{path.stem}"
        try:
            importlib.import_module(module)
        except Exception:  # a broken benchmark module must not hide the others
            failed[module] = traceback.format_exc(limit=3).strip()
    return failed


def measure(fn: Callable[[], Any], repeat: int) -> tuple[dict[str, float], Any]:
    """Run ``fn`` ``repeat`` times; median and min wall time (s) and the last return value."""
    times, value = [], None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times)}, value


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
    }


def write_json(payload: dict[str, Any], path: Path) -> Path:
    """Write JSON atomically: a temp file beside ``path``, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, sort_keys=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def run_one(name: str, out_dir: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a registered benchmark and write ``out_dir/<name>.json``; returns the payload."""
    entry = REGISTRY[name]
    params = {**entry.params, **{k: v for k, v in (overrides or {}).items() if k in entry.params}}
    timestamp = utc_now()
    start = time.perf_counter()
    results = entry.fn(**params)
    payload = {
        "name": name,
        "timestamp": timestamp,
        "machine": machine_info(),
        "parameters": params,
        "results": results,
        "total_wall_s": round(time.perf_counter() - start, 3),
    }
    write_json(_rounded(payload), out_dir / f"{name}.json")
    return payload


def summary(payload: dict[str, Any]) -> str:
    """One line: counts as ``key=value``, timings as ``step median ms (min ms)``."""
    parts = []
    for key, value in payload["results"].items():
        if isinstance(value, dict) and "median_s" in value:
            parts.append(f"{key} {value['median_s'] * 1e3:.1f} ms (min {value['min_s'] * 1e3:.1f})")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, int | str) and not isinstance(value, bool):
            parts.append(f"{key}={str(value)[:60]}")
    repeat = payload["parameters"].get("repeat")
    tail = f"  [median of {repeat}]" if repeat else ""
    return f"{payload['name']}: " + " | ".join(parts) + tail


def _rounded(value: Any) -> Any:
    """Floats to 6 significant digits and numpy scalars to Python, to keep result files small."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(f"{float(value):.6g}")
    return value


def _typed(value: Any, default: Any) -> Any:
    """A command-line override converted to its default's type (bool from true/false/1/0)."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    if isinstance(default, bool):
        return value.strip().lower() in ("1", "true", "yes")
    return type(default)(float(value)) if isinstance(default, int) else type(default)(value)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all registered)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="result folder")
    parser.add_argument("--repeat", type=int, default=None, help="override repeats per step")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a parameter of the named benchmarks (typed like its default), e.g. a size",
    )
    parser.add_argument("--list", action="store_true", help="list benchmarks and exit")
    args = parser.parse_args(argv)

    failed = discover()
    for module, error in failed.items():
        print(f"warning: could not import {module}:\n{error}", file=sys.stderr)
    if args.list:
        for name, entry in sorted(REGISTRY.items()):
            print(f"{name}  {entry.params}")
        return 0
    names = args.names or sorted(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; registered: {sorted(REGISTRY)}")
    overrides = {} if args.repeat is None else {"repeat": args.repeat}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected NAME=VALUE")
        overrides[key] = value
    for name in names:
        params = REGISTRY[name].params
        unknown_params = [k for k in overrides if k not in params and k != "repeat"]
        if unknown_params:
            parser.error(f"{name} has no parameter(s) {unknown_params}; it has {sorted(params)}")
        typed = {k: _typed(v, params[k]) for k, v in overrides.items() if k in params}
        payload = run_one(name, args.out, typed)
        print(summary(payload), flush=True)
    return 1 if failed and not args.names else 0
