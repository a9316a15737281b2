"""Reading checkpoint files without running code from them.

A `.pt` file is a pickle, and a pickle names functions that the loader calls: a checkpoint copied from
someone else can run any command as the user who reads it. Everything that reads weights (`eval`,
`fewshot`, `finetune init=`, `export`, `inspect`, `vtab`) and each rank's own state file goes through
`load`: torch's weights-only unpickler, which builds tensors and plain containers, plus the short
allowlist below of what our and DeepSpeed's files hold besides. DeepSpeed's classes are not imported
for it: each allowed DeepSpeed name is rebuilt as an inert stand-in that only keeps the values.

Resuming a run's optimizer state through DeepSpeed's `load_checkpoint` still unpickles with full
pickle; README's "Trust and safety" section says which run directories to resume.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from vit_scale.errors import UserError


class _Inert:
    """What an allowed DeepSpeed object (its loss scaler, a fragment address) becomes when read here:
    its values in attributes, none of its code."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's array rebuilder, wherever this numpy keeps it
_NUMERIC_DTYPES = [type(np.dtype(c)) for c in "?bBhHiIlLqQefdg"]

ALLOWED: list = [
    # RNG states in rank_XXXXX.pt: numpy's generator state holds a uint32 array.
    np.ndarray,
    np.dtype,
    *_NUMERIC_DTYPES,
    (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
    (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
    # DeepSpeed's ZeRO optimizer files: the stage (an IntEnum, read as its int) and two plain records.
    (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_Inert, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Inert, "deepspeed.utils.tensor_fragment.fragment_address"),
]


class UnsafeCheckpointError(UserError):
    """A checkpoint file that asks to run code, or that is not a readable torch file."""


def load(path: str | Path, *, mmap: bool = False, what: str = "checkpoint file"):
    """`torch.load` of `path` on the CPU that runs no code from the file; a file that needs more than the
    allowlist, or is damaged (not a readable `what`), is an UnsafeCheckpointError naming it."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(ALLOWED):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UnsafeCheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    except Exception as e:  # torch raises many types for a refused global or a damaged file
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text:
            asked = re.search(r"GLOBAL ([\w.]+)|got <class '([^']+)'>|function (\S+)", text)
            asked_for = next((g for g in asked.groups() if g), "code") if asked else "code"
            raise UnsafeCheckpointError(
                f"{path}: refused to load: its pickle asks for {asked_for}, but weights files hold only tensors "
                "and plain values; the file was altered or comes from elsewhere: do not use it"
            ) from None
        raise UnsafeCheckpointError(
            f"{path} is not a readable {what} ({type(e).__name__}: {' '.join(text.split())[:200]})"
        ) from None
