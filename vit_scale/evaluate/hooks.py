"""Evaluation during training, as hooks of the training loop; the commands that train pass them to it.

`eval.every_steps`: top-1 and top-5 (precision@1 for multi-hot labels) on `data.val`, logged as `val/...`.
`eval.fewshot_every_steps`: the few-shot linear probes (`fewshot_metrics`), logged as `fewshot/...`.
"""

from __future__ import annotations

from torch import nn

from vit_scale.config import Config
from vit_scale.dist import rank, world_size
from vit_scale.evaluate.classify import score
from vit_scale.evaluate.fewshot import fewshot_metrics
from vit_scale.train.loop import Hook


def val_metrics(model: nn.Module, cfg: Config) -> dict[str, float]:
    scores = score(model, cfg, {"val": cfg.data.val})["val"]
    return {f"val/{k}": v for k, v in scores.items() if k in ("top1", "top5", "prec1")}


def training_hooks(cfg: Config) -> list[Hook]:
    e = cfg.eval
    hooks = []
    if e.every_steps > 0:
        hooks.append(Hook(e.every_steps, lambda model: val_metrics(model, cfg)))
    if e.fewshot_every_steps > 0:
        hooks.append(
            Hook(e.fewshot_every_steps, lambda model: fewshot_metrics(model, cfg, rank(), world_size()))
        )
    return hooks
