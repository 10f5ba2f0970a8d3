"""Small pieces every training recipe uses: seeding, batching, augmentation, prediction, and
the epoch and evaluation loops that run the same on one process and on N ranks."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.models.backbones import normalise
from core.runs import BACKBONE_FILE, parse_run_id, run_path

if TYPE_CHECKING:
    from core.distributed import Ranks


class OneCycle:
    """AdamW with a one-cycle learning rate over ``epochs`` passes of ``n`` items."""

    def __init__(
        self, parameters, lr: float, weight_decay: float, epochs: int, n: int, batch_size: int
    ):
        self.optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
        steps = epochs * max(1, -(-n // batch_size))
        self.schedule = torch.optim.lr_scheduler.OneCycleLR(self.optimiser, lr, total_steps=steps)

    def step(self, loss: torch.Tensor) -> float:
        """One optimisation step on ``loss``; returns its value."""
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        self.schedule.step()
        return loss.item()


def quiet(line: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def batches(
    n: int, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """Index batches over ``range(n)``, shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


def augment_aerial(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and quarter turns: an aerial view has no preferred orientation."""
    if torch.rand(1, generator=generator) < 0.5:
        images = images.flip(-1)
    turns = int(torch.randint(0, 4, (1,), generator=generator))
    # a quarter turn transposes the strides: back to the layout the backbones run fastest in
    return torch.rot90(images, turns, dims=(-2, -1)).contiguous(memory_format=torch.channels_last)


def augment_street(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Horizontal flip only: street scenes have an up and a down."""
    return images.flip(-1) if torch.rand(1, generator=generator) < 0.5 else images


def to_input(
    pixels: np.ndarray | torch.Tensor, index: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """uint8 pixels[index] -> normalised float batch on ``device``, channels-last."""
    batch = torch.as_tensor(np.asarray(pixels[index.numpy()]))
    return normalise(batch.to(device)).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def predict(
    fn: Callable[[torch.Tensor], torch.Tensor], n: int, batch_size: int = 512
) -> torch.Tensor:
    """Concatenate ``fn(index_batch)`` over all items, in order, in inference mode."""
    return torch.cat([fn(index).float().cpu() for index in batches(n, batch_size)])


def train_epoch(
    ranks: Ranks,
    trainer: OneCycle,
    rows: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    loss_sum: Callable[[torch.Tensor], torch.Tensor],
    min_rows: int = 1,
) -> float:
    """One pass over ``rows`` in shuffled global batches of ``batch_size``; the mean loss.

    Every rank draws the same order from ``generator`` and takes its slice of each global
    batch (:meth:`core.distributed.Ranks.shard`). ``loss_sum(mine)`` is the loss summed over
    the rows ``mine``; it is scaled by N / (global batch size), so the gradient DDP averages
    over the ranks is the global batch's mean gradient, as in one process. A global batch
    with fewer than ``min_rows`` rows per rank is skipped (BatchNorm on a vector needs two).
    """
    total = 0.0
    for index in batches(len(rows), batch_size, generator):
        total += train_batch(ranks, trainer, rows[index], loss_sum, min_rows) or 0.0
    return ranks.sum(total) / len(rows)


def train_batch(
    ranks: Ranks,
    trainer: OneCycle,
    batch: torch.Tensor,
    loss_sum: Callable[[torch.Tensor], torch.Tensor],
    min_rows: int = 1,
) -> float | None:
    """One optimisation step of :func:`train_epoch` on the global batch ``batch``.

    Each rank takes its slice; ``loss_sum`` of it is scaled by N / (global batch size), so
    DDP's averaging gives the global batch's mean gradient. Returns this rank's summed loss, or
    None (no step) for a batch with fewer than ``min_rows`` rows per rank.
    """
    if len(batch) < min_rows * ranks.world:
        return None
    scale = ranks.world / len(batch)
    return trainer.step(scale * loss_sum(ranks.shard(batch))) / scale


def predict_shared(
    ranks: Ranks | None,
    model: torch.nn.Module,
    fn: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    batch_size: int = 512,
) -> np.ndarray:
    """``fn(rows)`` for all ``n`` rows in order, each rank computing its share (:func:`predict`).

    ``model`` (what ``fn`` runs) is put in eval mode with rank 0's BatchNorm statistics, so
    every rank evaluates the same model; the shares are gathered, so every rank gets all rows.
    ``ranks`` None is one process.
    """
    model.eval()
    if ranks is None:
        return predict(fn, n, batch_size).numpy()
    ranks.broadcast_buffers(model)
    rows = ranks.shard(torch.arange(n))
    if len(rows):
        values = predict(lambda index: fn(rows[index]), len(rows), batch_size)
    else:  # fewer rows than ranks: an empty share of the right width
        values = predict(fn, 1)[:0]
    return ranks.gather_rows(rows, values.numpy(), n)


def resolve_weights(runs_root: Path, value: str | None) -> str | None:
    """A weights argument: a file path, or the id of a run that saved ``backbone.safetensors``.

    A value that is not a file must be a run id (:func:`core.runs.run_path`): ``../other`` is
    never followed out of ``runs_root``.
    """
    if value in (None, "", "random"):
        return None
    if Path(value).is_file():
        return str(value)
    try:
        parse_run_id(value)
    except ValueError:
        raise FileNotFoundError(
            f"{value}: neither a weights file nor a run id (<kind>-<yyyymmdd-hhmmss>-<4 hex>)"
        ) from None
    candidate = run_path(runs_root, value) / BACKBONE_FILE
    if candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(
        f"{value}: neither a weights file nor a run in {runs_root} with {BACKBONE_FILE}"
    )
