"""The `vit-scale` command: parses the subcommand and hands the rest to `vit_scale.commands.<name>`.

Each command module exposes `main(argv: list[str]) -> int`. User errors print one line and exit 2.
"""

from __future__ import annotations

import errno
import importlib
import sys

from vit_scale.errors import UserError

# A full disk, an exceeded quota, a read-only filesystem: one line naming the file, never a traceback.
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)

# subcommand: one-line help (its module is vit_scale.commands.<subcommand>)
COMMANDS = {
    "models": "print the ViT variants table (layers, width, params, GFLOPs)",
    "shards": "build, merge, verify and inspect WebDataset tar shards",
    "pretrain": "pretrain a ViT with DeepSpeed ZeRO from shards",
    "finetune": "fine-tune pretrained weights on a new task",
    "eval": "top-1/top-5 accuracy of weights on a shard set",
    "fewshot": "few-shot linear evaluation of frozen representations",
    "vtab": "fine-tune and evaluate on the 19 VTAB-1k tasks",
    "export": "consolidate a checkpoint into a timm / HF Hub folder",
    "slurm": "render and submit sbatch jobs",
    "report": "render plots and an HTML page from run directories",
    "inspect": "draw position-embedding and attention pictures",
    "demo": "the whole system on embedded data: pretrain, transfer, report",
    "plan": "memory, speed and cost of a config on a GPU cluster, and the largest fit",
    "ops": "build DeepSpeed's JIT ops once for this environment",
}


def usage() -> str:
    lines = ["usage: vit-scale COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, help_ in COMMANDS.items()]
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
    module = importlib.import_module(f"vit_scale.commands.{name}")
    try:
        return int(module.main(rest) or 0)
    except UserError as e:
        print(f"vit-scale {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        # The environment's failures that no part of the command turned into a message of its own.
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        from vit_scale.io import free_bytes, human_bytes

        where = e.filename or "a file the command writes"
        free = free_bytes(e.filename or ".")
        there = f" ({human_bytes(free)} free {'there' if e.filename else 'in the current directory'})"
        print(
            f"vit-scale {name}: error: {e.strerror}: {where}{there if free is not None else ''}",
            file=sys.stderr,
        )
        return UserError.exit_code
    except KeyboardInterrupt:
        print(f"vit-scale {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
