"""Frozen-encoder feature cache and pixel cache: rows filled once, by one process or N ranks.

The ground branch of the fusion model is frozen, so its per-image features depend only on
(backbone, weights, input size, image set). They are extracted once into a cache folder keyed by
exactly that, as a memory-mapped ``features.npy`` plus ``index.parquet`` (image id -> row) and
``meta.json``; a cache whose metadata does not match the request is never read (a different
backbone or weights file gives a different folder). The decoded pixels the small encoders train
on (:func:`load_pixels`) are cached the same way, as one ``.npy`` per (image set, size).

Both caches are filled row by row, never held whole in memory:

- The ``.npy`` file is created at its full size first (by rank 0, before any other rank opens
  it), then each process writes the rows it was given with positional writes (``os.pwrite``):
  a write touches exactly its rows' bytes, so ranks on several machines sharing a network file
  system never write back each other's pages, as a shared memory map would.
- Progress is recorded after each chunk: one process filling from the first missing row to the
  end advances ``meta.json``'s ``done`` (the rows before it are complete), as the cache always
  did; otherwise each rank records each slice it fills in its own small file
  ``done-<start>-<stop>.json`` (``done`` rows from ``start`` are written).
- A rerun, with any number of ranks, reads every record, takes the union of the rows done,
  and shares what is missing among its ranks in whole batches (so a resumed cache equals one
  filled at once, bit for bit); when the last row is written, rank 0 sets ``done`` to the row
  count and removes the slice records.

Without a process group (``ranks`` None or a world of one) nothing waits for anyone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

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

if TYPE_CHECKING:
    from core.distributed import Ranks

CACHE_VERSION = 1

#: Rows ``[start, stop)`` of a cache.
Rows = tuple[int, int]
T = TypeVar("T")


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
    images: pd.DataFrame,
    px: int,
    cache_root: str | Path,
    workers: int = 2,
    ranks: Ranks | None = None,
    batch_size: int = 512,
) -> np.ndarray:
    """All images of a set as one uint8 array (n, 3, px, px), decoded once and cached.

    Small encoders train for several epochs on the same images; decoding the JPEGs once (in
    DataLoader workers) makes an epoch a pure tensor loop over the memory-mapped result. The
    file is filled ``batch_size`` images at a time under a temporary folder
    ``pixels-<px>px-<set>.npy.partial/`` (the array and its progress records), so memory does
    not grow with the number of images and an interrupted fill resumes; it is renamed into
    place when complete.

    Args:
        images: the image set (columns ``id``, ``path``); its order is the order of the rows.
        px: images are resized to this square.
        cache_root: folder of the pixel caches.
        workers: DataLoader processes decoding the JPEGs.
        ranks: with a process group, every rank calls this and decodes its share of the
            missing images; None (or one process) fills alone.
        batch_size: images decoded and written per step (and per progress record).
    """
    ids = images["id"].astype(str).to_numpy()
    paths = images["path"].astype(str).to_numpy()
    path = Path(cache_root) / f"pixels-{px}px-{image_set_key(ids, paths)}.npy"
    partial = path.with_name(f"{path.name}.partial")
    store = partial / "pixels.npy"

    def start() -> list[Rows]:
        if path.exists():
            shutil.rmtree(partial, ignore_errors=True)  # left by a kill after the rename
            return []
        if not store.exists():
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            _create_rows(store, np.uint8, (len(ids), 3, px, px))
        return _missing(_done_rows(partial, 0), len(ids))

    def finish() -> None:
        if not path.exists():
            os.replace(store, path)
            shutil.rmtree(partial)

    missing = _on_main(ranks, start)
    if missing:
        _fill(
            store,
            _share(missing, batch_size, *_rank_of(ranks)),
            paths,
            px,
            batch_size,
            workers,
            lambda batch: batch.numpy(),
            _record_slice(partial),
        )
    _barrier(ranks)
    _on_main(ranks, finish)
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
    device: str | torch.device = "auto",
    chunk_batches: int = 8,
    progress: Progress | None = None,
    ranks: Ranks | None = None,
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
            Under a process group each rank uses its own device (``ranks.device``).
        chunk_batches: batches between progress checkpoints (the unit of resumption).
        progress: called with ``done`` and ``total`` rows after each chunk (under a process
            group: the rows done before this call plus this rank's own).
        ranks: with a process group, every rank calls this and extracts its share of the
            missing rows into the one cache; None (or one process) extracts alone.
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
    model = create_backbone(backbone, weights=weights)  # no weights: the fixed-seed random floor
    meta_done = meta | {"dim": model.num_features}
    rank, world = _rank_of(ranks)
    started = time.perf_counter()  # reset when the rows start

    def start() -> list[Rows]:
        done = _resume_point(folder, meta)
        if done is None:
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("done-*.json"):  # records of a cache never completed
                stale.unlink()
            _create_rows(folder / "features.npy", np.float32, (len(ids), model.num_features))
            pd.DataFrame({"id": ids, "path": paths}).to_parquet(
                folder / "index.parquet", index=False
            )
            done = 0
            _write_meta(folder, {**meta_done, "done": 0})
        return _missing(_done_rows(folder, done), len(ids))

    def finish() -> None:  # also clears the records a kill left after the last row
        if _resume_point(folder, meta) != len(ids):
            _write_meta(
                folder,
                {**meta_done, "done": len(ids), "seconds": round(time.perf_counter() - started, 2)},
            )
        for record in folder.glob("done-*.json"):
            record.unlink()

    missing = _on_main(ranks, start)
    if missing:
        if world == 1 and len(missing) == 1 and missing[0][1] == len(ids):
            # one process, from the first missing row to the end: meta.json's done says it all
            def record(first: int, stop: int, row: int) -> None:
                seconds = round(time.perf_counter() - started, 2)
                _write_meta(folder, {**meta_done, "done": row, "seconds": seconds})
        else:
            record = _record_slice(folder)
        where = ranks.device if ranks is not None else resolve_device(device)
        model = model.to(where).eval().to(memory_format=torch.channels_last)

        def forward(batch: torch.Tensor) -> np.ndarray:
            x = normalise(batch)  # already on ``where`` (pixel_batches)
            return model(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()

        started = time.perf_counter()
        with (
            torch.inference_mode(),
            torch.autocast(where.type, dtype=torch.bfloat16, enabled=where.type == "cuda"),
        ):
            _fill(
                folder / "features.npy",
                _share(missing, batch_size, rank, world),
                paths,
                px,
                batch_size,
                workers,
                forward,
                record,
                device=where,
                decode_on=decode_on,
                chunk_batches=chunk_batches,
                progress=progress,
                before=len(ids) - sum(stop - first for first, stop in missing),
            )
    _barrier(ranks)
    _on_main(ranks, finish)
    return FeatureSet(
        ids=ids, matrix=np.load(folder / "features.npy", mmap_mode="r"), folder=folder
    )


def _resume_point(folder: Path, meta: dict) -> int | None:
    """Rows ``meta.json`` records as done in ``folder``, or None when it must be (re)created."""
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


# --- filling the rows of a cache, by one process or by N ranks ---------------------------------


def _rank_of(ranks: Ranks | None) -> tuple[int, int]:
    """``(rank, world)``; ``(0, 1)`` without a process group."""
    return (0, 1) if ranks is None else (ranks.rank, ranks.world)


def _barrier(ranks: Ranks | None) -> None:
    if ranks is not None:
        ranks.barrier()


def _on_main(ranks: Ranks | None, fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 alone, its result (or its exception) on every rank.

    Every other rank waits here until rank 0 is done, so what ``fn`` creates exists before
    they open it.
    """
    rank, world = _rank_of(ranks)
    if world == 1:
        return fn()
    outcome: tuple[T | None, BaseException | None] = (None, None)
    if rank == 0:
        try:
            outcome = (fn(), None)
        except Exception as exc:
            outcome = (None, exc)
    value, error = ranks.broadcast(outcome)
    if error is not None:
        raise error  # on the other ranks, rank 0's exception as it arrived
    return value


