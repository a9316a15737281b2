"""VTAB-1k: fine-tune on each of the 19 tasks and report them with the group and overall means.

Data layout: one shard directory per task and split, as `vit-scale shards build --format vtab`
writes them:

    ROOT/<task>/train800val200/   the 1,000 training examples (the final run)
    ROOT/<task>/test/             the full test split (reported)
    ROOT/<task>/train800/, ROOT/<task>/val200/   only for `--sweep` (learning rate chosen on val200)

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
import copy
from pathlib import Path

from vit_scale.config import Config, ConfigError, load_config
from vit_scale.dist import is_rank0, on_rank0
from vit_scale.errors import UserError
from vit_scale.evaluate.results import RESULTS, read_results, weights_label, write_results

# The paper's 19 tasks (Appendix, VTAB-1k): group and number of classes.
TASKS: dict[str, tuple[str, int]] = {
    "caltech101": ("Natural", 102),
    "cifar100": ("Natural", 100),
    "dtd": ("Natural", 47),
    "oxford_flowers102": ("Natural", 102),
    "oxford_iiit_pet": ("Natural", 37),
    "sun397": ("Natural", 397),
    "svhn": ("Natural", 10),
    "patch_camelyon": ("Specialized", 2),
    "eurosat": ("Specialized", 10),
    "resisc45": ("Specialized", 45),
    "diabetic_retinopathy": ("Specialized", 5),
    "clevr_count": ("Structured", 8),
    "clevr_dist": ("Structured", 6),
    "dmlab": ("Structured", 6),
    "dsprites_loc": ("Structured", 16),
    "dsprites_ori": ("Structured", 16),
    "kitti_dist": ("Structured", 4),
    "smallnorb_azi": ("Structured", 18),
    "smallnorb_ele": ("Structured", 9),
}
GROUPS = ("Natural", "Specialized", "Structured")
ALIASES = {
    "smallnorb_elev": "smallnorb_ele",
    "oxford_pet": "oxford_iiit_pet",
    "flowers102": "oxford_flowers102",
}
DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "configs" / "vtab" / "vtab1k.yaml"


def task_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise UserError(f"unknown VTAB-1k task {name!r}; the 19 tasks are: {', '.join(TASKS)}")
    return name


def select_tasks(root: str | None, names: str | None) -> list[str]:
    """The tasks to run, in the paper's order: those named, else every task present under `root`."""
    if names:
        chosen = {task_name(n.strip()) for n in names.split(",") if n.strip()}
        return [t for t in TASKS if t in chosen]
    if not root:
        return list(TASKS)
    present = [t for t in TASKS if (Path(root) / t).is_dir()]
    if not present:
        raise UserError(
            f"{root} holds no VTAB-1k task directories (expected ROOT/<task>/<split>/, e.g. ROOT/svhn/test)"
        )
    return present


def task_config(base: Config, root: str, task: str, sweep: bool) -> Config:
    """The fine-tune config of one task: its splits, and its class count (from index.json when given)."""
    from vit_scale.evaluate.finetune import _index_classes

    cfg = copy.deepcopy(base)
    d = Path(root) / task
    for split in ("train800val200", "test") + (("train800", "val200") if sweep else ()):
        if not (d / split).is_dir():
            raise UserError(
                f"VTAB task {task} lacks {d / split}; build it with `vit-scale shards build --format vtab`"
            )
    cfg.model.num_classes = _index_classes(str(d / "test")) or TASKS[task][1]
    cfg.data.test = str(d / "test")
    if sweep:
        cfg.sweep.lr = cfg.sweep.lr or [0.001, 0.003, 0.01, 0.03]
        cfg.data.train, cfg.data.val = str(d / "train800"), str(d / "val200")
        cfg.sweep.final_train = str(d / "train800val200")
    else:
        cfg.sweep.lr = []
        cfg.data.train, cfg.data.val = str(d / "train800val200"), ""
    cfg.run.name = f"{base.run.name}-{task}"
    return cfg


def run_task(base: Config, root: str, task: str, run_dir: str | Path, sweep: bool, label: str) -> dict:
    from vit_scale.evaluate.finetune import run_finetune

    # The task's results row is named after ROOT/<task>/test, i.e. the task.
    return run_finetune(task_config(base, root, task, sweep), run_dir, label=label)


