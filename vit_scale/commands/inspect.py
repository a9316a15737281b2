"""`vit-scale inspect WEIGHTS`: position-embedding and attention pictures."""

from __future__ import annotations

from pathlib import Path

from vit_scale.commands.args import Parser
from vit_scale.io import writable_dir
from vit_scale.observe import inspect as pictures


def main(argv: list[str]) -> int:
    p = Parser(prog="vit-scale inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("weights", help="run or checkpoint directory, export folder, .safetensors, .pth or .npz")
    p.add_argument("--images", nargs="+", default=[], metavar="IMG", help="images for attention rollout")
    p.add_argument("--out", help="output directory (default: inspect/ beside the weights)")
    args = p.parse_args(argv)
    weights = Path(args.weights)
    out = Path(args.out) if args.out else (weights if weights.is_dir() else weights.parent) / "inspect"
    writable_dir(out, "--out")
    written, _ = pictures.inspect(args.weights, out, args.images)
    print(f"wrote {', '.join(str(w) for w in written.values())}")
    if not args.images:
        print("no --images given: attention distances are over noise images and there is no rollout picture")
    return 0
