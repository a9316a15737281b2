"""Images/s of our training step against a plain PyTorch loop on the same model, batch and precision.

    python bench/train_step.py cpu [--nproc 2]   ours (DeepSpeed ZeRO-1) vs a plain DDP loop, N CPU processes:
                                                 ViT-Ti/16 at the paper's 224 px (197 tokens), batch 16/rank
    python bench/train_step.py gpu               ViT-B/16 bf16 on one GPU: ours with activation checkpointing
                                                 and torch.compile on/off, vs plain timm + autocast (bench/gpu.sh)

Both sides get the same uint8 batches already in memory, normalise them on the device, and run
forward, backward, gradient clipping and an AdamW + schedule step: the figure is the training step
alone, without the data pipeline. Rounds alternate between the two so drift in machine load hits both.
Besides the ratio it prints the difference in milliseconds per step: ZeRO's extra work (gradient buckets,
the all-gather of the updated partitions) is a fixed cost per parameter, so at a toy resolution such as
`--img 64` (17 tokens) the same milliseconds weigh eleven times more than at 224 px.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vit_scale.config import load_config, validate  # noqa: E402
from vit_scale.data.transforms import to_model_input  # noqa: E402
from vit_scale.dist import device  # noqa: E402
from vit_scale.models import build_model, model_dims, train_flops  # noqa: E402
from vit_scale.observe.metrics import peak_memory_gb, peak_tflops  # noqa: E402
from vit_scale.train.engine import build_engine, build_optimizer, build_schedule, init_distributed  # noqa: E402
from vit_scale.train.loop import loss_function, train_step  # noqa: E402


def config(args, **extra):
    overrides = [
        f"model.variant={args.variant}",
        f"model.img_size={args.img}",
        "model.num_classes=1000",
        f"train.global_batch={args.batch * dist.get_world_size()}",
        f"train.micro_batch_per_rank={args.batch}",
        "schedule.warmup_steps=10",
        f"precision.dtype={args.dtype}",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    if args.width:
        overrides += [
            f"model.width={args.width}",
            f"model.depth={args.depth}",
            f"model.heads={args.heads}",
            f"model.mlp={4 * args.width}",
        ]
    return load_config(None, overrides)


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batch(cfg, dev):
    g = torch.Generator().manual_seed(1234 + dist.get_rank())
    n = cfg.train.micro_batch_per_rank
    images = torch.randint(
        0, 256, (n, 3, cfg.model.img_size, cfg.model.img_size), dtype=torch.uint8, generator=g
    )
    labels = torch.randint(0, cfg.model.num_classes, (n,), generator=g)
    return images.to(dev), labels.to(dev)


def timed(step, steps: int, warmup: int) -> float:
    """Seconds per step, after `warmup` untimed steps (compilation, allocator warm-up)."""
    for _ in range(warmup):
        step()
    synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return (time.perf_counter() - t0) / steps


class Ours:
    def __init__(self, cfg, data):
        torch.manual_seed(0)
        self.engine, _, _ = build_engine(
            cfg, build_model(cfg.model).to(device()), validate(cfg, dist.get_world_size()), 10**6
        )
        self.loss_fn = loss_function(cfg)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision.dtype, torch.float32)
        self.data = [data]

    def __call__(self):
        train_step(self.engine, self.data, self.loss_fn, self.dtype)


class Plain:
    """The loop a PyTorch user writes: DDP (several processes) or the bare module, autocast for bf16."""

    def __init__(self, cfg, data, compile_model: bool = False):
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device())
        if compile_model:
            model = torch.compile(model)
        if dist.get_world_size() > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        self.model = model
        self.opt = build_optimizer(cfg, model)
        self.sched = build_schedule(cfg, self.opt, 10**6)
        self.loss_fn = loss_function(cfg)
        self.clip = cfg.optim.grad_clip
        self.autocast = cfg.precision.dtype == "bf16"
        self.images, self.labels = data

    def __call__(self):
        with torch.autocast(device().type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(to_model_input(self.images, torch.float32))
        loss = self.loss_fn(logits.float(), self.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)


def cpu(args) -> dict:
    cfg = config(args, **{"parallel.zero_stage": args.zero})
    data = batch(cfg, device())
    ours, plain = Ours(cfg, data), Plain(cfg, data)
    times = {"ours": [], "ddp": []}
    for _ in range(args.rounds):
        times["ours"].append(timed(ours, args.steps, args.warmup))
        times["ddp"].append(timed(plain, args.steps, args.warmup))
    global_batch = cfg.train.global_batch
    ips = {k: global_batch / statistics.median(v) for k, v in times.items()}
    return {
        "bench": "train_step_cpu",
        "world_size": dist.get_world_size(),
        "model": f"{cfg.model.variant} {model_dims(cfg.model)} img {cfg.model.img_size}",
        "micro_batch_per_rank": args.batch,
        "dtype": args.dtype,
        "zero_stage": args.zero,
        "threads_per_rank": torch.get_num_threads(),
        "ours_images_per_s": round(ips["ours"], 2),
        "ddp_images_per_s": round(ips["ddp"], 2),
        "ratio": round(ips["ours"] / ips["ddp"], 3),
        "extra_ms_per_step": round(1000 * global_batch * (1 / ips["ours"] - 1 / ips["ddp"]), 1),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
    }


def predicted(cfg, peak: float | None) -> dict:
    """What `vit-scale plan` predicts for this setting on this device: allocated peak and images/s."""
    from vit_scale.plan import hardware
    from vit_scale.plan.estimate import cluster, make_plan

    gpu_row = hardware.detect(peak)
    plan = make_plan(cfg, cluster(gpu_row, 1, dist.get_world_size()),
                     device="cuda" if torch.cuda.is_available() else "cpu")
    return {
        "predicted_peak_mem_gb": round(plan.device_gib, 2),
        "predicted_images_per_s": round(plan.time["images_per_s"], 1),
        "predicted_mfu": plan.config["mfu"],
    }


def gpu(args) -> dict:
    """One device: our trainer in four settings and the plain timm + autocast loop, as one table, with the
    planner's prediction of peak memory and images/s beside each of our rows (issue 15: within 10%)."""
    rows = []
    peak = peak_tflops(args.peak_tflops)
    for name, extra, plain_compile in (
        ("ours ZeRO-1", {}, None),
        ("ours ZeRO-1 + act-ckpt", {"parallel.activation_checkpointing": "true"}, None),
        ("ours ZeRO-1 + compile", {"parallel.compile": "true"}, None),
        (
            "ours ZeRO-1 + act-ckpt + compile",
            {"parallel.activation_checkpointing": "true", "parallel.compile": "true"},
            None,
        ),
        ("timm + autocast", {}, False),
        ("timm + autocast + compile", {}, True),
    ):
        if args.skip_compile and ("parallel.compile" in extra or plain_compile):
            continue
        cfg = config(args, **{"parallel.zero_stage": 1, **extra})
        data = batch(cfg, device())
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        step = Ours(cfg, data) if plain_compile is None else Plain(cfg, data, compile_model=plain_compile)
        seconds = timed(step, args.steps, args.warmup)
        ips = args.batch / seconds
        flops = train_flops(model_dims(cfg.model), cfg.model.img_size, cfg.model.num_classes)
        tflops = ips * flops / 1e12
        row = {
            "setting": name,
            "images_per_s": round(ips, 1),
            "tflops_per_device": round(tflops, 3),
            "mfu": round(tflops / peak, 3) if peak else None,
            "peak_mem_gb": round(peak_memory_gb(), 2),
        }
        if plain_compile is None:  # the planner models our DeepSpeed step, not the plain loop
            row.update(predicted(cfg, peak))
        rows.append(row)
        del step
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {
        "bench": "train_step_gpu",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "peak_tflops": peak,
        "model": cfg.model.variant,
        "img_size": args.img,
        "micro_batch": args.batch,
        "dtype": args.dtype,
        "rows": rows,
    }


