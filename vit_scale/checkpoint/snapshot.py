"""A checkpoint's contents at one step boundary, and writing them to disk.

`record_save` runs DeepSpeed's own save, so DeepSpeed still decides what each file holds and what it is
called, but through a checkpoint engine that records (path, state) instead of writing. `HostMemory.snapshot`
copies those states into host memory, so training can go on while `write_file` puts them on disk from
another thread. DeepSpeed's own background engines do not fit: the decoupled engine hands the live tensors
to a writer process and blocks the next optimizer step until the write ends (no copy, so a write longer
than one forward and backward stalls training anyway), and FastPersist and DataStates need libaio or a
package of their own.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any

import torch


def record_save(engine, root: Path, tag: str, client_state: dict) -> list[tuple[Path, Any]]:
    """DeepSpeed's save of `engine` as `root/tag`, with every file it would write returned as (path,
    state) and not written. Every rank calls it (DeepSpeed synchronises inside); it creates the directory."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    files: list[tuple[Path, Any]] = []

    class Recorder(CheckpointEngine):
        def create(self, info):
            pass

        def save(self, state_dict, path: str):
            files.append((Path(path), state_dict))

        def load(self, path: str, map_location=None):
            raise NotImplementedError("the recorder only saves; loads go through the engine's own")

        def commit(self, info):
            return True

    own = engine.checkpoint_engine
    engine.checkpoint_engine = Recorder()
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine = own
    return files


def _tensors(obj):
    """The tensors reachable through dicts, lists and tuples (where a checkpoint's states keep theirs)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


def _storage_key(s: torch.UntypedStorage):
    return (s.device, s.data_ptr(), s.nbytes())


class HostMemory:
    """Host buffers for snapshots, kept from one save to the next and reused when the next snapshot needs
    the same sizes. Fresh memory costs a page fault per page on first touch (measured at about a fifth of
    the speed of a copy into memory already touched), so only the first snapshot of a run pays for it. The
    buffers of the last snapshot are in use until its files are written: the caller takes the next
    snapshot only after that."""

    def __init__(self):
        self._kept: dict[tuple[int, bool], list[torch.UntypedStorage]] = {}

    def new_bytes(self, obj) -> int:
        """Bytes a snapshot of `obj` would allocate beyond the kept buffers."""
        free = {k: len(v) for k, v in self._kept.items()}
        seen, total = set(), 0
        for t in _tensors(obj):
            s = t.untyped_storage()
            if _storage_key(s) in seen:
                continue
            seen.add(_storage_key(s))
            key = (s.nbytes(), s.device.type != "cpu")
            if free.get(key, 0):
                free[key] -= 1
            else:
                total += s.nbytes()
        return total

    def snapshot(self, obj):
        """A copy of `obj` whose tensors live in host memory. Each storage is copied once, so views that
        share a storage still share it and `torch.save` writes the same bytes for the copy as for `obj`;
        everything else is deep-copied."""
        pool, self._kept = self._kept, {}
        copies: dict = {}
        memo: dict = {}
        on_device = False

        def copy_storage(s: torch.UntypedStorage) -> torch.UntypedStorage:
            nonlocal on_device
            key = (s.nbytes(), s.device.type != "cpu")
            free = pool.get(key)
            if free:
                dst = free.pop()
            elif key[1]:  # pinned, so the copy from the device is a DMA
                dst = torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=True).untyped_storage()
            else:
                dst = torch.UntypedStorage(s.nbytes())
            dst.copy_(s, non_blocking=key[1])
            on_device |= key[1]
            self._kept.setdefault(key, []).append(dst)
            return dst

        for t in _tensors(obj):
            if id(t) in memo:
                continue
            s = t.untyped_storage()
            k = _storage_key(s)
            if k not in copies or not s.nbytes():
                copies[k] = copy_storage(s)
            c = torch.empty(0, dtype=t.dtype).set_(copies[k], t.storage_offset(), t.size(), t.stride())
            if isinstance(t, torch.nn.Parameter):
                c = torch.nn.Parameter(c, requires_grad=t.requires_grad)
            elif t.requires_grad:
                c.requires_grad_(True)
            memo[id(t)] = c
        if on_device:
            torch.cuda.synchronize()  # the copies must land before training changes their sources
        return copy.deepcopy(obj, memo)


def all_finite(obj) -> bool:
    """Whether every floating-point tensor in `obj` is free of NaN and infinity. min and max are NaN or
    infinite when any element is: one pass, without a mask as large as the tensor (isfinite().all() took
    most of a ViT-B/16 snapshot's time)."""
    seen = set()
    for t in _tensors(obj):
        if not t.is_floating_point() or not t.numel() or id(t) in seen:
            continue
        seen.add(id(t))
        if not all(torch.isfinite(v) for v in torch.aminmax(t.detach())):
            return False
    return True


class _HashingWriter:
    """A file that hashes what is written to it, so a file is hashed without reading it back."""

    def __init__(self, f):
        self.f = f
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_file(path: Path, state) -> dict:
    """`torch.save(state)` to `path` atomically (temporary name, fsync, rename); returns its size and
    sha256. The caller fsyncs the directory once its files are renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        out = _HashingWriter(f)
        torch.save(state, out)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    return {"size": size, "sha256": out.sha256.hexdigest()}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
