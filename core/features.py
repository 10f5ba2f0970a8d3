"""Frozen-encoder feature cache: per-image features extracted once, pooled per cell.

The ground branch of the fusion model is frozen, so its per-image features depend only on
(backbone, weights, input size, image set). They are extracted once into a cache folder keyed by
exactly that, as a memory-mapped ``features.npy`` plus ``index.parquet`` (image id -> row) and
``meta.json``. Extraction writes rows in order and records how many are done after each chunk, so
an interrupted extraction resumes where it stopped; a cache whose metadata does not match the
request is never read (a different backbone or weights file gives a different folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy import sparse
from torch.utils.data import DataLoader, Dataset

from core.io import write_atomic
from core.models.backbones import backbone_fingerprint, create_backbone, normalise
from core.models.device import resolve_device
from core.progress import Progress

CACHE_VERSION = 1


class ImageFiles(Dataset):
    """JPEG/PNG files as uint8 tensors (3, px, px), resized on load."""

    def __init__(self, paths: list[str], px: int) -> None:
        self.paths, self.px = list(paths), px

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.paths[i]
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB").resize((self.px, self.px), Image.BILINEAR))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable image ({exc})") from exc
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


#: Where :func:`extract_features` decodes JPEGs: ``cpu`` with PIL in the DataLoader workers, or
#: ``device``: the workers only read the files' bytes and :func:`decode_images` decodes them in
#: batches on the extraction device (nvjpeg on a GPU).
DecodeOn = Literal["cpu", "device"]

JPEG_MAGIC = b"\xff\xd8\xff"


class ImageBytes(Dataset):
    """Image files for decoding on the extraction device: ``(path, data)`` per file.

    ``data`` is the file's ``bytes`` for a JPEG, which :func:`decode_images` decodes in batches
    on the device; any other format (PNG, ...) is decoded here in the worker by
    :class:`ImageFiles`, as a uint8 array (3, px, px), so only JPEGs reach the device decoder.
    Bytes and arrays cross from the workers pickled through the pipe: hundreds of small tensors
    per batch would each hold a file descriptor until received.
    """

    def __init__(self, paths: list[str], px: int) -> None:
        self.paths, self.px = list(paths), px

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, bytes | np.ndarray]:
        path = self.paths[i]
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise ValueError(f"{path}: not a readable image ({exc})") from exc
        if not data.startswith(JPEG_MAGIC):
            return path, ImageFiles([path], self.px)[0].numpy()
        return path, data

    @staticmethod
    def collate(
        items: list[tuple[str, bytes | np.ndarray]],
    ) -> tuple[list[str], list[bytes | np.ndarray]]:
        """A batch as ``(paths, data)`` lists: the files differ in length and size."""
        return [path for path, _ in items], [data for _, data in items]


def decode_images(
    paths: Sequence[str], data: Sequence[bytes | np.ndarray], px: int, device: torch.device
) -> torch.Tensor:
    """A batch from :class:`ImageBytes` as uint8 (B, 3, px, px) on ``device``.

    JPEG bytes are decoded together by torchvision on ``device`` (nvjpeg on a GPU, libjpeg on a
    CPU) and resized there with antialiased bilinear interpolation, as PIL resizes in
    :class:`ImageFiles` (the two agree within a few grey levels). A batch the decoder refuses
    is decoded file by file, and a file it still refuses (CMYK, truncated, not an image) goes
    through PIL, which names an unreadable file. Items already decoded in a worker are copied.
    """
    out = torch.empty((len(data), 3, px, px), dtype=torch.uint8, device=device)
    jpegs = [i for i, item in enumerate(data) if isinstance(item, bytes)]
    for i in sorted(set(range(len(data))) - set(jpegs)):
        out[i] = torch.from_numpy(data[i]).to(device)
    encoded = [torch.frombuffer(bytearray(data[i]), dtype=torch.uint8) for i in jpegs]
    sizes: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for i, image in zip(jpegs, _decode_jpegs(encoded, device), strict=True):
        if image is None:
            out[i] = ImageFiles([paths[i]], px)[0].to(device)
        else:
            sizes.setdefault(tuple(image.shape), []).append((i, image))
    for same in sizes.values():  # one resize per image size (a source's images share one)
        rows = [i for i, _ in same]
        out[rows] = _resize(torch.stack([image for _, image in same]), px)
    return out


def pixel_batches(
    paths: list[str],
    px: int,
    batch_size: int,
    workers: int,
    device: torch.device,
    decode_on: DecodeOn = "cpu",
) -> Iterator[torch.Tensor]:
    """The images of ``paths`` in order, as uint8 batches (B, 3, px, px) on ``device``.

    ``decode_on="cpu"``: PIL decodes in the DataLoader workers (:class:`ImageFiles`) and the
    batches travel through pinned memory; ``"device"``: the workers read the bytes
    (:class:`ImageBytes`) and :func:`decode_images` decodes each batch on ``device``.
    """
    on_device = decode_on == "device"
    loader = DataLoader(
        (ImageBytes if on_device else ImageFiles)(paths, px),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=ImageBytes.collate if on_device else None,
        pin_memory=device.type == "cuda" and not on_device,
        persistent_workers=False,
        generator=_loader_generator(),  # not the global RNG: a run that fills a cache repeats
    )
    for batch in loader:
        yield (
            decode_images(*batch, px, device) if on_device else batch.to(device, non_blocking=True)
        )


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """torchvision's batched JPEG decoding to RGB on ``device``; None where it fails."""
    if not data:
        return []
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec (not a dependency here)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the whole batch: decode one by one
            decoded: list[torch.Tensor | None] = []
            for item in data:
                try:
                    decoded.append(decode_jpeg(item, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
            return decoded


def _resize(images: torch.Tensor, px: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> (B, 3, px, px), antialiased bilinear as PIL resizes."""
    if images.shape[2:] == (px, px):
        return images
    with torch.autocast(images.device.type, enabled=False):  # float32 whatever the caller runs
        resized = torch.nn.functional.interpolate(
            images.float(), size=(px, px), mode="bilinear", antialias=True
        )
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def _loader_generator() -> torch.Generator:
    """A generator for a DataLoader's worker seeds. Without one, starting workers draws from
    torch's global RNG, so a training run that fills a cache would draw differently from the
    same run reading it."""
    return torch.Generator().manual_seed(0)


def load_pixels(
    images: pd.DataFrame, px: int, cache_root: str | Path, workers: int = 2
) -> np.ndarray:
    """All images of a set as one uint8 array (n, 3, px, px), decoded once and cached.

    Small encoders train for several epochs on the same images; decoding the JPEGs once (in
    DataLoader workers) and keeping the pixels in memory makes an epoch a pure tensor loop.
    """
    ids = images["id"].astype(str).to_numpy()
    paths = images["path"].astype(str).to_numpy()
    path = Path(cache_root) / f"pixels-{px}px-{image_set_key(ids, paths)}.npy"
    if not path.exists():
        loader = DataLoader(
            ImageFiles(list(paths), px),
            batch_size=512,
            num_workers=workers,
            generator=_loader_generator(),  # not the global RNG: a run that fills the cache repeats
        )
        pixels = (
            np.concatenate([batch.numpy() for batch in loader])
            if len(paths)
            else np.zeros((0, 3, px, px), np.uint8)
        )
        write_atomic(path, lambda tmp: np.save(tmp, pixels))
    return np.load(path, mmap_mode="r")


@dataclass
class FeatureSet:
    """Features of an image set: ``ids[i]`` has features ``matrix[i]``."""

    ids: np.ndarray
    matrix: np.ndarray  # float32 (n, dim), memory-mapped from the cache
    folder: Path

    @property
    def dim(self) -> int:
        """The feature width."""
        return int(self.matrix.shape[1])


def image_set_key(ids: np.ndarray, paths: np.ndarray) -> str:
    """Short hash of an ordered image set: ids, files, and each file's size and modification
    time, so an image replaced in place is never served from an old cache."""
    digest = hashlib.sha256()
    for image_id, path in zip(ids, paths, strict=True):
        try:
            stat = os.stat(path)
            version = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            version = "missing"  # the loader reports the file by name
        digest.update(f"{image_id}\0{path}\0{version}\n".encode())
    return digest.hexdigest()[:16]


def extract_features(
    images: pd.DataFrame,
    backbone: str,
    weights: str | Path | None,
    cache_root: str | Path,
    px: int = 32,
    batch_size: int = 256,
    workers: int = 2,
    device: str = "auto",
    chunk_batches: int = 8,
    progress: Progress | None = None,
    decode_on: DecodeOn = "cpu",
) -> FeatureSet:
    """Features of ``images`` (columns ``id``, ``path``) from a frozen backbone, cached.

    Args:
        images: the image set; its order is the order of the returned rows.
        backbone: registered backbone name.
        weights: a local weights file, or None (random initialisation with a fixed seed, the
            floor baseline).
        cache_root: folder holding one subfolder per (backbone, weights, px, image set).
        px: input size the images are resized to.
        batch_size: images per forward pass.
        workers: DataLoader processes loading and decoding the JPEGs in parallel.
        device: ``auto``, ``cpu`` or ``cuda``; on CUDA the forward runs in bf16 autocast.
        chunk_batches: batches between progress checkpoints (the unit of resumption).
        progress: called with ``done`` and ``total`` rows after each chunk.
        decode_on: ``cpu`` (PIL in the workers) or ``device``: the workers read the bytes and
            the JPEGs are decoded in batches on ``device`` (:func:`decode_images`; nvjpeg on a
            GPU, where CPU decoding would starve the forward). Both fill the same cache.
    """
    if decode_on not in ("cpu", "device"):
        raise ValueError(f"decode_on must be 'cpu' or 'device', got {decode_on!r}")
    ids = images["id"].astype(str).to_numpy()
    paths = images["path"].astype(str).to_numpy()
    fingerprint = backbone_fingerprint(backbone, weights)
    key = f"{backbone}-{fingerprint}-{px}px-{image_set_key(ids, paths)}"
    folder = Path(cache_root) / key
    meta = {
        "version": CACHE_VERSION,
        "backbone": backbone,
        "fingerprint": fingerprint,
        "weights": str(weights) if weights else None,
        "px": px,
        "count": len(ids),
    }
    done = _resume_point(folder, meta)
    model = create_backbone(backbone, weights=weights)  # no weights: the fixed-seed random floor
    dim = model.num_features
    if done is None:
        folder.mkdir(parents=True, exist_ok=True)
        np.lib.format.open_memmap(
            folder / "features.npy", mode="w+", dtype=np.float32, shape=(len(ids), dim)
        )
        pd.DataFrame({"id": ids, "path": paths}).to_parquet(folder / "index.parquet", index=False)
        done = 0
        _write_meta(folder, {**meta, "dim": dim, "done": 0})
    if done < len(ids):
        _extract_rows(
            model,
            paths,
            folder,
            meta | {"dim": dim},
            done,
            px,
            batch_size,
            workers,
            resolve_device(device),
            chunk_batches,
            progress,
            decode_on,
        )
    return FeatureSet(
        ids=ids, matrix=np.load(folder / "features.npy", mmap_mode="r"), folder=folder
    )


def _resume_point(folder: Path, meta: dict) -> int | None:
    """Rows already extracted in ``folder``, or None when it must be (re)created."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    stored = json.loads(meta_path.read_text())
    if any(stored.get(k) != v for k, v in meta.items()):
        raise ValueError(
            f"{meta_path}: feature cache was made for {stored}, not {meta}; remove the folder"
        )
    return int(stored["done"])


def _write_meta(folder: Path, meta: dict) -> None:
    write_atomic(folder / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))


def _extract_rows(
    model: torch.nn.Module,
    paths: np.ndarray,
    folder: Path,
    meta: dict,
    start: int,
    px: int,
    batch_size: int,
    workers: int,
    device: torch.device,
    chunk_batches: int,
    progress: Progress | None,
    decode_on: DecodeOn = "cpu",
) -> None:
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    loader = pixel_batches(list(paths[start:]), px, batch_size, workers, device, decode_on)
    out = np.load(folder / "features.npy", mmap_mode="r+")
    row, started = start, time.perf_counter()
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
    ):
        for batch_index, pixels in enumerate(loader, start=1):
            x = normalise(pixels).contiguous(memory_format=torch.channels_last)
            features = model(x).float().cpu().numpy()
            out[row : row + len(features)] = features
            row += len(features)
            if batch_index % chunk_batches == 0 or row == len(paths):
                out.flush()
                _write_meta(
                    folder,
                    {**meta, "done": row, "seconds": round(time.perf_counter() - started, 2)},
                )
                if progress is not None:
                    progress({"done": row, "total": len(paths)})
    del out


def pool_by_cell(
    features: FeatureSet,
    image_cells: pd.Series,
    cell_ids: np.ndarray,
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Average-pool image features per cell.

    Args:
        features: the image features.
        image_cells: cell id of each image, indexed by image id.
        cell_ids: the cells to pool for (output order).
        keep: optional boolean mask over ``features.ids`` (e.g. the scene filter's subset).

    Returns:
        ``(pooled (n_cells, dim) float32, counts (n_cells,) int)``; cells without images get zeros
        and count 0 (the model decides how to treat them).
    """
    mask = np.ones(len(features.ids), bool) if keep is None else np.array(keep, bool)
    cells = image_cells.reindex(features.ids).to_numpy()
    mask &= ~pd.isna(cells)
    rows = pd.Series(np.arange(len(cell_ids)), index=pd.Index(cell_ids))
    target = rows.reindex(cells[mask].astype(np.int64)).to_numpy()
    inside = ~np.isnan(target)
    target = target[inside].astype(np.int64)
    matrix = np.asarray(features.matrix)[mask][inside]
    membership = sparse.csr_matrix(
        (np.ones(len(target)), (target, np.arange(len(target)))), shape=(len(cell_ids), len(target))
    )
    sums = membership @ matrix.astype(np.float64)
    counts = np.bincount(target, minlength=len(cell_ids))
    pooled = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    return pooled, counts
