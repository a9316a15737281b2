"""Evaluation during training, as hooks of the training loop; the commands that train pass them to it.

`eval.fewshot_every_steps`: the few-shot linear probes (`fewshot_metrics`), logged as `fewshot/...`.
"""

from __future__ import annotations

from vit_scale.config import Config
from vit_scale.dist import rank, world_size
from vit_scale.evaluate.fewshot import fewshot_metrics
from vit_scale.train.loop import Hook


def training_hooks(cfg: Config) -> list[Hook]:
    e = cfg.eval
    hooks = []
    if e.fewshot_every_steps > 0:
        hooks.append(
            Hook(e.fewshot_every_steps, lambda model: fewshot_metrics(model, cfg, rank(), world_size()))
        )
    return hooks
