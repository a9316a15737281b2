"""Polyak averaging of the parameters (`optim.ema_decay`), the paper's ImageNet fine-tunes' factor 0.9999.

After every applied optimizer step: average = decay * average + (1 - decay) * parameters, in fp32. Each rank
averages only what the optimizer keeps of each parameter on that rank, the fp32 master copy:

- ZeRO-3: the rank's partition of every parameter (the optimizer's flat fp32 partition);
- ZeRO-1/2 (and DeepSpeed's bf16 optimizer): the slices of the flat fp32 partition this rank owns;
- no ZeRO: the whole of every parameter on every rank (the optimizer's fp32 copy under bf16, the
  parameter itself in fp32).

So the average costs what one more fp32 copy of the rank's optimizer partition costs, and one `lerp` per
step. It is saved in each rank's own checkpoint file (`vit_scale.checkpoint.average` has the format) and
restored with it; evaluation during and after training and `vit-scale export` use it instead of the raw
parameters.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vit_scale.checkpoint.average import AVERAGE, read_average
from vit_scale.config.schema import ModelConfig
from vit_scale.dist import collective_device, is_multi_rank, on_rank0
from vit_scale.errors import UserError
from vit_scale.models import build_model


@dataclass
class Slice:
    name: str
    shape: tuple[int, ...]
    start: int  # offset in the flattened parameter
    master: torch.Tensor  # 1-D view of the optimizer's fp32 master values


def master_slices(engine) -> Iterator[Slice]:
    """What the optimizer keeps in fp32 of each parameter on this rank, as views into its own storage."""
    opt = engine.optimizer
    # Without ZeRO, 16-bit training: DeepSpeed's FP16_UnfusedOptimizer keeps one fp32 copy per parameter.
    fp32_of = {}
    for lows, highs in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
        fp32_of.update({id(lo): hi for lo, hi in zip(lows, highs)})
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition, padding dropped
            part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False)
            size = p.ds_tensor.ds_numel
            start = opt._get_param_partition_rank(p) * size
            n = max(0, min(size, p.ds_numel - start))
            if n:
                yield Slice(name, tuple(p.ds_shape), start, part.narrow(0, 0, n))
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2: None when none of it is in this rank's partition
            hp = p._hp_mapping
            if hp is not None:
                yield Slice(name, tuple(p.shape), hp.lp_fragment_address.start, hp.hp_fragment.view(-1))
        elif id(p) in fp32_of:
            yield Slice(name, tuple(p.shape), 0, fp32_of[id(p)].detach().view(-1))
        elif p.dtype == torch.float32:  # fp32 without ZeRO: the parameter is its own master
            yield Slice(name, tuple(p.shape), 0, p.detach().view(-1))
        else:
            raise UserError(
                f"optim.ema_decay: cannot find the fp32 master copy of {name} under {type(opt).__name__}; "
                "set optim.ema_decay=0 or use ZeRO stage 1-3"
            )


class ParamAverage:
    """The running average of this rank's fp32 master slices; every rank holds one."""

    def __init__(self, engine, decay: float):
        self.engine, self.decay = engine, decay
        self._attach()
        self.values = [s.master.detach().clone() for s in self.slices]
        params = list(engine.module.parameters())
        # Partitioned (any ZeRO stage): each element sits on one rank. Otherwise every rank holds it all.
        self.partitioned = any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params)

    def _attach(self) -> None:
        self.slices = list(master_slices(self.engine))
        self.masters = [s.master for s in self.slices]

    @torch.no_grad()
    def update(self) -> None:
        """After an applied step: average += (1 - decay) * (master - average)."""
        torch._foreach_lerp_(self.values, self.masters, 1.0 - self.decay)

    def state_dict(self) -> dict:
        params = {
            s.name: {"shape": list(s.shape), "start": s.start, "value": v.detach().to("cpu", copy=True)}
            for s, v in zip(self.slices, self.values)
        }
        return {"decay": self.decay, "params": params}

    @torch.no_grad()
    def restore(self, own: dict | None, ckpt: Path | None) -> None:
        """Continue the average saved with checkpoint `ckpt`, which the engine has just loaded.

        `own` is this rank's saved state (None when the checkpoint was written by another number of
        processes: the whole average is then put together from every rank file and sliced anew). A
        checkpoint without an average starts it from the weights just loaded.
        """
        self._attach()  # the engine may have put its fp32 partitions in new tensors while loading
        if own is not None and AVERAGE in own:
            saved = own[AVERAGE]["params"]
            for s, v in zip(self.slices, self.values):
                entry = saved.get(s.name)
                if entry is None or entry["start"] != s.start or entry["value"].numel() != v.numel():
                    raise UserError(
                        f"the parameter average in {ckpt} does not match this rank's slice of {s.name}; "
                        "resume with the layout that wrote it"
                    )
                v.copy_(entry["value"])
            return
        whole = read_average(ckpt) if ckpt is not None else None
        if whole is None:
            on_rank0(
                print,
                f"vit-scale: {ckpt} holds no parameter average; optim.ema_decay={self.decay:g} averages from "
                "its weights on",
                file=sys.stderr,
            )
            for v, s in zip(self.values, self.slices):
                v.copy_(s.master)
            return
        for v, s in zip(self.values, self.slices):
            v.copy_(whole[s.name].reshape(-1)[s.start : s.start + v.numel()])

    @torch.no_grad()
    def state_dict_full(self) -> dict[str, torch.Tensor]:
        """The whole averaged parameters on every rank (one all-reduce of their size when partitioned)."""
        shapes = {
            name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in self.engine.module.named_parameters()
        }
        offsets, total = {}, 0
        for name, shape in shapes.items():
            offsets[name] = total
            total += torch.Size(shape).numel()
        flat = torch.zeros(total, dtype=torch.float32, device=collective_device())
        for s, v in zip(self.slices, self.values):
            begin = offsets[s.name] + s.start
            flat[begin : begin + v.numel()] = v
        if self.partitioned and is_multi_rank():
            dist.all_reduce(flat)  # the slices are disjoint: a sum with zeros elsewhere is exact
        flat = flat.cpu()
        return {
            name: flat[offsets[name] : offsets[name] + torch.Size(shape).numel()].view(shape)
            for name, shape in shapes.items()
        }

    def module(self, model_cfg: ModelConfig) -> nn.Module:
        """A plain fp32 ViT of the averaged weights for evaluation, built on the meta device (no RNG draw)."""
        with torch.device("meta"):
            model = build_model(model_cfg)
        model.load_state_dict(self.state_dict_full(), strict=True, assign=True)
        return model
