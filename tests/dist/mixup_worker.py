"""One process that trains the tiny recipe with the real loop (1 rank) and saves what the model saw: the
input of every forward and its logits, for the mixup test to compare with the unmixed batches."""

import sys
from pathlib import Path

import torch

from vit_scale.config import load_config, validate
from vit_scale.models import build_model
from vit_scale.train.loop import train


def main() -> int:
    config, run_dir, out, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    model = build_model(cfg.model)
    seen = {"inputs": [], "logits": []}
    model.register_forward_pre_hook(lambda m, args: seen["inputs"].append(args[0].detach().clone()))
    model.register_forward_hook(lambda m, args, output: seen["logits"].append(output.detach().clone()))
    train(cfg, Path(run_dir), validate(cfg, 1), model=model)
    torch.save(seen, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
