"""The device a process computes on: choosing it, its autocast context, its peak memory."""
from __future__ import annotations

import contextlib
import resource

import torch

from minillm.errors import ConfigError


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA (this rank's GPU) if present, else CPU. Raises ConfigError for cuda without a GPU."""
    if pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda': no CUDA device is available; use device=cpu or device=auto")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when ``bf16``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated (MiB), or on CPU the process's peak resident set size (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
