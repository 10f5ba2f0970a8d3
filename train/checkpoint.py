"""Training checkpoints without pickle: tensors in safetensors, the rest as JSON metadata.

A checkpoint holds the model, the optimiser's per-parameter state, the learning-rate
schedule, the epoch it completed and the shuffling generator, so a resumed run continues as
if it had never stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.io import write_atomic


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    generator: torch.Generator,
) -> None:
    """Write the training state after ``epoch`` atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optimiser_state = optimiser.state_dict()
    for index, state in optimiser_state["state"].items():
        for name, value in state.items():
            tensors[f"optimiser.{index}.{name}"] = (
                torch.as_tensor(value).detach().cpu().contiguous()
            )
    tensors["generator"] = generator.get_state()
    metadata = {
        "epoch": str(epoch),
        "param_groups": json.dumps(optimiser_state["param_groups"]),
        "schedule": json.dumps(schedule.state_dict()),
    }
    # Tensors that share memory (tied weights) must be saved as separate copies.
    tensors = {k: v.clone() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata))


def load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> int:
    """Restore the state :func:`save_checkpoint` wrote; returns the epoch it completed.

    Raises:
        FileNotFoundError: without a checkpoint file.
        ValueError: if the checkpoint does not fit the model (another architecture or size).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no checkpoint to resume from (the run stopped before its first epoch)"
        )
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata() or {}
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open has no iteration)
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path}: checkpoint does not fit this model ({error})") from error
    per_parameter: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimiser."):
            _, index, name = key.split(".", 2)
            per_parameter.setdefault(int(index), {})[name] = value
    optimiser.load_state_dict(
        {"state": per_parameter, "param_groups": json.loads(metadata["param_groups"])}
    )
    schedule.load_state_dict(json.loads(metadata["schedule"]))
    generator.set_state(tensors["generator"])
    return int(metadata["epoch"])
