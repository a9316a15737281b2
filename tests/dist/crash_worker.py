"""Saves checkpoints 1 and 2 of a tiny engine through the real commit protocol on one process, a training
step before each and one after the last (training goes on while a background save is written); run with
VIT_SCALE_CRASH_AT=<point>@2 it is SIGKILLed at that point of the second save. The third argument is
`async` (written in the background, as training saves by default) or `sync`."""

import sys
from pathlib import Path

import torch

from vit_scale.checkpoint import commit
from vit_scale.config import load_config, validate
from vit_scale.models import build_model
from vit_scale.train.engine import build_engine, init_distributed
from vit_scale.train.loop import loss_function, train_step


def main() -> int:
    config, run_dir, mode = sys.argv[1:4]
    cfg = load_config(config, ["train.global_batch=2"])
    init_distributed(cfg)
    engine, _, _ = build_engine(cfg, build_model(cfg.model), validate(cfg, 1), 10)
    size = cfg.model.img_size
    batch = [(torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8), torch.tensor([0, 1]))]
    saver = commit.Saver(engine, Path(run_dir), config={}, background=mode == "async")
    for step in (1, 2):
        train_step(engine, batch, loss_function(cfg), torch.float32)
        trainer = {
            "step": step,
            "samples": 2 * step,
            "skipped_steps": 0,
            "consecutive_skips": 0,
            "wandb_id": None,
        }
        saver.save(step, trainer, {"rng": commit.rng_state(), "data": {}})
    train_step(engine, batch, loss_function(cfg), torch.float32)
    saver.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
