"""Where a training process runs: device, DDP rank and world, set up from ``torchrun``'s environment.

``torchrun`` (single or multi node) exports RANK, WORLD_SIZE and LOCAL_RANK; with a world above one
the default process group starts on NCCL for CUDA and gloo for CPU. No launcher of our own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(option: str, local_rank: int = 0) -> torch.device:
    """``auto`` is this process's GPU (LOCAL_RANK) when CUDA is present, else the CPU."""
    if option == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(option)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {option!r}: CUDA is not available on this host")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def start(device_option: str) -> Runtime:
    """Join the torchrun process group if there is one; pick and select the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_option, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device=device, rank=rank, world=world, local_rank=local_rank)


def stop(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
