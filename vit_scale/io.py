"""Atomic file writes: write to a temporary name beside the target, fsync, rename, fsync the directory.

A reader sees either the old file or the new one, never a torn one, whatever kills the writer. And the
two ways the filesystem refuses, as one-line errors: a directory that cannot be written (checked before
any work) and a full disk (said with the path, the free space and what was needed).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from vit_scale.errors import UserError

_FULL = (errno.ENOSPC, errno.EDQUOT)


def writable_dir(path: str | os.PathLike, what: str, keep: bool = True) -> Path:
    """Create `path` if needed and prove a file can be written in it, before any work is done for it;
    a UserError naming `what` (e.g. "--run-dir") otherwise. With `keep` false the directories the proof
    created are removed again, so a command refused later leaves nothing behind."""
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"{what} {path} is not writable ({e.strerror or e}); choose a directory you can write"
        ) from None
    if not keep:
        for p in created:  # deepest first
            try:
                p.rmdir()
            except OSError:  # something else wrote there meanwhile: leave it
                break
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space for this user on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, path: str | os.PathLike, needed: int = 0) -> bool:
    """Whether a failed write into `path` failed for lack of space: ENOSPC or EDQUOT, or an error from a
    writer that hides the errno (torch.save's zip writer) while less space is free than was needed."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    free = free_bytes(path)
    return free is not None and free < max(needed, 1 << 20)


def disk_full_error(path: str | os.PathLike, needed: int, what: str, advice: str) -> UserError:
    free = free_bytes(path)
    free_text = "unknown space" if free is None else human_bytes(free)
    return UserError(
        f"disk full while writing {what} {path}: {free_text} free there, about {human_bytes(needed)} needed; "
        f"{advice}"
    )


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        full = e.errno in _FULL
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise disk_full_error(
                path, len(data), "file", "free space there, then run the command again"
            ) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
