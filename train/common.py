"""Small pieces every training recipe uses: seeding, batching, augmentation, prediction."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from core.models.backbones import normalise
from core.runs import BACKBONE_FILE, parse_run_id, run_path


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
