"""Run folders: how a training run writes its artifacts and how the dashboard finds them.

A run is a folder ``runs_root/<run_id>/`` holding

- ``config.yaml``: the resolved config, written first;
- ``metrics.csv``: one row per epoch (optional);
- ``metrics.json``: the final metrics, NaN stored as null;
- ``predictions.parquet``: ``cell_id`` int64, ``split`` str, ``true`` and ``predicted`` float64,
  plus any extra columns;
- ``embeddings.parquet`` (optional): ``cell_id`` int64 and ``embedding``, a fixed-size list of
  float32, with the width in the schema metadata ``dim``;
- ``embeddings.faiss`` and ``embeddings.faiss.json`` (a cache, written by whoever first searches
  the embeddings of a run above ``core.search.EXACT_MAX`` cells where the folder is writable;
  rebuilt when stale, safe to delete);
- ``model.safetensors`` (optional), ``log.txt``, and ``progress.json`` (the last progress
  report, read by the job worker while the run is going);
- written by some trainers: ``backbone.safetensors`` (an image encoder others can load as
  weights) and, while training, ``checkpoint.safetensors`` (to resume an interrupted run).

:class:`RunWriter` writes it under ``.tmp-<run_id>`` and renames it when complete, or to
``.failed-<run_id>`` when the training raised, so :func:`list_runs` only ever sees complete runs.
Code elsewhere names these files by the constants below, never by their text.

This module never imports torch: the dashboard reads runs through it. Checkpoints are stored
with ``safetensors.numpy``; torch tensors are accepted duck-typed and come back as numpy arrays.
"""

from __future__ import annotations

import csv
import json
import re
import secrets
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from core.io import jsonable, move_folder, read_table, require_columns, utc_now, write_atomic
from core.progress import Progress

CONFIG_FILE = "config.yaml"
EPOCHS_FILE = "metrics.csv"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
EMBEDDINGS_FILE = "embeddings.parquet"
#: The cached faiss index of the embeddings (beside it ``INDEX_FILE + ".json"``; core.search).
INDEX_FILE = "embeddings.faiss"
MODEL_FILE = "model.safetensors"
LOG_FILE = "log.txt"
BACKBONE_FILE = "backbone.safetensors"
PROGRESS_FILE = "progress.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
#: Prefixes of a run folder still being written, and of one whose training failed.
TMP_PREFIX = ".tmp-"
FAILED_PREFIX = ".failed-"
REQUIRED_FILES = (CONFIG_FILE, METRICS_FILE, PREDICTIONS_FILE)
PREDICTION_COLUMNS = ("cell_id", "split", "true", "predicted")
LIST_COLUMNS = ("run_id", "kind", "created", "path")

_TIME_FORMAT = "%Y%m%d-%H%M%S"
_KIND = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_RUN_ID = re.compile(rf"(?P<kind>{_KIND.pattern})-(?P<time>\d{{8}}-\d{{6}})-[0-9a-f]{{4}}")


def new_run_id(kind: str) -> str:
    """A new run id ``<kind>-<UTC yyyymmdd-hhmmss>-<4 hex>``, e.g. ``fusion-20261122-034501-ab12``.

    Ids of one kind sort by start time (to the second); the random suffix keeps two runs
    started in the same second apart.

    Raises:
        ValueError: if ``kind`` is not letters, digits, ``-`` and ``_`` (it names folders).
    """
    if not _KIND.fullmatch(kind):
        raise ValueError(
            f"run kind {kind!r}: use letters, digits, '-' and '_', starting with a letter or digit"
        )
    return f"{kind}-{datetime.now(UTC).strftime(_TIME_FORMAT)}-{secrets.token_hex(2)}"


def parse_run_id(run_id: str) -> tuple[str, pd.Timestamp]:
    """The kind and the UTC start time encoded in a run id.

    Raises:
        ValueError: if ``run_id`` is not of the form :func:`new_run_id` makes.
    """
    match = _RUN_ID.fullmatch(run_id)
    if match is None:
        raise ValueError(f"{run_id!r} is not a run id (<kind>-<yyyymmdd-hhmmss>-<4 hex>)")
    return match["kind"], pd.Timestamp(datetime.strptime(match["time"], _TIME_FORMAT), tz="UTC")


