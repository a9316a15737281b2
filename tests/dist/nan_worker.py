"""One rank of the non-finite test, started by torchrun: the tiny recipe's model, whose output rank 1 turns
into NaN at step 3 and at every step from 8 on, trained by the real loop. Exits 2 with the loop's message."""

import sys
from pathlib import Path

from vit_scale.config import load_config, validate
from vit_scale.dist import rank, world_size
from vit_scale.errors import UserError
from vit_scale.models import build_model
from vit_scale.train.loop import train

BAD_STEPS = {3} | set(range(8, 100))


def main() -> int:
    config, run_dir, *overrides = sys.argv[1:]
    cfg = load_config(config, overrides)
    model = build_model(cfg.model)
    calls = [0]

    def poison(module, inputs, output):
        calls[0] += 1  # one forward per step: the tiny recipe has no gradient accumulation
        return output * float("nan") if rank() == 1 and calls[0] in BAD_STEPS else output

    model.register_forward_hook(poison)
    try:
        train(cfg, Path(run_dir), validate(cfg, world_size()), model=model)
    except UserError as e:
        print(f"rank {rank()}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