def _create_rows(path: Path, dtype: type, shape: tuple[int, ...]) -> None:
    """An ``.npy`` file of ``shape`` at its full size (sparse: the rows are written later)."""

    def create(tmp: Path) -> None:
        if shape[0] == 0:  # numpy cannot map an empty file
            np.save(tmp, np.zeros(shape, dtype))
            return
        rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        rows.flush()
        del rows

    write_atomic(path, create)


def _done_rows(folder: Path, prefix: int) -> list[Rows]:
    """The rows recorded as written: ``[0, prefix)`` and every slice record's rows."""
    rows = [(0, prefix)]
    for record in folder.glob("done-*.json"):
        try:
            slice_ = json.loads(record.read_text())
            rows.append((int(slice_["start"]), int(slice_["start"]) + int(slice_["done"])))
        except (ValueError, KeyError, TypeError, OSError):
            continue  # written atomically, so only a foreign file: its rows are redone
    return rows


def _missing(done: list[Rows], n: int) -> list[Rows]:
    """The rows of ``range(n)`` outside every interval of ``done``, as sorted intervals."""
    missing, row = [], 0
    for first, stop in sorted(done):
        if first > row:
            missing.append((row, min(first, n)))
        row = max(row, stop)
    if row < n:
        missing.append((row, n))
    return [(first, stop) for first, stop in missing if stop > first]


