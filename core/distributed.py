"""One process or many: the distributed plumbing every trainer shares.

Contract:

- Started plainly (``stadsbeeld fusion ...``) a trainer is one process, world size 1, and
  nothing here does anything. Started under ``torchrun --nproc-per-node N`` (or SLURM through
  torchrun) every process is a rank; accelerate's :class:`~accelerate.PartialState` reads
  torchrun's environment and joins the process group: gloo on CPU, NCCL on GPUs.
- Every rank runs the same code with the same seed, so every rank draws the same shuffled
  order and the same augmentation decisions; :meth:`Ranks.shard` then gives each rank its own
  slice of each global batch (positions ``rank, rank + N, ...``). A trainer's loss is the sum
  over its slice divided by the *global* batch size, times N: DDP averages gradients over the
  ranks, so the step is the global batch's mean gradient, as in one process.
- BatchNorm is synchronised across ranks on GPUs (:class:`torch.nn.SyncBatchNorm`, which
  PyTorch runs on GPUs only); on CPU each rank normalises its own slice, so N gloo ranks
  match one process only within a tolerance (stated in the tests).
- Metrics are computed on whole splits: :meth:`Ranks.gather_rows` reassembles per-rank
  predictions in the original order, so every rank computes the same metrics and makes the
  same best-epoch decision.
- Only rank 0 writes the run folder (:meth:`Ranks.run_writer`); the other ranks get the run
  id and write nothing. A rank that dies makes torchrun stop the others, and the run folder,
  built beside ``runs/`` as always, never becomes visible.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from core.models.device import resolve_device
from core.runs import RunWriter

T = TypeVar("T")


class _Follower:
    """What a rank other than 0 holds instead of a :class:`RunWriter`: rank 0 writes."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def __getattr__(self, name: str) -> Callable[..., None]:
        if not callable(getattr(RunWriter, name, None)):
            raise AttributeError(name)
        return lambda *args, **kwargs: None


class Ranks:
    """Where this process stands among the ranks of one training run.

    Args:
        device: ``auto``, ``cpu`` or a torch device; under torchrun on GPUs each rank takes
            its own GPU (``cuda:LOCAL_RANK``).
    """

    def __init__(self, device: str | torch.device = "auto") -> None:
        wanted = resolve_device(device)
        self.state = PartialState(cpu=wanted.type == "cpu")
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.device = self.state.device if self.world > 1 else wanted

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes."""
        return self.rank == 0

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch of rows."""
        return rows[self.rank :: self.world]

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` on this rank's device, with synchronised BatchNorm on GPUs."""
        if self.world > 1 and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model.to(self.device)

    def ddp(self, model: nn.Module) -> nn.Module:
        """``model`` whose gradients are averaged over the ranks (itself in one process).

        Wrap again whenever the set of trainable parameters changes (a backbone unfrozen):
        DDP fixes the parameters it reduces when it is built.
        """
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def main_first(self) -> AbstractContextManager[None]:
        """A block rank 0 runs first and the others after it (fill a cache once, then read it)."""
        return self.state.main_process_first()

    def broadcast_buffers(self, model: nn.Module) -> None:
        """Rank 0's BatchNorm statistics on every rank, so that every rank evaluates the same
        model (without synchronised BatchNorm each rank updated them on its own slice)."""
        if self.world > 1:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def sum(self, value: float) -> float:
        """The sum of ``value`` over the ranks."""
        if self.world == 1:
            return float(value)
        total = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(total)
        return float(total.item())

    def gather_rows(self, rows: torch.Tensor, values: np.ndarray, n: int) -> np.ndarray:
        """Every rank's ``values`` of its ``rows`` as one array of ``n`` rows, in row order."""
        if self.world == 1:
            out = np.empty((n, *values.shape[1:]), values.dtype)
            out[rows.numpy()] = values
            return out
        pieces = gather_object([(rows.numpy(), values)])
        out = np.empty((n, *values.shape[1:]), values.dtype)
        for index, part in pieces:
            out[index] = part
        return out

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            self.state.wait_for_everyone()

    @contextmanager
    def run_writer(self, start: Callable[[], RunWriter]) -> Iterator[Any]:
        """Rank 0's run folder from ``start()``; the other ranks get a writer that writes nothing.

        Every rank leaves the block only when rank 0 has committed the folder.
        """
        if self.is_main:
            with start() as run:
                self.broadcast(run.run_id)
                yield run
        else:
            yield _Follower(self.broadcast(None))
        self.barrier()
