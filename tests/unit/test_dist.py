"""The rank and device helpers every package uses instead of its own checks."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from vit_scale import dist as vdist


def test_outside_a_process_group_nothing_is_collective(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not dist.is_initialized()
    assert vdist.is_multi_rank() is False
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert vdist.device() == expected


def test_a_one_rank_gloo_group_is_not_multi_rank_and_collects_on_the_cpu(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert vdist.is_multi_rank() is False and vdist.world_size() == 1
        assert vdist.collective_device() == torch.device("cpu")  # gloo reduces CPU tensors, even beside a GPU
    finally:
        dist.destroy_process_group()


def test_free_port_is_free_to_bind():
    port = vdist.free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
