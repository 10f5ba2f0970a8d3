"""Which torch device a model runs on."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` = CUDA when present, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def bf16_autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on a GPU; on a CPU a context that changes nothing (fp32 throughout)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
