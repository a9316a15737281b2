"""`vit-scale vtab`: fine-tune and evaluate on the VTAB-1k tasks (vit_scale.evaluate.vtab).

Commands:

    vit-scale vtab WEIGHTS --data ROOT [--tasks a,b] [--sweep] [key=value ...]   every task, then the table
    vit-scale vtab WEIGHTS --data ROOT --task-index I --run-dir RUN               one task (RUN/<task>)
    vit-scale vtab CONFIG init=WEIGHTS eval.vtab_data=ROOT --task NAME --run-dir RUN/NAME   (SLURM array)
    vit-scale vtab WEIGHTS --collect --run-dir RUN                                the table from RUN/<task>/

The recipe is configs/vtab/vtab1k.yaml (the paper's single setting: lr 0.01, 2,500 steps, 384 px);
`--config` or a .yaml first argument replaces it. With `--task` the run directory is the task's own;
otherwise tasks run in RUN/<task>/ and RUN/results.json + RUN/results.md hold the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vit_scale.commands.args import Parser, at_least
from vit_scale.commands.ranks import add_launch_options, run_lock, run_ranks, writer_lock
from vit_scale.config import Batch, Config, load_config
from vit_scale.dist import is_rank0
from vit_scale.errors import UserError
from vit_scale.evaluate.vtab import check_tasks, collect, run_task, select_tasks, task_name
from vit_scale.observe.results import RESULTS, weights_label

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "vtab" / "vtab1k.yaml"


def _split_positional(first: str, overrides: list[str]) -> tuple[str | None, list[str]]:
    """WEIGHTS, or a .yaml recipe with init=WEIGHTS among the overrides (the SLURM template's form)."""
    if first.endswith((".yaml", ".yml")):
        return first, overrides
    return None, [f"init={first}", *overrides]


def main(argv: list[str]) -> int:
    parser = Parser(
        prog="vit-scale vtab",
        description="Fine-tune and evaluate on the VTAB-1k tasks; write one table.",
        epilog=__doc__.split("Commands:")[1].split("The recipe")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("weights", help="pretrained weights (or a .yaml recipe with init=WEIGHTS)")
    parser.add_argument("overrides", nargs="*", help="section.key=value settings, e.g. train.steps=100")
    parser.add_argument("--data", default=None, help="VTAB-1k root with ROOT/<task>/<split>/ shards")
    parser.add_argument(
        "--config",
        default=None,
        help=f"recipe (default {DEFAULT_RECIPE.relative_to(DEFAULT_RECIPE.parents[2])})",
    )
    parser.add_argument(
        "--tasks", default=None, help="comma-separated task names (default: every task under --data)"
    )
    one = parser.add_mutually_exclusive_group()
    one.add_argument("--task", default=None, help="run this one task only (its run dir is --run-dir)")
    one.add_argument(
        "--task-index", type=at_least(0), default=None, help="run the I-th selected task only (SLURM arrays)"
    )
    one.add_argument("--collect", action="store_true", help="only write the table from finished tasks")
    parser.add_argument(
        "--sweep", action="store_true", help="pick the lr on val200 from sweep.lr before the final run"
    )
    parser.add_argument("--run-dir", default=None, help="default runs/vtab_<weights>")
    add_launch_options(parser)
    args = parser.parse_intermixed_args(argv)

    recipe, overrides = _split_positional(args.weights, args.overrides)
    if args.data:
        overrides = [*overrides, f"eval.vtab_data={args.data}"]
    cfg = load_config(args.config or recipe or DEFAULT_RECIPE, overrides)
    label = weights_label(cfg.init) if cfg.init else "weights"
    default_dir = Path("runs") / f"vtab_{label}"
    run_dir = Path(args.run_dir or (cfg.run.dir if recipe or args.config else default_dir))
    if args.collect:
        collect(run_dir, label)
        print(f"wrote {run_dir / RESULTS}")
        return 0
    root = cfg.eval.vtab_data
    # An unknown task name is refused before any process starts; the rest of the checks are check_tasks'.
    tasks = [task_name(args.task)] if args.task else select_tasks(root, args.tasks)

    def check(world: int) -> Batch:
        batch = check_tasks(cfg, root, tasks, args.sweep, world)
        if is_rank0():  # a task in use fails the whole run now, not after the tasks before it
            for task_dir in _task_dirs(args, tasks, run_dir):
                run_lock(task_dir).check_free()
        return batch

    return run_ranks(
        "vtab", args, argv, check, lambda batch: _run_tasks(cfg, args, root, tasks, run_dir, label, batch)
    )


def _task_dirs(args, tasks: list[str], run_dir: Path) -> list[Path]:
    """Where each selected task trains: the run directory itself with --task, else RUN/<task>."""
    if args.task:
        return [run_dir]
    if args.task_index is not None and 0 <= args.task_index < len(tasks):
        return [run_dir / tasks[args.task_index]]
    return [run_dir / task for task in tasks]


def _run_tasks(cfg: Config, args, root: str, tasks: list[str], run_dir: Path, label: str, batch: Batch) -> int:
    # Each task's directory has its writer lock while it trains: array tasks of one RUN run side by side,
    # and a second run of the same task fails at once.
    if args.task:
        with writer_lock(run_dir):
            res = run_task(cfg, root, args.task, run_dir, args.sweep, label, batch)
        _print_task(args.task, res)
        return 0
    if args.task_index is not None:
        if not 0 <= args.task_index < len(tasks):
            raise UserError(
                f"--task-index {args.task_index} is outside the {len(tasks)} selected tasks (0..{len(tasks) - 1})"
            )
        tasks = [tasks[args.task_index]]
    for task in tasks:
        with writer_lock(run_dir / task):
            res = run_task(cfg, root, task, run_dir / task, args.sweep, label, batch)
        _print_task(task, res)
    if args.task_index is None:
        results = collect(run_dir, label)
        if is_rank0():
            mean = next(reversed(results["summary"].items()))
            print(f"{mean[0]}: {100 * mean[1]['top1']:.2f}%; wrote {run_dir / RESULTS}")
    return 0


def _print_task(task: str, res: dict) -> None:
    if is_rank0():
        scores = next(iter(res["datasets"].values()))
        print(f"{task}: top-1 {100 * scores.get('top1', scores.get('prec1', 0.0)):.2f}%")
