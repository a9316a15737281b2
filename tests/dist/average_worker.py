"""One process that trains the tiny recipe with Polyak averaging through the real loop and saves what
evaluation got: the weights of the module each hook was given (every 2nd step) and of the module `train`
hands back for the scoring after training."""

import sys
from pathlib import Path

import torch

from vit_scale.config import load_config, validate
from vit_scale.train.loop import Hook, train


def main() -> int:
    config, run_dir, out, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    batch = validate(cfg, 1)
    seen = []

    def capture(model):
        seen.append({k: v.detach().float().clone() for k, v in model.state_dict().items()})
        return {}

    summary = train(cfg, Path(run_dir), batch, hooks=[Hook(2, capture)])
    final = {k: v.detach().float().clone() for k, v in summary["model"].state_dict().items()}
    torch.save({"hooks": seen, "final": final}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