def _share(missing: list[Rows], batch_size: int, rank: int, world: int) -> list[Rows]:
    """Rank ``rank``'s contiguous share of the ``missing`` rows, in whole batches.

    Each interval is cut into batches from its first row, the batches are numbered in order and
    each rank takes an equal run of them: the batches are those one process would form.
    """
    counts = [-(-(stop - first) // batch_size) for first, stop in missing]
    total = sum(counts)
    low, high = rank * total // world, (rank + 1) * total // world
    mine, before = [], 0
    for (first, stop), count in zip(missing, counts, strict=True):
        a, b = max(low, before) - before, min(high, before + count) - before
        if a < b:
            mine.append((first + a * batch_size, min(stop, first + b * batch_size)))
        before += count
    return mine


def _record_slice(folder: Path) -> Callable[[int, int, int], None]:
    """A progress record per slice: ``done-<start>-<stop>.json`` holds the rows written."""

    def record(first: int, stop: int, row: int) -> None:
        text = json.dumps({"start": first, "stop": stop, "done": row - first})
        write_atomic(folder / f"done-{first}-{stop}.json", lambda tmp: tmp.write_text(text))

    return record


class _RowWriter:
    """Positional writes of whole rows into an existing ``.npy`` file."""

    def __init__(self, path: Path) -> None:
        header = np.load(path, mmap_mode="r")
        self.offset, self.dtype = header.offset, header.dtype
        self.row_shape = header.shape[1:]
        self.row_bytes = header.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        del header
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, row: int, values: np.ndarray) -> None:
        """Store ``values`` (rows of the file's row shape) from row ``row`` on."""
        if values.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {values.shape[1:]}, not {self.row_shape}")
        data = memoryview(np.ascontiguousarray(values, self.dtype)).cast("B")
        position = self.offset + row * self.row_bytes
        while data:
            written = os.pwrite(self.fd, data, position)
            data, position = data[written:], position + written

    def sync(self) -> None:
        """Make the rows written so far durable (before their progress is recorded)."""
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _fill(
    path: Path,
    share: list[Rows],
    paths: np.ndarray,
    px: int,
    batch_size: int,
    workers: int,
    compute: Callable[[torch.Tensor], np.ndarray],
    record: Callable[[int, int, int], None],
    chunk_batches: int = 1,
    device: torch.device | None = None,
    decode_on: DecodeOn = "cpu",
    progress: Progress | None = None,
    before: int = 0,
) -> None:
    """Write ``compute(decoded images)`` into the rows ``share`` of ``path``, batch by batch.

    After every ``chunk_batches`` batches (and at the end of each slice) the rows are synced
    and ``record(start, stop, row)`` says that ``[start, row)`` of slice ``[start, stop)`` is
    written; only one batch of images is held at a time. The images come from
    :func:`pixel_batches` on ``device`` (the CPU when None), decoded as ``decode_on`` says.
    """
    device = torch.device("cpu") if device is None else device
    out = _RowWriter(path)
    written = 0
    try:
        for first, stop in share:
            loader = pixel_batches(
                list(paths[first:stop]), px, batch_size, workers, device, decode_on
            )
            row = first
            for batch_index, batch in enumerate(loader, start=1):
                values = compute(batch)
                out.write(row, values)
                row += len(values)
                written += len(values)
                if batch_index % chunk_batches == 0 or row == stop:
                    out.sync()
                    record(first, stop, row)
                    if progress is not None:
                        progress({"done": before + written, "total": len(paths)})
    finally:
        out.close()


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