def run_path(runs_root: str | PathLike, run_id: str, *, prefix: str = "") -> Path:
    """The folder ``runs_root/<prefix><run_id>``, after checking that ``run_id`` is a run id.

    The one way an id (from the command line, a job, a config) becomes a folder: an id must be
    of the form :func:`new_run_id` makes (so no ``/``, ``..`` or leading ``.``), and a folder
    that exists must not be a symbolic link leading outside ``runs_root``. The folder need not
    exist.

    Args:
        runs_root: the runs folder.
        run_id: the id to check.
        prefix: :data:`TMP_PREFIX` or :data:`FAILED_PREFIX` for an interrupted run's folder.

    Raises:
        ValueError: if ``run_id`` is not a run id, or its folder leads outside ``runs_root``.
    """
    if not isinstance(run_id, str) or _RUN_ID.fullmatch(run_id) is None:
        raise ValueError(f"{run_id!r} is not a run id (<kind>-<yyyymmdd-hhmmss>-<4 hex>)")
    root = Path(runs_root)
    path = root / f"{prefix}{run_id}"
    if path.is_symlink() and not _inside(path, root):
        raise ValueError(
            f"{path}: run {run_id} is a symbolic link to {path.resolve()}, outside {root}"
        )
    return path


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, links followed, lies inside ``root`` (links followed too)."""
    return path.resolve().is_relative_to(root.resolve())


def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    try:
        text = json.dumps(jsonable(value), indent=2, allow_nan=False)
    except TypeError as exc:
        raise ValueError(f"{path}: value is not JSON-serialisable ({exc})") from exc
    write_atomic(path, lambda tmp: tmp.write_text(text + "\n"))


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy array from an array-like or a torch tensor (duck-typed, so torch is not imported).

    bfloat16 tensors are widened to float32: numpy (and so safetensors.numpy) has no bfloat16.
    """
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


