"""`vit-scale pretrain CONFIG [key=value ...] [--run-dir DIR] [--nproc N]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from vit_scale.config import load_config, save_config, validate
from vit_scale.errors import UserError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vit-scale pretrain",
        description="Pretrain a ViT with DeepSpeed ZeRO from shards. Resumes on its own from the run "
        "directory's last committed checkpoint. Exit 0: done; 2: bad config or input; 75: checkpointed "
        "for preemption or the job's time limit, requeue me.",
    )
    p.add_argument("config", help="recipe YAML, e.g. configs/pretrain/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value settings on top of the recipe")
    p.add_argument("--run-dir", help="where checkpoints and metrics go (default: run.dir, else runs/<name>)")
    p.add_argument("--nproc", type=int, help="start this many local processes (not under torchrun / srun)")
    p.add_argument("--max-restarts", type=int, default=3, help="with --nproc: restarts of a failed group")
    return p


def main(argv: list[str]) -> int:
    from launch import env

    args = parser().parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or cfg.run.dir)
    cfg.run.dir = str(run_dir)
    if args.nproc is not None and not env.under_launcher():
        if args.nproc < 1:
            raise UserError(f"--nproc must be at least 1, got {args.nproc}")
        validate(cfg, args.nproc)  # refuse before any process starts
        save_config(cfg, run_dir / "config.yaml")
        from launch.local import run

        rank_argv = [args.config, *args.overrides, "--run-dir", str(run_dir)]
        return run(args.nproc, ["pretrain", *rank_argv], max_restarts=args.max_restarts)
    world = env.apply()
    validate(cfg, world)
    from vit_scale.dist import on_rank0
    from vit_scale.evaluate.hooks import training_hooks
    from vit_scale.train.loop import train
    from vit_scale.train.preempt import Preempted

    on_rank0(save_config, cfg, run_dir / "config.yaml")
    try:
        train(cfg, run_dir, hooks=training_hooks(cfg))
    except Preempted as e:
        on_rank0(print, f"vit-scale pretrain: {e}")
        return e.exit_code
    return 0
