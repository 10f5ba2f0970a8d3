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
- A loss with in-batch negatives (InfoNCE) is computed over the whole global batch on every
  rank: :meth:`Ranks.gather_batch` reassembles the batch's embeddings in order, gradients flow
  through the rank's own rows only, and the loss is scaled by N as above.
- BatchNorm is synchronised across ranks on GPUs (:class:`torch.nn.SyncBatchNorm`, which
  PyTorch runs on GPUs only); on CPU each rank normalises its own slice, so N gloo ranks
  match one process only within a tolerance (stated in the tests).
- Metrics are computed on whole splits: :meth:`Ranks.gather_rows` reassembles per-rank
  predictions in the original order, so every rank computes the same metrics and makes the
  same best-epoch decision.
- Only rank 0 writes the run folder (:meth:`Ranks.run_writer`); the other ranks get the run
  id and write nothing. A rank that dies makes torchrun stop the others, and the run folder,
  built beside ``runs/`` as always, never becomes visible.
- A rank leaves the process group when its interpreter exits: a group left standing is torn
  down with the interpreter's static objects, and gloo's threads then now and then abort a rank
  that had finished cleanly ("terminate called without an active exception", one exit in ~12).
"""

from __future__ import annotations

import atexit
import os
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


def _leave_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def join_local_group(rank: int, world: int, port: int, device: str | torch.device = "cpu") -> Ranks:
    """Join a group of ``world`` ranks on this machine as ``rank``, as under torchrun.

    For processes that tests and benchmarks start themselves (spawned or forked) instead of
    torchrun: sets torchrun's environment and forgets any one-process state the parent held.
    """
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    PartialState._reset_state()
    return Ranks(device)


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
        if self.world > 1:
            atexit.unregister(_leave_group)  # once, however many Ranks a process makes
            atexit.register(_leave_group)

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

    def ddp(self, model: nn.Module, trainable_only: bool = False) -> nn.Module:
        """``model`` whose gradients are averaged over the ranks (itself in one process).

        Wrap again whenever the set of trainable parameters changes (a backbone unfrozen):
        DDP fixes the parameters it reduces when it is built.

        Args:
            model: the module; its ``forward`` is what the trainer calls, once per step.
            trainable_only: DDP leaves frozen parameters and all buffers alone (no broadcast
                from rank 0, when wrapped or on each forward): every rank loaded them itself from
                one checkpoint, as the frozen weights of a VLM under LoRA. The trainable ones
                are broadcast from rank 0 when wrapped and their gradients averaged, as always.
        """
        if self.world == 1:
            return model
        if trainable_only:
            frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
            buffers = [name for name, _ in model.named_buffers()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, frozen + buffers
            )
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

    def map_rows(self, n: int, compute: Callable[[torch.Tensor], np.ndarray]) -> np.ndarray:
        """``compute(rows)`` of rows ``0 .. n-1`` as one array in row order, on every rank;
        each rank computes its share (:meth:`shard`) and the shares are gathered."""
        rows = self.shard(torch.arange(n))
        return self.gather_rows(rows, compute(rows), n)

    def gather_batch(self, mine: torch.Tensor, n: int) -> torch.Tensor:
        """The global batch of ``n`` rows, in order, from every rank's :meth:`shard` of it.

        For losses with in-batch negatives: every rank computes the loss over the whole batch.
        Gradients flow only into this rank's own rows (the other ranks' rows are copies), so
        the loss each rank backpropagates is the global loss times the world size: DDP's
        average of the ranks' gradients is then the global loss's gradient.

        Args:
            mine: this rank's rows ``rank, rank + N, ...`` of the batch, ``(len, ...)``.
            n: the global batch size.
        """
        if self.world == 1:
            return mine
        size = -(-n // self.world)  # the largest share; smaller ones are padded to it
        padded = mine.new_zeros((size, *mine.shape[1:]))
        padded[: len(mine)] = mine.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        # row k of rank r is row k * N + r of the batch
        rows = torch.stack(parts, 1).flatten(0, 1)[:n]
        return rows.index_copy(0, torch.arange(self.rank, n, self.world, device=mine.device), mine)

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
