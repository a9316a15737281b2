"""DeepSpeed's JIT-compiled ops: built once per environment, never waited on for ever.

DeepSpeed compiles some ops on first use (its shared-memory collective on CPU, the CPU Adam of ZeRO-Offload)
into torch's extensions directory, under a `lock` file there. Three things went wrong with that:

- the default directory (~/.cache/torch_extensions) is shared by every environment of a home directory,
  and each environment has other include paths, so each start rebuilt the op over the last one's;
- a build killed half-way could leave a lock that later starts waited on for ever (torch's older
  existence-based lock, and its fallback on filesystems without flock, such as Lustre mounted without it);
- on a multi-node job every process may build at once.

So: the ops go to `torch_extensions/` inside the Python environment (TORCH_EXTENSIONS_DIR, when set, is
respected as it is); `vit-scale ops build` (run by `make` when it installs) builds them there once; before
DeepSpeed loads an op, a lock held longer than VIT_SCALE_OPS_LOCK_TIMEOUT seconds (default 600) is a
one-line error saying which file to delete; and on each node only local rank 0 may build, the others
wait for its result.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from vit_scale.errors import UserError

TIMEOUT_ENV = "VIT_SCALE_OPS_LOCK_TIMEOUT"
LOCK_TIMEOUT_S = 600.0
OPS = {"cpu_adam": "CPUAdamBuilder", "deepspeed_shm_comm": "ShareMemCommBuilder"}  # the ones vit-scale loads


def extensions_dir() -> Path:
    """Where torch builds and finds JIT ops: TORCH_EXTENSIONS_DIR when set, else `torch_extensions/` in
    this environment (set in os.environ, so DeepSpeed and every child process use it too)."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    path = Path(sys.prefix) / "torch_extensions"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(path)
    return path


def lock_timeout() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV, LOCK_TIMEOUT_S))
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds") from None


def _builders(names):
    """(name, DeepSpeed op builder) of each op this accelerator has and DeepSpeed did not build at install."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    out = []
    for name in names:
        builder = get_accelerator().create_op_builder(OPS[name])
        if builder is not None and not installed_ops.get(name, False):
            out.append((name, builder))
    return out


def _built(name: str) -> bool:
    return (extensions_dir() / name / f"{name}.so").is_file()


def wait_for_lock(name: str, timeout: float) -> None:
    """Return once op `name`'s build lock is free; a UserError saying what to delete after `timeout` s."""
    lock = extensions_dir() / name / "lock"
    if not lock.exists():
        return
    from torch.utils import cpp_extension

    if hasattr(cpp_extension, "FileLock"):
        # torch holds an OS lock on the file while it builds: a lock left by a dead process is free.
        from filelock import FileLock, Timeout

        try:
            with FileLock(str(lock), timeout=timeout):
                return
        except Timeout:
            pass
    else:  # older torch: the file's existence is the lock
        deadline = time.monotonic() + timeout
        while lock.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        if not lock.exists():
            return
    raise UserError(
        f"DeepSpeed's {name} op has been locked by {lock} for over {timeout:.0f} s: another process is building "
        f"it, or a build was interrupted. If no build is running (no ninja or c++ process), delete {lock} and "
        f"start again; `vit-scale ops build` builds the ops once for this environment ({TIMEOUT_ENV} sets the wait)"
    )


def _wait_for_build(name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not _built(name) and time.monotonic() < deadline:
        time.sleep(1.0)
    if not _built(name):
        raise UserError(
            f"waited {timeout:.0f} s for local rank 0 to build DeepSpeed's {name} op in {extensions_dir() / name}; "
            "run `vit-scale ops build` once for this environment before starting jobs"
        )


def prepare(offload_optimizer: bool) -> None:
    """Before DeepSpeed loads its ops: the environment's directory, a bounded wait on a build lock, and one
    builder per node (local rank 0; the node's other ranks wait for the op to appear)."""
    extensions_dir()
    timeout = lock_timeout()
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed loads its shared-memory collective only on the CPU accelerator, CPU Adam only for offload.
    names = ["deepspeed_shm_comm"] if get_accelerator().device_name() == "cpu" else []
    names += ["cpu_adam"] if offload_optimizer else []
    for name, _ in _builders(names):
        if not _built(name) and int(os.environ.get("LOCAL_RANK", "0")) != 0:
            _wait_for_build(name, timeout)
        wait_for_lock(name, timeout)


def build(names=tuple(OPS)) -> list[tuple[str, Path]]:
    """Build (or find built) each op now, in this environment's directory; returns (name, directory)."""
    extensions_dir()
    done = []
    for name, builder in _builders(names):
        wait_for_lock(name, lock_timeout())
        builder.load(verbose=False)
        done.append((name, extensions_dir() / name))
    return done
