"""One process that loads a checkpoint written by 2 ranks the way the loop does (`commit.load`), then prints
what it holds as JSON: whether the weights equal the consolidated fp32 weights of the checkpoint, the Adam
step count, and the sum of the second moments against the sum over the checkpoint's own ZeRO shards."""

import json
import sys
from pathlib import Path

import torch

from vit_scale.checkpoint import commit, load_consolidated_state_dict
from vit_scale.config import load_config, validate
from vit_scale.models import build_model
from vit_scale.train.engine import build_engine, init_distributed


def main() -> int:
    config, ckpt, scratch, *overrides = sys.argv[1:]
    ckpt = Path(ckpt)
    cfg = load_config(config, overrides)
    init_distributed(cfg)
    engine, _, scheduler = build_engine(cfg, build_model(cfg.model), validate(cfg, 1), cfg.train.steps)
    saved, own = commit.load(engine, ckpt, scratch=Path(scratch))
    want = load_consolidated_state_dict(ckpt)[0]
    got = engine.module.state_dict()
    state = [s for s in engine.optimizer.optimizer.state.values()]
    shards = [
        torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
        for f in sorted(ckpt.glob("zero_pp_rank_*_optim_states.pt"))
    ]
    print(
        json.dumps(
            {
                "own": own,
                "step": saved["step"],
                "scheduler_epoch": scheduler.last_epoch,
                "weights_equal": sorted(want) == sorted(k for k in got if k in want)
                and all(torch.equal(got[k], want[k]) for k in want),
                "adam_steps": sorted({int(s["step"]) for s in state}),
                "exp_avg_sq_sum": sum(float(s["exp_avg_sq"].double().sum()) for s in state),
                "shards_exp_avg_sq_sum": sum(
                    float(s["exp_avg_sq"].double().sum()) for shard in shards for s in shard["state"].values()
                ),
                "scratch_left": sorted(p.name for p in Path(scratch).iterdir()),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
