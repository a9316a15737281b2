"""The few distributed helpers the library needs, valid with or without an initialised process group."""

from __future__ import annotations

import os

import torch.distributed as dist


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_rank0() -> bool:
    return rank() == 0


def on_rank0(fn, *args, **kwargs):
    """Run a side effect (a file write, a print, a dashboard call) on rank 0 only; None elsewhere."""
    return fn(*args, **kwargs) if is_rank0() else None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
