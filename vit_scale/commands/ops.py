"""`vit-scale ops build [NAME ...]`: build DeepSpeed's JIT ops once for this environment (see vit_scale.train.ops)."""

from __future__ import annotations

import argparse

from vit_scale.errors import UserError
from vit_scale.train import ops


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="vit-scale ops",
        description="Build DeepSpeed's JIT-compiled ops into this environment's torch_extensions/ (or "
        "TORCH_EXTENSIONS_DIR when set), so no start of a run builds or waits on them. `make` runs it at install.",
    )
    p.add_argument("action", choices=("build",))
    p.add_argument("names", nargs="*", help=f"ops to build: {', '.join(sorted(ops.OPS))} (default: all)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.names) - set(ops.OPS))
    if unknown:
        raise UserError(f"unknown op {unknown[0]!r}; vit-scale loads {', '.join(sorted(ops.OPS))}")
    built = ops.build(args.names or tuple(ops.OPS))
    for name, where in built:
        print(f"vit-scale ops: {name} ready in {where}")
    if not built:
        print(
            "vit-scale ops: nothing to build (this accelerator needs none, or DeepSpeed was installed with them)"
        )
    return 0