def summarise(per_task: dict[str, dict], label: str, metric: str = "top1") -> dict:
    """The table: tasks in the paper's order, then the group means and the mean over all tasks."""
    datasets = {t: per_task[t] for t in TASKS if t in per_task}
    summary = {}
    for group in GROUPS:
        members = [t for t in datasets if TASKS[t][0] == group]
        if members:
            total = sum(1 for t in TASKS if TASKS[t][0] == group)
            name = f"{group} ({len(members)}/{total} tasks)" if len(members) < total else f"{group} mean"
            summary[name] = {metric: sum(datasets[t][metric] for t in members) / len(members)}
    if datasets:
        n = len(datasets)
        name = f"VTAB mean ({n}/19 tasks)" if n < len(TASKS) else "VTAB mean (19 tasks)"
        summary[name] = {metric: sum(v[metric] for v in datasets.values()) / n}
    return {
        "kind": "vtab",
        "model": label,
        "metric": metric,
        "datasets": datasets,
        "summary": summary,
        "details": {"tasks": len(datasets), "missing": [t for t in TASKS if t not in datasets]},
    }


def collect(run_dir: str | Path, label: str | None = None) -> dict:
    """Write RUN/results.json + results.md from the finished tasks in RUN/<task>/."""
    run_dir = Path(run_dir)
    per_task, names = {}, set()
    for task in TASKS:
        # An array task may have been started under an alias (its directory keeps that name).
        dirs = [run_dir / name for name in (task, *(a for a, t in ALIASES.items() if t == task))]
        done = next((d for d in dirs if (d / RESULTS).is_file()), None)
        if done is not None:
            res = read_results(done)
            per_task[task] = next(iter(res["datasets"].values()))
            names.add(res["model"])
    if not per_task:
        raise UserError(f"no finished VTAB tasks under {run_dir} (looked for {run_dir}/<task>/{RESULTS})")
    results = summarise(per_task, label or (names.pop() if len(names) == 1 else run_dir.name))
    on_rank0(write_results, run_dir, results)
    return results


def _split_positional(first: str, overrides: list[str]) -> tuple[str | None, list[str]]:
    """WEIGHTS, or a .yaml recipe with init=WEIGHTS among the overrides (the SLURM template's form)."""
    if first.endswith((".yaml", ".yml")):
        return first, overrides
    return None, [f"init={first}", *overrides]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
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
        "--task-index", type=int, default=None, help="run the I-th selected task only (SLURM arrays)"
    )
    one.add_argument("--collect", action="store_true", help="only write the table from finished tasks")
    parser.add_argument(
        "--sweep", action="store_true", help="pick the lr on val200 from sweep.lr before the final run"
    )
    parser.add_argument("--run-dir", default=None, help="default runs/vtab_<weights>")
    parser.add_argument(
        "--nproc", type=int, help="start this many local processes (not under torchrun / srun)"
    )
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
    if not root:
        raise ConfigError("name the VTAB-1k data: --data ROOT (or eval.vtab_data=ROOT)")
    if not cfg.init:
        raise ConfigError("name the pretrained weights: vit-scale vtab WEIGHTS ... (or init=WEIGHTS)")
    if args.task:
        args.task = task_name(args.task)  # refuse an unknown name before any process starts
    from vit_scale.evaluate.finetune import launch_or_run

    rank_argv = _without_nproc(argv)
    return launch_or_run(
        "vtab",
        args,
        rank_argv,
        lambda: _check_tasks(cfg, args, root),
        lambda: _run_tasks(cfg, args, root, run_dir, label),
    )


def _check_tasks(cfg: Config, args, root: str) -> None:
    from vit_scale.evaluate.finetune import check_finetune_config

    for task in [args.task] if args.task else select_tasks(root, args.tasks):
        check_finetune_config(task_config(cfg, root, task, args.sweep))


def _run_tasks(cfg: Config, args, root: str, run_dir: Path, label: str) -> int:
    if args.task:
        res = run_task(cfg, root, args.task, run_dir, args.sweep, label)
        _print_task(args.task, res)
        return 0
    tasks = select_tasks(root, args.tasks)
    if args.task_index is not None:
        if not 0 <= args.task_index < len(tasks):
            raise UserError(
                f"--task-index {args.task_index} is outside the {len(tasks)} selected tasks (0..{len(tasks) - 1})"
            )
        tasks = [tasks[args.task_index]]
    for task in tasks:
        res = run_task(cfg, root, task, run_dir / task, args.sweep, label)
        _print_task(task, res)
    if args.task_index is None:
        results = collect(run_dir, label)
        if is_rank0():
            mean = next(reversed(results["summary"].items()))
            print(f"{mean[0]}: {100 * mean[1]['top1']:.2f}%; wrote {run_dir / RESULTS}")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _print_task(task: str, res: dict) -> None:
    if is_rank0():
        scores = next(iter(res["datasets"].values()))
        print(f"{task}: top-1 {100 * scores.get('top1', scores.get('prec1', 0.0)):.2f}%")
