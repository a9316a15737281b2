"""VTAB-1k: fine-tune on each of the 19 tasks and report them with the group and overall means.

Data layout: one shard directory per task and split, as `vit-scale shards build --format vtab`
writes them:

    ROOT/<task>/train800val200/   the 1,000 training examples (the final run)
    ROOT/<task>/test/             the full test split (reported)
    ROOT/<task>/train800/, ROOT/<task>/val200/   only for `--sweep` (learning rate chosen on val200)

The commands that run it are in vit_scale.commands.vtab (`vit-scale vtab --help`).
"""

from __future__ import annotations

import copy
from pathlib import Path

from vit_scale.config import Batch, Config, ConfigError
from vit_scale.config.tasks import ALIASES, GROUPS
from vit_scale.config.tasks import VTAB_TASKS as TASKS
from vit_scale.dist import on_rank0
from vit_scale.errors import UserError
from vit_scale.observe.results import RESULTS, read_results, write_results


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
    """The fine-tune config of one task: its splits, its class count (from index.json when given), and its
    name, so that validation applies the task's augmentation rules (vit_scale.config.tasks)."""
    from vit_scale.config.validate import index_classes

    cfg = copy.deepcopy(base)
    d = Path(root) / task
    for split in ("train800val200", "test") + (("train800", "val200") if sweep else ()):
        if not (d / split).is_dir():
            raise UserError(
                f"VTAB task {task} lacks {d / split}; build it with `vit-scale shards build --format vtab`"
            )
    cfg.model.num_classes = index_classes(str(d / "test")) or TASKS[task][1]
    cfg.data.task = task
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


def check_tasks(
    base: Config, root: str, tasks: list[str], sweep: bool, world_size: int, cuda: bool | None = None
) -> Batch:
    """The validation pass for every task's fine-tune config, before any task runs or is queued; the batch
    split they share (the tasks differ in data and classes only). `cuda` as for `validate`."""
    from vit_scale.config import validate

    if not root:
        raise ConfigError("name the VTAB-1k data: --data ROOT (or eval.vtab_data=ROOT)")
    if not base.init:
        raise ConfigError("name the pretrained weights: vit-scale vtab WEIGHTS ... (or init=WEIGHTS)")
    configs = [task_config(base, root, task, sweep) for task in tasks]
    batches = {validate(c, world_size, "finetune", cuda=cuda) for c in configs}
    return batches.pop()


def run_task(
    base: Config, root: str, task: str, run_dir: str | Path, sweep: bool, label: str, batch: Batch
) -> dict:
    from vit_scale.evaluate.finetune import run_finetune

    # The task's results row is named after ROOT/<task>/test, i.e. the task.
    return run_finetune(task_config(base, root, task, sweep), run_dir, batch, label=label)


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
