"""The Polyak average of the parameters as checkpoints keep it: each rank's slice in its own rank file.

A rank averages each parameter where its fp32 master copy lives on that rank (its ZeRO partition of it,
or all of it when nothing is partitioned; `vit_scale.train.average`) and saves that slice in its rank
file under `AVERAGE`:

    {"decay": f, "params": {name: {"shape": [...], "start": s, "value": 1-D fp32 tensor}}}

`start` is where the slice begins in the flattened parameter, so the whole average can be put together
from the files of any layout and any ZeRO stage: for export and evaluation, and to continue the average
when a run resumes with another number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch

from vit_scale.checkpoint import safe_load
from vit_scale.checkpoint.commit import CheckpointError, rank_file_name, read_manifest

AVERAGE = "param_average"  # the key in each rank file (commit.rank_file_name)


def assemble(parts: Iterable[dict]) -> dict[str, torch.Tensor]:
    """Whole averaged parameters from every rank's slices; refuses a parameter some slice of which is missing."""
    flats: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    covered: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, s in part["params"].items():
            if name not in flats:
                shapes[name] = list(s["shape"])
                flats[name] = torch.zeros(math.prod(s["shape"]), dtype=torch.float32)
                covered[name] = torch.zeros(math.prod(s["shape"]), dtype=torch.bool)
            value = s["value"].reshape(-1)
            flats[name][s["start"] : s["start"] + value.numel()] = value.float()
            covered[name][s["start"] : s["start"] + value.numel()] = True
    missing = [name for name, c in covered.items() if not bool(c.all())]
    if missing:
        raise CheckpointError(
            f"the parameter average lacks slices of {', '.join(missing[:5])}: a rank file is missing or "
            "from another checkpoint"
        )
    return {name: flat.view(shapes[name]) for name, flat in flats.items()}


def read_average(ckpt: Path) -> dict[str, torch.Tensor] | None:
    """The whole parameter average of a committed checkpoint, or None when it was trained without one."""
    ckpt = Path(ckpt)
    world = read_manifest(ckpt)["world_size"]
    parts = []
    for r in range(world):
        state = safe_load.load(ckpt / rank_file_name(r))
        if AVERAGE in state:
            parts.append(state[AVERAGE])
    if not parts:
        return None
    if len(parts) != world:
        raise CheckpointError(
            f"{ckpt}: {len(parts)} of {world} rank files hold a parameter average; the checkpoint is damaged"
        )
    return assemble(parts)
