"""`vit-scale export CKPT --out DIR`: a checkpoint (any ZeRO stage) as a timm / Hugging Face Hub folder."""

from __future__ import annotations

from vit_scale.checkpoint.export import export
from vit_scale.commands.args import Parser
from vit_scale.io import writable_dir


def main(argv: list[str]) -> int:
    p = Parser(
        prog="vit-scale export",
        description="Consolidate a checkpoint (any ZeRO stage) into a timm / Hugging Face Hub model folder.",
    )
    p.add_argument(
        "ckpt", help="a run directory (its newest committed checkpoint) or one checkpoint directory"
    )
    p.add_argument("--out", required=True, help="folder to write config.json and model.safetensors into")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument(
        "--raw",
        action="store_true",
        help="with Polyak averaging (optim.ema_decay): the trained parameters instead of their average",
    )
    args = p.parse_args(argv)
    out = export(args.ckpt, writable_dir(args.out, "--out"), args.dtype, averaged=not args.raw)
    print(f"vit-scale export: wrote {out / 'model.safetensors'} and {out / 'config.json'}")
    return 0
