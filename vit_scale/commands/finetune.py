"""`vit-scale finetune CONFIG [key=value ...] [--run-dir DIR] [--nproc N]`: the transfer recipe of
vit_scale.evaluate.finetune, on N local ranks or as one rank of a launcher's job."""

from __future__ import annotations

from pathlib import Path

from vit_scale.commands.args import Parser
from vit_scale.commands.ranks import add_launch_options, run_ranks
from vit_scale.config import Batch, load_config, validate
from vit_scale.dist import is_rank0


def main(argv: list[str]) -> int:
    from vit_scale.evaluate.finetune import primary_metric, run_finetune
    from vit_scale.observe.results import RESULTS

    parser = Parser(
        prog="vit-scale finetune",
        description="Fine-tune pretrained weights on a new task with the paper's recipe (Table 4). Resumes "
        "on its own from the run directory. Exit 0: done; 1: a rank crashed; 2: bad config or input; "
        "75: checkpointed for preemption, requeue me.",
        epilog="example: vit-scale finetune configs/finetune/cifar100_vit_b16.yaml init=runs/pretrain "
        "data.train=shards/cifar100/train data.test=shards/cifar100/test train.steps=500",
    )
    parser.add_argument("config", help="a recipe, e.g. configs/finetune/cifar100_vit_b16.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="section.key=value settings, e.g. init=PATH train.steps=N"
    )
    parser.add_argument("--run-dir", default=None, help="default: runs/<config name>")
    add_launch_options(parser)
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or cfg.run.dir)

    def body(batch: Batch) -> int:
        results = run_finetune(cfg, run_dir, batch)
        if is_rank0():
            (name, scores), *_ = results["datasets"].items()
            print(f"{name}: {results['metric']} {100 * primary_metric(scores):.2f}%; wrote {run_dir / RESULTS}")
        return 0

    return run_ranks("finetune", args, argv, lambda world: validate(cfg, world, "finetune"), body, run_dir)
