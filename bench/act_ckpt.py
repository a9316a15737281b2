"""Activation checkpointing on vs off: peak memory and images/s of our training step, in one run.

    python bench/act_ckpt.py [--variant vit_b16 --img 224 --batch 4 --steps 3]

Each setting runs in a fresh process (one rank, the real DeepSpeed engine, ZeRO-1, fp32 on CPU or bf16
on a GPU) so its peak memory is its own: the process's peak resident set on CPU, peak allocated GPU memory
on a GPU. Both include weights, gradients and optimizer state, which are the same in both rows; the
difference is the activations kept for backward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(args) -> dict:
    import torch

    from vit_scale.config import Config, load_config, validate
    from vit_scale.dist import device
    from vit_scale.models import build_model, model_dims, train_flops
    from vit_scale.observe.metrics import peak_memory_gb
    from vit_scale.train.engine import build_engine, init_distributed
    from vit_scale.train.loop import loss_function, train_step

    init_distributed(Config())
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    cfg = load_config(
        None,
        [
            f"model.variant={args.variant}",
            f"model.img_size={args.img}",
            f"train.global_batch={args.batch}",
            f"precision.dtype={dtype}",
            "parallel.zero_stage=1",
            f"parallel.activation_checkpointing={'true' if args.child == 'on' else 'false'}",
        ],
    )
    torch.manual_seed(0)
    engine, _, _ = build_engine(cfg, build_model(cfg.model).to(device()), validate(cfg, 1), 10**6)
    images = torch.randint(0, 256, (args.batch, 3, args.img, args.img), dtype=torch.uint8).to(device())
    labels = torch.randint(0, cfg.model.num_classes, (args.batch,)).to(device())
    loss_fn, torch_dtype = loss_function(cfg), {"bf16": torch.bfloat16}.get(dtype, torch.float32)
    step = [(images, labels)]
    train_step(engine, step, loss_fn, torch_dtype)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(engine, step, loss_fn, torch_dtype)
    loss.item()
    seconds = (time.perf_counter() - t0) / args.steps
    return {
        "activation_checkpointing": args.child,
        "images_per_s": round(args.batch / seconds, 3),
        "peak_mem_gb": round(peak_memory_gb(), 3),
        "model_tflop_per_step": round(train_flops(model_dims(cfg.model), args.img) * args.batch / 1e12, 3),
        "dtype": dtype,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="vit_b16")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", help="also write the JSON result here")
    p.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for setting in ("off", "on"):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child", setting],
            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    result = {
        "bench": "act_ckpt",
        "variant": args.variant,
        "img_size": args.img,
        "batch": args.batch,
        "rows": rows,
    }
    print(f"{args.variant} at {args.img} px, batch {args.batch}, {rows[0]['dtype']}")
    print("| activation checkpointing | images/s | peak memory GB |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['activation_checkpointing']} | {r['images_per_s']:.3f} | {r['peak_mem_gb']:.3f} |")
    print(json.dumps(result))
    if args.out:
        from vit_scale.io import atomic_write_json

        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
