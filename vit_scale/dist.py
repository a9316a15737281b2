"""The few distributed helpers the library needs, valid with or without an initialised process group."""

from __future__ import annotations

import os
import socket

import torch
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


def is_multi_rank() -> bool:
    """True inside a process group of more than one rank: only then has a collective anything to do."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def device() -> torch.device:
    """This rank's device: its GPU (by LOCAL_RANK) when CUDA is present, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def collective_device() -> torch.device:
    """Where a collective's tensors must live: nccl works on this rank's GPU only, gloo on the CPU."""
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


def free_port() -> int:
    """A TCP port free on this machine now (the OS picks it), for MASTER_PORT or a test's daemon."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_rank0() -> bool:
    return rank() == 0


def on_rank0(fn, *args, **kwargs):
    """Run a side effect (a file write, a print, a dashboard call) on rank 0 only; None elsewhere."""
    return fn(*args, **kwargs) if is_rank0() else None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
