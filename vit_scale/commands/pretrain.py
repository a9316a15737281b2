"""`vit-scale pretrain CONFIG [key=value ...] [--run-dir DIR] [--nproc N]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from vit_scale.commands.args import Parser
from vit_scale.commands.ranks import add_launch_options, run_ranks
from vit_scale.config import Batch, load_config, save_config, validate
from vit_scale.dist import on_rank0


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="vit-scale pretrain",
        description="Pretrain a ViT with DeepSpeed ZeRO from shards. Resumes on its own from the run "
        "directory's last committed checkpoint. Exit 0: done; 1: a rank crashed; 2: bad config or input; "
        "75: checkpointed for preemption or the job's time limit, requeue me.",
    )
    p.add_argument("config", help="recipe YAML, e.g. configs/pretrain/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value settings on top of the recipe")
    p.add_argument("--run-dir", help="where checkpoints and metrics go (default: run.dir, else runs/<name>)")
    add_launch_options(p)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or cfg.run.dir)
    cfg.run.dir = str(run_dir)

    def body(batch: Batch) -> int:
        # DeepSpeed loads here, after the checks and the lock: a refused run fails at once.
        from vit_scale.evaluate.hooks import training_hooks
        from vit_scale.train.loop import train

        on_rank0(save_config, cfg, run_dir / "config.yaml")
        train(cfg, run_dir, batch, hooks=training_hooks(cfg))
        return 0

    return run_ranks("pretrain", args, argv, lambda world: validate(cfg, world), body, run_dir)
