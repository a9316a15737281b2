"""The one way a command that trains starts: N local ranks (`--nproc N`), or this process as one rank of
a launcher's job (torchrun, the deepspeed launcher, an srun task, or a plain single process).

The settings are validated for the world size before any rank starts, and again by every rank for the
world it finds; a run that checkpointed for preemption or its time limit exits with REQUEUE_EXIT_CODE.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from launch import env, local
from vit_scale.checkpoint.lock import RunLock
from vit_scale.commands.args import at_least
from vit_scale.dist import is_rank0, on_rank0
from vit_scale.errors import UserError
from vit_scale.train.preempt import REQUEUE_EXIT_CODE, Preempted

Checked = TypeVar("Checked")
LAUNCH_OPTIONS = ("--nproc", "--max-restarts")


def add_launch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=at_least(1), help="start this many local processes (not under torchrun / srun)")
    parser.add_argument(
        "--max-restarts", type=at_least(0), default=3, help="with --nproc: restarts of a group whose rank crashed"
    )


def rank_argv(argv: list[str]) -> list[str]:
    """The command line each started rank runs: this one without the options that start ranks."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_OPTIONS:
            skip = True
        elif not a.startswith(tuple(f"{o}=" for o in LAUNCH_OPTIONS)):
            out.append(a)
    return out


def start_local(command: str, nproc: int, argv: list[str], *, max_restarts: int) -> int:
    """`vit-scale COMMAND ARGV` as `nproc` local ranks; its exit status. A user error or a requeue request
    of a rank ends the group at once: a restart would only repeat it."""
    return local.run(
        nproc, [command, *argv], max_restarts=max_restarts, final_exit_codes=(REQUEUE_EXIT_CODE, UserError.exit_code)
    )


def run_lock(run_dir: str | os.PathLike) -> RunLock:
    """The writer lock of a run directory, judging other holders' SLURM jobs through squeue."""
    return RunLock(run_dir, job_alive=env.job_running)


def writer_lock(run_dir: str | os.PathLike | None) -> contextlib.AbstractContextManager:
    """Held by rank 0 around a run's work: a second run on the same directory fails at once, naming this
    one. Other ranks write only after collectives with rank 0, so they need no lock of their own."""
    if run_dir is None or not is_rank0():
        return contextlib.nullcontext()
    return run_lock(run_dir)


def run_ranks(
    command: str,
    args: argparse.Namespace,
    argv: list[str],
    check: Callable[[int], Checked],
    body: Callable[[Checked], int],
    run_dir: Path | None = None,
) -> int:
    """With `--nproc N` outside a launcher: `check(N)`, then N local ranks each running `vit-scale COMMAND
    ARGV` (restarted after a crash up to --max-restarts times). Otherwise this process is one rank:
    `body(check(world_size))`, with rank 0 holding `run_dir`'s writer lock when one is given."""
    if args.nproc is not None and not env.under_launcher():
        check(args.nproc)  # refuse before any process starts
        if run_dir is not None:
            run_lock(run_dir).check_free()
        return start_local(command, args.nproc, rank_argv(argv), max_restarts=args.max_restarts)
    checked = check(env.apply())
    try:
        with writer_lock(run_dir):
            return int(body(checked) or 0)
    except Preempted as e:
        on_rank0(print, f"vit-scale {command}: {e}")
        return e.exit_code
