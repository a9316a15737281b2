"""The full fp32 weights of a DeepSpeed checkpoint of any ZeRO stage, read without running pickled code.

DeepSpeed's own `zero_to_fp32` unpickles every shard with full pickle. This reads the same files through
`safe_load.load` and reassembles the weights the same way:

- stage 0: the model-states file holds the whole module;
- stages 1 and 2: each rank's optimizer file holds its slice of one flat fp32 vector per parameter group;
  joined in rank order, a group's vector holds its parameters one after another (each followed by its
  alignment padding when DeepSpeed recorded one);
- stage 3: every parameter is split into `ceil(numel / ranks)` elements per rank; each rank's flat
  groups, joined, hold its piece of every parameter in order.

The layout (names, shapes, buffers, frozen and shared parameters) comes from the model-states file.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from vit_scale.checkpoint.safe_load import load
from vit_scale.errors import UserError


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _files(ckpt: Path, pattern: str) -> list[Path]:
    found = sorted(ckpt.glob(pattern), key=_natural)
    if not found:
        raise UserError(f"{ckpt} has no {pattern} files; the checkpoint is incomplete")
    return found


def consolidated_state_dict(ckpt: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """name -> full fp32 (or buffer dtype) tensor of the module saved in checkpoint directory `ckpt`."""
    ckpt = Path(ckpt)
    if zero_stage == 0:
        return dict(_module_states(ckpt / "mp_rank_00_model_states.pt")["module"])
    model_files = _files(ckpt, "*_model_states.pt")
    layout = _module_states(model_files[0])
    optim = [load(f, mmap=True)["optimizer_state_dict"] for f in _files(ckpt, "*_optim_states.pt")]
    ranks = optim[0]["partition_count"]
    ranks = max(ranks) if isinstance(ranks, list) else ranks
    if ranks != len(optim):
        raise UserError(f"{ckpt} holds {len(optim)} optimizer shards but was written by {ranks} ranks")
    out = {
        k: v.float() if v.is_floating_point() else v
        for k, v in layout["module"].items()
        if k in layout["buffer_names"]
    }
    if zero_stage <= 2:
        _merge_frozen_zero2(out, layout)
        _merge_zero2(
            out,
            layout,
            [o["single_partition_of_fp32_groups"] for o in optim],
            ranks,
            optim[0].get("param_alignment_paddings"),
        )
    else:
        _merge_frozen_zero3(
            out, [_module_states(f) for f in model_files] if _has_frozen(layout) else [], ranks
        )
        _merge_zero3(out, layout, [o["fp32_flat_groups"] for o in optim], ranks)
    for name, source in layout["shared_params"].items():
        if source in out:
            out[name] = out[source]
    return out


def _module_states(path: Path) -> dict:
    states = load(path)
    if not isinstance(states, dict) or "module" not in states:
        raise UserError(f"{path} is not a DeepSpeed model-states file")
    return states


def _has_frozen(layout: dict) -> bool:
    return bool(layout.get("frozen_param_shapes"))


def _merge_frozen_zero2(out: dict, layout: dict) -> None:
    for name in layout.get("frozen_param_shapes") or {}:
        out[name] = layout["frozen_param_fragments"][name]


def _merge_zero2(out: dict, layout: dict, groups_per_rank: list, ranks: int, paddings) -> None:
    for g, shapes in enumerate(layout["param_shapes"]):
        flat = torch.cat([groups[g] for groups in groups_per_rank])
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            out[name] = flat.narrow(0, offset, numel).view(shape).clone()
            offset += numel + (paddings[g][i] if paddings is not None else 0)
        align = 2 * ranks  # DeepSpeed pads each group to a multiple of twice the ranks
        if align * math.ceil(offset / align) != align * math.ceil(flat.numel() / align):
            raise UserError(f"parameter group {g} of the checkpoint does not match its recorded shapes")


def _merge_frozen_zero3(out: dict, per_rank: list[dict], ranks: int) -> None:
    if not per_rank:
        return
    for name, shape in per_rank[0]["frozen_param_shapes"].items():
        pieces = torch.cat([states["frozen_param_fragments"][name] for states in per_rank])
        out[name] = pieces.narrow(0, 0, math.prod(shape)).view(shape).clone()


def _merge_zero3(out: dict, layout: dict, groups_per_rank: list, ranks: int) -> None:
    flats = [torch.cat(list(groups)) for groups in groups_per_rank]
    offset = 0
    for shapes in layout["param_shapes"]:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            per_rank = math.ceil(numel / ranks)
            pieces = torch.cat([flat.narrow(0, offset, per_rank) for flat in flats])
            out[name] = pieces.narrow(0, 0, numel).view(shape).clone()
            offset += per_rank
    if offset != flats[0].numel():
        raise UserError("the checkpoint's ZeRO-3 shards do not match its recorded shapes")