class RunWriter:
    """Writes one run folder; use as a context manager.

    ``RunWriter(runs_root, kind, config)`` creates ``runs_root/.tmp-<run_id>/`` and writes
    ``config.yaml`` at once. Leaving the ``with`` block normally checks that ``config.yaml``,
    ``metrics.json`` and ``predictions.parquet`` exist and renames the folder to
    ``runs_root/<run_id>/``; an exception (or a missing required file) renames it to
    ``runs_root/.failed-<run_id>/`` with the traceback at the end of ``log.txt``.

    Args:
        runs_root: folder holding the runs; created if missing.
        kind: model kind, the run id's prefix (``fusion``, ``contrastive``, ...).
        config: the resolved config; must be YAML-serialisable (plain Python values).
        progress: called by :meth:`progress` with the values and ``run_id`` (a job worker
            reports them); an exception it raises (e.g. a cancel) fails the run.

    Raises:
        ValueError: for a bad ``kind`` or a config that is not a YAML-serialisable dict.
    """

    def __init__(
        self,
        runs_root: str | PathLike,
        kind: str,
        config: Mapping[str, Any],
        progress: Progress | None = None,
    ) -> None:
        self.run_id = new_run_id(kind)
        self._report = progress
        self.runs_root = Path(runs_root)
        if not isinstance(config, Mapping):
            raise ValueError(f"run config: expected a mapping, got {type(config).__name__}")
        try:
            config_text = yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True)
        except yaml.YAMLError as exc:
            # safe_dump refuses numpy scalars and Paths, which safe_load could not read back.
            raise ValueError(f"run config: not YAML-serialisable plain values ({exc})") from exc
        self._path = self.runs_root / f"{TMP_PREFIX}{self.run_id}"
        self._path.mkdir(parents=True)
        self._epoch_columns: list[str] | None = None
        write_atomic(self._path / CONFIG_FILE, lambda tmp: tmp.write_text(config_text))

    @classmethod
    def resume(
        cls,
        runs_root: str | PathLike,
        run_id: str,
        progress: Progress | None = None,
    ) -> RunWriter:
        """Reopen an interrupted run (``.tmp-<run_id>`` or ``.failed-<run_id>``) to continue it.

        The folder is moved back to ``.tmp-<run_id>`` and keeps its config, log and per-epoch
        rows; the caller restores its own checkpoint and may drop epochs after it with
        :meth:`keep_epochs`.

        Raises:
            FileNotFoundError: if no interrupted run of that id exists.
            FileExistsError: if the run already completed.
            ValueError: if ``run_id`` is not a run id or its folder leads outside ``runs_root``
                (:func:`run_path`).
        """
        root = Path(runs_root)
        complete = run_path(root, run_id)
        if complete.exists():
            raise FileExistsError(f"{complete}: run {run_id} is complete; nothing to resume")
        found = [
            folder
            for folder in (run_path(root, run_id, prefix=p) for p in (TMP_PREFIX, FAILED_PREFIX))
            if folder.is_dir()
        ]
        if not found:
            raise FileNotFoundError(
                f"{root}: no interrupted run {run_id} (.tmp-{run_id} or .failed-{run_id})"
            )
        writer = cls.__new__(cls)
        writer.run_id, writer.runs_root = run_id, root
        writer._report = progress
        writer._path = found[0]
        if found[0].name.startswith(FAILED_PREFIX):
            writer._move(f"{TMP_PREFIX}{run_id}")
        epochs = _read_epochs(writer._path / EPOCHS_FILE)
        writer._epoch_columns = list(epochs.columns) if len(epochs.columns) else None
        writer.log(f"resumed from {found[0].name}")
        return writer

    @property
    def config(self) -> dict[str, Any]:
        """The run's ``config.yaml`` as written."""
        return _read_yaml(self._path / CONFIG_FILE)

    def keep_epochs(self, last_epoch: int) -> None:
        """Drop ``metrics.csv`` rows after ``last_epoch`` (those a resumed run trains again)."""
        epochs = _read_epochs(self._path / EPOCHS_FILE)
        if "epoch" in epochs and (epochs["epoch"] > last_epoch).any():
            kept = epochs[epochs["epoch"] <= last_epoch]
            write_atomic(self._path / EPOCHS_FILE, lambda tmp: kept.to_csv(tmp, index=False))

    @property
    def path(self) -> Path:
        """The run folder: the temporary one while running, the final (or failed) one after."""
        return self._path

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.log("run failed:\n" + "".join(traceback.format_exception(exc_type, exc, tb)))
            self._move(f"{FAILED_PREFIX}{self.run_id}")
            return  # the exception propagates
        missing = [name for name in REQUIRED_FILES if not (self._path / name).is_file()]
        if missing:
            self.log(f"run incomplete: missing {missing}")
            self._move(f"{FAILED_PREFIX}{self.run_id}")
            raise RuntimeError(
                f"{self._path}: run incomplete, missing {missing}; "
                "write_metrics() and write_predictions() must be called before the run ends"
            )
        self._move(self.run_id)

    def _move(self, name: str) -> None:
        self._path = move_folder(self._path, self.runs_root / name)

    def _append(self, name: str, text: str) -> None:
        with open(self._path / name, "a", encoding="utf-8") as file:
            file.write(text)
            file.flush()

    def log(self, message: str) -> None:
        """Append ``<UTC time> <message>`` to ``log.txt`` (flushed at once, for tailing)."""
        self._append(LOG_FILE, f"{utc_now()} {message.rstrip()}\n")

    def log_epoch(self, **values: float | int | str | None) -> None:
        """Append one row to ``metrics.csv`` (None is written as an empty cell).

        The first call fixes the columns; later calls may leave some out but not add new ones.

        Raises:
            ValueError: for a column the first call did not have.
        """
        first = self._epoch_columns is None
        if first:
            self._epoch_columns = list(values)
        columns = self._epoch_columns
        unknown = [k for k in values if k not in columns]
        if unknown:
            raise ValueError(
                f"{self._path / EPOCHS_FILE}: new columns {unknown}; the columns are "
                f"{columns} (fixed by the first log_epoch call)"
            )
        with open(self._path / EPOCHS_FILE, "a", encoding="utf-8", newline="") as file:
            writer = csv.writer(file)
            if first:
                writer.writerow(columns)
            writer.writerow(["" if values.get(k) is None else values[k] for k in columns])

    def progress(self, **values: Any) -> None:
        """Replace ``progress.json`` atomically with ``values`` (epoch, loss, val tau, ...) and
        the time, then pass ``values`` and ``run_id`` to the ``progress`` callback."""
        _write_json(self._path / PROGRESS_FILE, {**values, "time": utc_now()})
        if self._report is not None:
            self._report({**values, "run_id": self.run_id})

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Write the final ``metrics.json`` (NaN and inf as null)."""
        _write_json(self._path / METRICS_FILE, metrics)

    def write_predictions(self, frame: pd.DataFrame) -> None:
        """Write ``predictions.parquet``: the four contract columns first, extra columns kept.

        Raises:
            ValueError: for a missing column or a non-integer ``cell_id``.
        """
        path = self._path / PREDICTIONS_FILE
        require_columns(frame, PREDICTION_COLUMNS, path)
        if not pd.api.types.is_integer_dtype(frame["cell_id"]):
            raise ValueError(f"{path}: cell_id must be integers, got {frame['cell_id'].dtype}")
        extra = [c for c in frame.columns if c not in PREDICTION_COLUMNS]
        table = frame[[*PREDICTION_COLUMNS, *extra]].astype(
            {"cell_id": "int64", "split": str, "true": "float64", "predicted": "float64"}
        )
        write_atomic(path, lambda tmp: table.to_parquet(tmp, index=False))

    def write_embeddings(self, cell_ids: Any, matrix: Any) -> None:
        """Write ``embeddings.parquet``: one float32 vector per cell.

        Args:
            cell_ids: unique integer cell ids, one per row of ``matrix``.
            matrix: ``(n, dim)`` array or tensor; stored as float32.

        Raises:
            ValueError: for mismatched shapes, non-integer or duplicate ids, or NaN/inf values.
        """
        path = self._path / EMBEDDINGS_FILE
        ids = _to_numpy(cell_ids)
        vectors = _to_numpy(matrix).astype(np.float32)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{path}: cell_ids must be a 1-D integer array, got {ids.dtype}")
        if vectors.ndim != 2 or vectors.shape[0] != ids.size:
            raise ValueError(
                f"{path}: matrix must be ({ids.size}, dim) for {ids.size} cell ids, "
                f"got {vectors.shape}"
            )
        duplicates = ids.size - np.unique(ids).size
        if duplicates:
            raise ValueError(f"{path}: {duplicates} duplicate cell ids")
        if not np.isfinite(vectors).all():
            bad = int((~np.isfinite(vectors)).any(axis=1).sum())
            raise ValueError(f"{path}: {bad} of {ids.size} embeddings hold NaN or inf")
        dim = vectors.shape[1]
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
        table = pa.table(
            {"cell_id": pa.array(ids.astype(np.int64)), "embedding": embedding},
            metadata={"dim": str(dim)},
        )
        write_atomic(path, lambda tmp: pq.write_table(table, tmp))

    def save_model(
        self, state_dict: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Write ``model.safetensors`` from numpy arrays or torch tensors.

        Args:
            state_dict: parameter name -> array or tensor.
            metadata: stored in the safetensors header; non-string values as JSON.
        """
        tensors = {name: np.ascontiguousarray(_to_numpy(v)) for name, v in state_dict.items()}
        header = {
            str(k): v if isinstance(v, str) else json.dumps(jsonable(v))
            for k, v in (metadata or {}).items()
        }
        write_atomic(self._path / MODEL_FILE, lambda tmp: save_file(tensors, tmp, header))


