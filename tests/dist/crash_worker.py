"""Saves checkpoints 1 and 2 of a tiny engine through the real commit protocol on one process; run with
VIT_SCALE_CRASH_AT=<point>@2 it is SIGKILLed at that write point of the second save."""

import sys
from pathlib import Path

from vit_scale.checkpoint import commit
from vit_scale.config import load_config, validate
from vit_scale.models import build_model
from vit_scale.train.engine import build_engine, init_distributed


def main() -> int:
    config, run_dir = sys.argv[1:3]
    cfg = load_config(config, ["train.global_batch=2"])
    init_distributed(cfg)
    engine, _, _ = build_engine(cfg, build_model(cfg.model), validate(cfg, 1), 10)
    for step in (1, 2):
        trainer = {
            "step": step,
            "samples": 2 * step,
            "skipped_steps": 0,
            "consecutive_skips": 0,
            "wandb_id": None,
        }
        commit.save(engine, Path(run_dir), step, trainer, {"rng": commit.rng_state(), "data": {}}, config={})
    return 0


if __name__ == "__main__":
    sys.exit(main())
