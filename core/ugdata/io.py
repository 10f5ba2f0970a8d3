"""Writing and reading UGData files: the JSONL samples, the graph JSON files and a whole
folder, checked against the layout."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from core.grid import RD_NEW
from core.sources.catalog import image_problem
from core.ugdata.records import (
    HELDOUT_FILE,
    MANIFEST,
    TRAIN_FILE,
    GraphRecord,
    UGDataFormatError,
    UGSample,
)


def write_samples(samples: Iterable[UGSample], path: str | PathLike) -> int:
    """Write samples as JSONL (UTF-8, one object a line); returns the line count."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_json(), ensure_ascii=False, separators=(",", ":")))
            f.write("\n")
            count += 1
    return count


def write_graph(record: GraphRecord, path: str | PathLike) -> None:
    """Write one graph JSON file."""
    Path(path).write_text(
        json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
    )


def _fail(where: str, problem: str) -> UGDataFormatError:
    return UGDataFormatError(f"{where}: {problem}")


def _check_messages(value: Any, where: str, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _fail(where, f"'{name}' must be a non-empty list of messages")
    for m in value:
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            raise _fail(where, f"'{name}' holds a message without string 'role' and 'content'")
    return value


def sample_from_json(obj: Any, where: str) -> UGSample:
    """Check one parsed JSONL object and make it a sample.

    Raises:
        UGDataFormatError: naming ``where`` (``file:line``) and the problem.
    """
    if not isinstance(obj, dict):
        raise _fail(where, f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("messages", "positive_messages", "images", "pair_type") if k not in obj]
    if missing:
        raise _fail(where, f"missing fields {missing}")
    messages = _check_messages(obj["messages"], where, "messages")
    positives = obj["positive_messages"]
    if not isinstance(positives, list) or not positives:
        raise _fail(where, "'positive_messages' must be a non-empty list of message lists")
    for p in positives:
        _check_messages(p, where, "positive_messages[]")
    for key in ("images", "graphs"):
        value = obj.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _fail(where, f"'{key}' must be a list of path strings")
    if not isinstance(obj["pair_type"], str):
        raise _fail(where, "'pair_type' must be a string")
    query = messages[-1]["content"]
    if query.count("<image>") != len(obj["images"]):
        raise _fail(where, f"{query.count('<image>')} <image> tags but {len(obj['images'])} images")
    if query.count("<graph>") != len(obj.get("graphs", [])):
        raise _fail(
            where, f"{query.count('<graph>')} <graph> tags but {len(obj.get('graphs', []))} graphs"
        )
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise _fail(where, "'meta' must be an object")
    return UGSample(
        messages,
        positives,
        list(obj["images"]),
        list(obj.get("graphs", [])),
        obj["pair_type"],
        int(obj.get("label", 1)),
        meta,
    )


def read_samples(path: str | PathLike) -> list[UGSample]:
    """Read and check a UGData JSONL file (blank lines are skipped).

    Raises:
        FileNotFoundError: if the file does not exist.
        UGDataFormatError: naming the file and line of the first malformed line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: UGData JSONL file not found")
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _fail(where, f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
            samples.append(sample_from_json(obj, where))
    return samples


def read_graph(path: str | PathLike) -> GraphRecord:
    """Read and check a graph JSON file.

    Raises:
        FileNotFoundError: if the file does not exist.
        UGDataFormatError: naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: graph JSON file not found")
    where = str(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _fail(f"{where}:{exc.lineno}", f"not valid JSON ({exc.msg})") from exc
    if not isinstance(obj, dict) or not {"nodes", "edges", "center_node"} <= set(obj):
        raise _fail(where, "expected an object with 'nodes', 'edges' and 'center_node'")
    ids = set()
    for i, n in enumerate(obj["nodes"]):
        if not isinstance(n, dict) or not {"node_id", "coords", "node_text"} <= set(n):
            raise _fail(where, f"node {i} lacks 'node_id', 'coords' or 'node_text'")
        if not (isinstance(n["coords"], list) and len(n["coords"]) == 2):
            raise _fail(where, f"node {n['node_id']!r}: 'coords' must be [lon, lat]")
        ids.add(n["node_id"])
    for i, e in enumerate(obj["edges"]):
        if not isinstance(e, dict) or e.get("source") not in ids or e.get("target") not in ids:
            raise _fail(where, f"edge {i} must join two listed nodes (source, target)")
    if obj["center_node"] not in ids:
        raise _fail(where, f"center_node {obj['center_node']!r} is not a listed node")
    return GraphRecord(
        center_node=obj["center_node"],
        nodes=obj["nodes"],
        edges=obj["edges"],
        crs=obj.get("crs", RD_NEW),
    )


@dataclass
class UGData:
    """A UGData folder read back: its manifest and samples per file."""

    root: Path
    manifest: dict[str, Any]
    files: dict[str, list[UGSample]]

    def graph(self, sample: UGSample, index: int = 0) -> GraphRecord:
        """The ``index``-th graph of a sample, read from its JSON file."""
        return read_graph(self.root / sample.graphs[index])

    def image_path(self, sample: UGSample, index: int = 0) -> Path:
        """The absolute path of a sample's ``index``-th image."""
        return (self.root / sample.images[index]).resolve()


def read_ugdata(
    folder: str | PathLike, check_graphs: bool = True, check_images: bool = False
) -> UGData:
    """Read a UGData folder: manifest, ``train.jsonl`` and ``heldout.jsonl`` if present.

    Args:
        folder: the output folder of a build.
        check_graphs: read and check every graph file the samples name.
        check_images: check every image the samples name with the trainers' image check
            (:func:`core.sources.catalog.image_problem`); samples naming a missing, corrupt or
            truncated image are left out with one warning naming the images, rather than
            stopping a training run halfway. For readers that decode the images (UGE
            training and UGBench).

    Raises:
        FileNotFoundError: for a missing folder, manifest, JSONL or referenced graph file.
        UGDataFormatError: naming the file (and line) of malformed content.
    """
    root = Path(folder)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: not a UGData folder (no manifest)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _fail(f"{manifest_path}:{exc.lineno}", f"not valid JSON ({exc.msg})") from exc
    files = {
        name: read_samples(root / name)
        for name in (TRAIN_FILE, HELDOUT_FILE)
        if (root / name).is_file()
    }
    if TRAIN_FILE not in files:
        raise FileNotFoundError(f"{root / TRAIN_FILE}: UGData JSONL file not found")
    if check_graphs:
        for name in sorted({g for samples in files.values() for s in samples for g in s.graphs}):
            read_graph(root / name)
    if check_images:
        files = _with_readable_images(root, files)
    return UGData(root=root, manifest=manifest, files=files)


def _with_readable_images(
    root: Path, files: dict[str, list[UGSample]]
) -> dict[str, list[UGSample]]:
    """``files`` without the samples that name an unreadable image, with one warning."""
    names = sorted({name for samples in files.values() for s in samples for name in s.images})
    bad = {
        name: reason
        for name in names
        if (reason := image_problem((root / name).resolve())) is not None
    }
    if not bad:
        return files
    kept = {
        key: [s for s in samples if not any(name in bad for name in s.images)]
        for key, samples in files.items()
    }
    total = sum(len(samples) for samples in files.values())
    left_out = total - sum(len(samples) for samples in kept.values())
    examples = "; ".join(
        f"{(root / name).resolve()}: {reason}" for name, reason in list(bad.items())[:3]
    )
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    warnings.warn(
        f"{root}: left out {left_out} of {total} samples naming {len(bad)} unreadable "
        f"images ({examples}{more}); rebuild the folder from a checked catalog",
        stacklevel=3,
    )
    return kept