def _read_mapping(
    path: Path,
    parse: Callable[[str], Any],
    errors: tuple[type[Exception], ...],
    kind: str,
    container: str,
) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (*errors, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid {kind} ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a {kind} {container}, got {type(value).__name__}")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    return _read_mapping(path, json.loads, (json.JSONDecodeError,), "JSON", "object")


def _read_yaml(path: Path) -> dict[str, Any]:
    return _read_mapping(path, yaml.safe_load, (yaml.YAMLError,), "YAML", "mapping")


def _read_epochs(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable per-epoch metrics CSV ({exc})") from exc


@dataclass(frozen=True)
class Run:
    """A complete run, as :func:`load_run` reads it; the large artifacts load on demand."""

    run_id: str
    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    epochs: pd.DataFrame

    def predictions(self) -> pd.DataFrame:
        """``predictions.parquet``: cell_id, split, true, predicted and any extra columns.

        Raises:
            FileNotFoundError, ValueError: for a missing or unreadable file, or missing columns.
        """
        path = self.path / PREDICTIONS_FILE
        frame = read_table(path, "run predictions")
        require_columns(frame, PREDICTION_COLUMNS, path)
        return frame

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """``embeddings.parquet`` as (int64 cell ids, float32 ``(n, dim)`` matrix).

        Raises:
            FileNotFoundError, ValueError: for a missing or unreadable file, or a wrong layout.
        """
        path = self.path / EMBEDDINGS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: run embeddings file not found")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{path}: not a readable Parquet file ({exc})") from exc
        names = table.schema.names
        if "cell_id" not in names or "embedding" not in names:
            raise ValueError(f"{path}: expected columns cell_id and embedding, found {names}")
        column = table.column("embedding").combine_chunks()
        kind = column.type
        if not (pa.types.is_fixed_size_list(kind) and pa.types.is_float32(kind.value_type)):
            raise ValueError(f"{path}: embedding must be a fixed-size list of float32, got {kind}")
        nulls = {name: table.column(name).null_count for name in ("cell_id", "embedding")}
        if any(nulls.values()):
            raise ValueError(f"{path}: null values per column {nulls}")
        ids = table.column("cell_id").to_numpy().astype(np.int64)
        # flatten() honours slicing offsets, unlike .values.
        matrix = column.flatten().to_numpy().reshape(len(ids), kind.list_size)
        return ids, matrix

    def state_dict(self) -> dict[str, np.ndarray]:
        """``model.safetensors`` as name -> numpy array (``torch.from_numpy`` each to load).

        Raises:
            FileNotFoundError, ValueError: for a missing or unreadable checkpoint.
        """
        return self._read_model(load_file)

    def model_metadata(self) -> dict[str, str]:
        """The metadata :meth:`RunWriter.save_model` stored in the checkpoint header."""
        return self._read_model(_safetensors_metadata)

    def _read_model(self, read: Callable[[Path], Any]) -> Any:
        path = self.path / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: run has no model checkpoint")
        try:
            return read(path)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc


def _safetensors_metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="numpy") as file:
        return dict(file.metadata() or {})


