"""Pieces every transfer command shares: model input, devices, feature passes, cross-rank gathers."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vit_scale.config.schema import ModelConfig
from vit_scale.dist import collective_device, is_multi_rank
from vit_scale.models import build_model

SPLIT_NAMES = {"train", "val", "test", "validation", "train800", "val200", "train800val200", "minival"}


def eval_loader(source: str, data_cfg, *, img_size: int, batch_size: int, rank: int, world_size: int):
    """One unaugmented pass over `source`, every sample once across ranks (resize + centre crop)."""
    from vit_scale.data.loader import make_loader

    return make_loader(
        source,
        data_cfg,
        train=False,
        img_size=img_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=0,
    )


def dataset_name(source: str) -> str:
    """A short name for a shard source: its directory, or the one above when that is a split name."""
    path = Path(source.rstrip("/"))
    if path.name in SPLIT_NAMES and path.parent.name:
        return path.parent.name
    return path.name or source


def plain_copy(
    model: nn.Module, model_cfg: ModelConfig, device: torch.device, keep_head: bool = False
) -> nn.Module:
    """An fp32, eval-mode copy of a (possibly ZeRO-3-partitioned, bf16) ViT; headless unless `keep_head`.

    Evaluating a copy leaves the training module, its hooks and its dtype alone, and lets each rank
    run however many batches its share of the data needs: under ZeRO-3 the live module would need
    every rank to run the same number of forwards.
    """
    params = list(model.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        gather = contextlib.nullcontext()
    with gather:
        state = {
            k.removeprefix("module."): v.detach().to(device, torch.float32, copy=True)
            for k, v in model.state_dict().items()
            if keep_head or not k.removeprefix("module.").startswith("head.")
        }
    # Built on the meta device and filled by assignment: no initialisation to pay for, and no draw
    # from the global RNG, so evaluating during training leaves the training's random stream alone.
    with torch.device("meta"):
        copy = build_model(model_cfg, num_classes=None if keep_head else 0)
    copy.load_state_dict(state, strict=True, assign=True)
    return copy.eval()


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The representation a transfer head sees: pooled, normed, through the pre-logits layer if any."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (rank order); ranks may hold different numbers of rows."""
    if not is_multi_rank():
        return t
    world = dist.get_world_size()
    device = collective_device()
    t = t.to(device)
    n = torch.tensor([t.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()
