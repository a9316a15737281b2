"""`vit-scale models [--json]`: the variants table."""

from __future__ import annotations

import json

from vit_scale.commands.args import Parser
from vit_scale.models.vit import variants_table


def main(argv: list[str]) -> int:
    parser = Parser(prog="vit-scale models", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects")
    args = parser.parse_args(argv)
    rows = variants_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = f"{'name':<8} {'layers':>6} {'width':>6} {'mlp':>6} {'heads':>5} {'patch':>5} {'params':>9} {'train GFLOPs@224':>17}"
    print(header)
    for r in rows:
        print(
            f"{r['name']:<8} {r['layers']:>6} {r['width']:>6} {r['mlp']:>6} {r['heads']:>5} {r['patch']:>5}"
            f" {r['params'] / 1e6:>8.1f}M {r['train_gflops_224']:>17.1f}"
        )
    print("params exclude the classification head; training FLOPs = 3 × forward, all matmuls incl. attention")
    return 0
