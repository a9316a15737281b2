"""Checkpoint save time through the commit protocol, and how long the training loop stalls for it.

    python bench/ckpt_save.py [--variant vit_b16] [--zero 1] [--dir /tmp/ckpt-bench] [--reshard]

One rank, the real DeepSpeed engine after one training step (so the optimizer state exists). Saves are
synchronous, so the stall is the whole save: DeepSpeed's shard writes, this rank's file, the manifest
(sha256 of every file, the largest share on big checkpoints), COMMITTED and `latest`.

--reshard also times what a resume with another number of processes adds: the conversion to DeepSpeed's
universal checkpoint (`commit._universal_copy`, as `commit.load` runs it) and the universal load into a
fresh engine. The conversion reads the ZeRO shards whatever their count, so one rank measures it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch

    from vit_scale.checkpoint import commit
    from vit_scale.config import Config, load_config, validate
    from vit_scale.dist import device
    from vit_scale.models import build_model
    from vit_scale.train.engine import build_engine, init_distributed
    from vit_scale.train.loop import loss_function, train_step

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="vit_b16")
    p.add_argument("--img", type=int, default=64, help="image size of the one training step (memory only)")
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--saves", type=int, default=2)
    p.add_argument("--dir", default="/tmp/vit-scale-ckpt-bench")
    p.add_argument("--reshard", action="store_true", help="also time the universal conversion and load")
    args = p.parse_args()
    init_distributed(Config())
    cfg = load_config(
        None,
        [
            f"model.variant={args.variant}",
            f"model.img_size={args.img}",
            "train.global_batch=2",
            f"parallel.zero_stage={args.zero}",
            "precision.dtype=fp32",
        ],
    )
    engine, _, _ = build_engine(cfg, build_model(cfg.model).to(device()), validate(cfg, 1), 100)
    batch = [(torch.randint(0, 256, (2, 3, args.img, args.img), dtype=torch.uint8), torch.tensor([0, 1]))]
    train_step(engine, batch, loss_function(cfg), torch.float32)
    run = Path(args.dir)
    shutil.rmtree(run, ignore_errors=True)
    times = []
    for step in range(1, args.saves + 1):
        t0 = time.perf_counter()
        ckpt = commit.save(
            engine, run, step, {"step": step}, {"rng": commit.rng_state(), "data": {}}, config={}
        )
        times.append(time.perf_counter() - t0)
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    t0 = time.perf_counter()
    assert commit.verify(ckpt) is None
    verify_s = time.perf_counter() - t0
    reshard = {}
    if args.reshard:
        t0 = time.perf_counter()
        universal = commit._universal_copy(ckpt, run)
        reshard["convert_s"] = round(time.perf_counter() - t0, 2)
        fresh, _, _ = build_engine(cfg, build_model(cfg.model).to(device()), validate(cfg, 1), 100)
        fresh._config.load_universal_checkpoint = True
        t0 = time.perf_counter()
        fresh.load_checkpoint(str(universal.parent), tag=universal.name)
        reshard["universal_load_s"] = round(time.perf_counter() - t0, 2)
        want = engine.module.state_dict()
        reshard["weights_equal"] = all(torch.equal(v, want[k]) for k, v in fresh.module.state_dict().items())
    shutil.rmtree(run, ignore_errors=True)
    result = {
        "bench": "ckpt_save",
        "variant": args.variant,
        "zero_stage": args.zero,
        "bytes": size,
        "save_s": [round(t, 2) for t in times],
        "verify_s": round(verify_s, 2),
        "gb_per_s": round(size / min(times) / 1e9, 3),
        **reshard,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