def load_run(run_dir: str | PathLike) -> Run:
    """Read a run folder's config, final and per-epoch metrics.

    Raises:
        FileNotFoundError: if the folder, ``config.yaml`` or ``metrics.json`` is missing.
        ValueError: if one of them (or ``metrics.csv``) is unreadable.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: run folder not found")
    return Run(
        run_id=path.name,
        path=path,
        config=_read_yaml(path / CONFIG_FILE),
        metrics=_read_json(path / METRICS_FILE),
        epochs=_read_epochs(path / EPOCHS_FILE),
    )


def _scalars(values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {
        f"{prefix}{k}": v
        for k, v in values.items()
        if v is None or isinstance(v, str | int | float | bool)
    }


def list_runs(runs_root: str | PathLike, kind: str | None = None) -> pd.DataFrame:
    """The complete runs under ``runs_root``, newest first.

    A complete run is a folder whose name does not start with ``.`` and that holds
    ``metrics.json``. A run whose files are unreadable, and a symbolic link leading outside
    ``runs_root``, are skipped with a warning naming the folder.

    Args:
        runs_root: the runs folder; a missing one means no runs.
        kind: keep only runs of this kind.

    Returns:
        Columns ``run_id, kind, created`` (UTC start time), ``path``, then the top-level scalar
        config values as ``config.<key>`` and metrics as ``metrics.<key>``.
    """
    root = Path(runs_root)
    rows = []
    folders = sorted(root.iterdir()) if root.is_dir() else []
    for folder in folders:
        if folder.name.startswith(".") or not (folder / METRICS_FILE).is_file():
            continue
        if folder.is_symlink() and not _inside(folder, root):
            warnings.warn(
                f"skipping run {folder}: a symbolic link to {folder.resolve()}, outside {root}",
                stacklevel=2,
            )
            continue
        try:
            run_kind, created = parse_run_id(folder.name)
            if kind is not None and run_kind != kind:
                continue
            config = _read_yaml(folder / CONFIG_FILE)
            metrics = _read_json(folder / METRICS_FILE)
        except (OSError, ValueError) as exc:
            warnings.warn(f"skipping run {folder}: {exc}", stacklevel=2)
            continue
        rows.append(
            {
                "run_id": folder.name,
                "kind": run_kind,
                "created": created,
                "path": folder,
                **_scalars(config, "config."),
                **_scalars(metrics, "metrics."),
            }
        )
    if not rows:
        return pd.DataFrame(columns=list(LIST_COLUMNS))
    frame = pd.DataFrame(rows)
    return frame.sort_values(["created", "run_id"], ascending=False, ignore_index=True)
