"""The `vit-scale` command: parses the subcommand and hands the rest to the module that owns it.

Each owning module exposes `main(argv: list[str]) -> int`. User errors print one line and exit 2.
"""

from __future__ import annotations

import importlib
import sys

from vit_scale.errors import UserError

# subcommand: (module with main(argv), one-line help)
COMMANDS = {
    "models": ("vit_scale.models.cli", "print the ViT variants table (layers, width, params, GFLOPs)"),
    "shards": ("vit_scale.data.cli", "build, merge, verify and inspect WebDataset tar shards"),
    "pretrain": ("vit_scale.train.cli", "pretrain a ViT with DeepSpeed ZeRO from shards"),
    "finetune": ("vit_scale.evaluate.finetune", "fine-tune pretrained weights on a new task"),
    "eval": ("vit_scale.evaluate.classify", "top-1/top-5 accuracy of weights on a shard set"),
    "fewshot": ("vit_scale.evaluate.fewshot", "few-shot linear evaluation of frozen representations"),
    "vtab": ("vit_scale.evaluate.vtab", "fine-tune and evaluate on the 19 VTAB-1k tasks"),
    "export": ("vit_scale.checkpoint.export", "consolidate a checkpoint into a timm / HF Hub folder"),
    "slurm": ("launch.slurm", "render and submit sbatch jobs"),
    "plan": ("vit_scale.commands.plan", "memory, speed and cost of a configuration on a cluster, and --fit"),
    "report": ("vit_scale.observe.report", "render plots and an HTML page from run directories"),
    "inspect": ("vit_scale.observe.inspect", "draw position-embedding and attention pictures"),
    "demo": ("vit_scale.demo", "the whole system on embedded data: pretrain, transfer, report"),
}


def usage() -> str:
    lines = ["usage: vit-scale COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`vit-scale COMMAND --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vit-scale: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        print(f"vit-scale {name}: not available yet (its issue has not landed)", file=sys.stderr)
        return 2
    try:
        return int(module.main(rest) or 0)
    except UserError as e:
        print(f"vit-scale {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"vit-scale {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
