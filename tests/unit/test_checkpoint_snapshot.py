"""The snapshot an asynchronous save writes from: a copy in host memory that `torch.save` writes to the
same bytes as the state it was taken from, unmoved by later training, in buffers reused by the next save;
and the writer that hashes a file as it writes it."""

from __future__ import annotations

import hashlib
import io

import torch

from vit_scale.checkpoint.snapshot import HostMemory, all_finite, write_file


def saved_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def state():
    """Shaped like DeepSpeed's: parameters that are views of one flat buffer, an optimizer's tensors with
    requires_grad, a Parameter, an empty tensor, and plain Python values."""
    flat = torch.arange(10, dtype=torch.float32)
    fp32 = torch.linspace(0, 1, 6).requires_grad_(True)
    return flat, {
        "module": {"w": flat[:4].view(2, 2), "b": flat[4:]},
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(5.0)}}, "lr": 0.1},
        "fp32_partitions": [fp32],
        "param": torch.nn.Parameter(torch.full((2,), 3.0)),
        "empty": torch.empty(0),
        "shapes": (torch.Size([2, 2]), "name"),
    }


def test_a_snapshot_saves_to_the_same_bytes_and_does_not_move_with_training():
    flat, original = state()
    before = saved_bytes(original)
    snap = HostMemory().snapshot(original)
    assert saved_bytes(snap) == before
    flat.add_(1)  # training goes on: the live tensors change in place
    original["optimizer"]["state"][0]["exp_avg"].mul_(2)
    original["optimizer"]["lr"] = 0.2
    assert saved_bytes(snap) == before
    assert saved_bytes(original) != before
    # views of one storage still share one copy, and the tensor types survive
    assert (
        snap["module"]["w"].untyped_storage().data_ptr() == snap["module"]["b"].untyped_storage().data_ptr()
    )
    assert snap["module"]["w"].untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()
    assert type(snap["param"]) is torch.nn.Parameter and snap["fp32_partitions"][0].requires_grad


def test_the_next_snapshot_reuses_the_buffers_and_counts_only_new_memory():
    flat, original = state()
    memory = HostMemory()
    storage_bytes = 10 * 4 + 3 * 4 + 4 + 6 * 4 + 2 * 4  # the flat buffer counts once
    assert memory.new_bytes(original) == storage_bytes
    first = memory.snapshot(original)
    ptr = first["module"]["w"].untyped_storage().data_ptr()
    del first  # written: its buffers are free for the next save
    assert memory.new_bytes(original) == 0
    flat.add_(1)
    second = memory.snapshot(original)
    assert second["module"]["w"].untyped_storage().data_ptr() == ptr
    assert torch.equal(second["module"]["b"], flat[4:])
    original["extra"] = torch.zeros(100)
    assert memory.new_bytes(original) == 400


def test_write_file_hashes_what_it_writes_and_leaves_no_temporary_file(tmp_path):
    _, original = state()
    path = tmp_path / "states.pt"
    report = write_file(path, original)
    data = path.read_bytes()
    assert report == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert [p.name for p in tmp_path.iterdir()] == ["states.pt"]
    loaded = torch.load(path, weights_only=False)
    assert torch.equal(loaded["module"]["w"], original["module"]["w"]) and loaded["optimizer"]["lr"] == 0.1


def test_all_finite_finds_one_nan_or_infinity_anywhere_in_a_state():
    state = {
        "module": {"w": torch.randn(4, 4), "b": torch.tensor(1.0, dtype=torch.bfloat16)},
        "optimizer": [{"exp_avg": torch.zeros(3)}, {"step": torch.tensor(7)}],
        "rng": torch.ByteTensor(8).fill_(255),
        "empty": torch.zeros(0),
    }
    assert all_finite(state)
    for bad in (float("nan"), float("inf"), float("-inf")):
        state["optimizer"][0]["exp_avg"][1] = bad
        assert not all_finite(state)
        state["optimizer"][0]["exp_avg"][1] = 0.0
    state["module"]["b"] = torch.tensor(float("nan"), dtype=torch.bfloat16)
    assert not all_finite(state)
