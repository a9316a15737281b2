"""Classification accuracy of weights on a shard set: top-1 and top-5, precision@1 for multi-label.

`vit-scale eval WEIGHTS --data SHARDS [--img-size N]` scores weights that carry their head (a
fine-tuned checkpoint, an export, timm or .npz weights) and writes results.json + results.md.
`evaluate` is the same measurement for code that holds a model, on any number of ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vit_scale.config.schema import Config, DataConfig
from vit_scale.dist import collective_device, is_multi_rank
from vit_scale.dist import device as rank_device
from vit_scale.errors import UserError


@torch.no_grad()
def evaluate(
    model: nn.Module,
    source: str,
    data_cfg: DataConfig,
    *,
    img_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    progress: bool = False,
) -> dict:
    """{"top1", "top5", "n"} (or {"prec1", "n"} for multi-hot labels) over every sample of `source`.

    Each rank scores its share; the counts are summed across ranks, so every rank returns the totals.
    """
    from vit_scale.data.transforms import to_model_input
    from vit_scale.evaluate.common import eval_loader

    device = device or rank_device()
    loader = eval_loader(
        source, data_cfg, img_size=img_size, batch_size=batch_size, rank=rank, world_size=world_size
    )
    head = getattr(model, "num_classes", 0)
    if loader.num_classes > 0 and head and loader.num_classes > head:
        raise UserError(
            f"{source} has {loader.num_classes} classes but the model's head has {head}; "
            "evaluate weights fine-tuned on this label set"
        )
    was_training = model.training
    model.eval()
    # [top-1 hits, top-5 hits, samples, multi-label samples]
    counts = torch.zeros(4, dtype=torch.float64)
    batches = loader.num_batches if loader.num_batches > 0 else None
    with _Progress(progress, f"eval {Path(source.rstrip('/')).name}", batches) as advance:
        for images, labels in loader:
            logits = model(to_model_input(images.to(device))).float().cpu()
            if labels.ndim == 1:
                k = min(5, logits.shape[1])
                top = logits.topk(k, dim=1).indices
                counts[0] += (top[:, 0] == labels).sum()
                counts[1] += (top == labels[:, None]).any(1).sum()
            else:  # precision@1: is the highest-scoring class one of the image's labels?
                counts[0] += (labels.gather(1, logits.argmax(1, keepdim=True)) > 0).sum()
                counts[3] += len(labels)
            counts[2] += len(labels)
            advance()
    model.train(was_training)
    if world_size > 1 and is_multi_rank():  # the data was split over the ranks: sum their counts
        summed = counts.to(collective_device())
        dist.all_reduce(summed)
        counts = summed.cpu()
    hits1, hits5, n, multi = (float(c) for c in counts)
    if n == 0:
        raise UserError(f"{source} holds no readable samples to evaluate")
    if multi:
        return {"prec1": hits1 / n, "n": int(n), "bad_samples": loader.bad_samples}
    return {"top1": hits1 / n, "top5": hits5 / n, "n": int(n), "bad_samples": loader.bad_samples}


def score(model: nn.Module, cfg: Config, sources: dict[str, str], progress: bool = False) -> dict[str, dict]:
    """`evaluate` of the model being trained (by `cfg`) on each named source that is set, every rank scoring
    its share. An fp32 copy is scored, so the result is the same whatever the engine did to the module
    (bf16 casting, ZeRO-3 partitioning)."""
    from vit_scale.dist import device as rank_device
    from vit_scale.dist import rank, world_size
    from vit_scale.evaluate.common import plain_copy

    device = rank_device()
    scored = plain_copy(model, cfg.model, device, keep_head=True)
    img_size = cfg.eval.img_size or cfg.model.img_size
    return {
        split: evaluate(
            scored,
            source,
            cfg.data,
            img_size=img_size,
            batch_size=cfg.eval.batch_size,
            rank=rank(),
            world_size=world_size(),
            device=device,
            progress=progress,
        )
        for split, source in sources.items()
        if source
    }


class _Progress:
    """A rich progress bar on rank 0 for long passes; a no-op otherwise."""

    def __init__(self, enabled: bool, label: str, total: int | None):
        from vit_scale.dist import is_rank0

        self.enabled = enabled and is_rank0()
        self.label, self.total = label, total

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.markup import escape
        from rich.progress import Progress

        self._bar = Progress(transient=True)
        self._bar.start()
        task = self._bar.add_task(escape(self.label), total=self.total)  # a dataset name is not markup
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self._bar.stop()