def print_table(result: dict) -> None:
    if result["bench"] == "train_step_gpu":
        print(
            f"{result['device']}, {result['model']} {result['dtype']} at {result['img_size']} px, batch "
            f"{result['micro_batch']}, peak {result['peak_tflops']} TFLOP/s"
        )
        print(f"| {'setting':<34} | images/s | TFLOP/s | MFU | peak GB | predicted GB | predicted images/s |")
        print(f"|{'-' * 36}|---------:|--------:|----:|--------:|-------------:|-------------------:|")
        for r in result["rows"]:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            if "predicted_peak_mem_gb" in r:
                pred_gb = f"{r['predicted_peak_mem_gb']:.2f} ({r['predicted_peak_mem_gb'] / r['peak_mem_gb'] - 1:+.0%})"
                pred_ips = (f"{r['predicted_images_per_s']:.1f} ({r['predicted_images_per_s'] / r['images_per_s'] - 1:+.0%}"
                            f" at MFU {r['predicted_mfu']:.0%})")
            else:
                pred_gb = pred_ips = "n/a"
            print(
                f"| {r['setting']:<34} | {r['images_per_s']:8.1f} | {r['tflops_per_device']:7.1f} | {mfu} | "
                f"{r['peak_mem_gb']:7.2f} | {pred_gb:>12} | {pred_ips:>18} |"
            )
        print("predicted: `vit-scale plan` for the same setting on this device. peak GB is "
              "torch.cuda.max_memory_allocated in GiB (on CPU the process's peak RSS, which pages DeepSpeed's "
              "untouched buckets never reach: not comparable); torch.compile's effect is not modelled")
    else:
        print(
            f"ours {result['ours_images_per_s']} images/s, DDP {result['ddp_images_per_s']} images/s, "
            f"ratio {result['ratio']}, {result['extra_ms_per_step']} ms more per step "
            f"({result['world_size']} processes, {result['model']}, "
            f"batch {result['micro_batch_per_rank']}/rank, {result['dtype']})"
        )
    print(json.dumps(result))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("cpu", "gpu"))
    p.add_argument("--nproc", type=int, default=None, help="processes (cpu default 2, gpu 1)")
    p.add_argument("--variant", default=None, help="default: vit_ti16 on cpu, vit_b16 on gpu")
    p.add_argument("--img", type=int, default=None, help="image size (default 224)")
    p.add_argument("--batch", type=int, default=None, help="micro batch per rank (default: 16 cpu, 128 gpu)")
    p.add_argument(
        "--width", type=int, default=0, help="shrink the variant (tests): width, with --depth, --heads"
    )
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dtype", default=None, help="default: fp32 on cpu, bf16 on gpu")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 10 cpu, 30 gpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 3 cpu, 15 gpu)")
    p.add_argument("--zero", type=int, default=1, help="cpu: our ZeRO stage (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="cpu: alternating rounds, the median is reported")
    p.add_argument("--skip-compile", action="store_true", help="gpu: leave out the torch.compile rows")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table)")
    p.add_argument("--out", help="also write the JSON result here")
    args = p.parse_args()
    on_gpu = args.mode == "gpu"
    defaults = dict(
        nproc=1 if on_gpu else 2,
        variant="vit_b16" if on_gpu else "vit_ti16",
        img=224,
        batch=128 if on_gpu else 16,
        dtype="bf16" if on_gpu else "fp32",
        steps=30 if on_gpu else 10,
        warmup=15 if on_gpu else 3,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if "RANK" not in os.environ:  # start the ranks: this same script under torch.distributed.run
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={args.nproc}",
            __file__,
            *sys.argv[1:],
        ]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        return subprocess.call(cmd, env=env)
    from vit_scale.config import Config

    init_distributed(Config())
    result = gpu(args) if on_gpu else cpu(args)
    if dist.get_rank() == 0:
        print_table(result)
        if args.out:
            from vit_scale.io import atomic_write_json

            atomic_write_json(args.out, result)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
