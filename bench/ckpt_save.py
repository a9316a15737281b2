"""How long a checkpoint stops training, written in the foreground and in the background, in one run.

    python bench/ckpt_save.py [--variant vit_b16] [--zero 1] [--img 64] [--dir /tmp/ckpt-bench] [--reshard]

One rank, the real DeepSpeed engine after one training step (so the optimizer state exists), saved through
the commit protocol (`commit.Saver`):

  stall         the time `save` blocks the training loop. Foreground (checkpoint.async=false): the whole
                save, every file written, fsynced and hashed, then committed. Background: the snapshot into
                host memory; the first background save also allocates those buffers, later ones reuse them.
  identical     the foreground and the first background save, of the same state, commit files with the
                same sha256, file by file
  write         a background save from its start to its commit, while the loop waits for nothing
  slowdown      the median training step while a background save is being written, over the median step
                with none in flight just before and after it, per round (training and writer share the
                machine's cores); the median over the rounds
  verify        what a resume checks (`commit.select_everywhere`: every rank hashes the files it wrote): for a
                checkpoint written by 2 ranks, verified by 1 process and by 2, with checkpoint.verify=full
                and =size (the files are in the page cache, as right after a save)

--reshard also times what a resume with another number of processes adds: the conversion to DeepSpeed's
universal checkpoint (`commit._universal_copy`, as `commit.load` runs it) and the universal load into a
fresh engine. The conversion reads the ZeRO shards whatever their count, so one rank measures it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(args):
    """The engine after one training step, and a function that takes one more step."""
    import torch

    from vit_scale.config import Config, load_config, validate
    from vit_scale.dist import device
    from vit_scale.models import build_model
    from vit_scale.train.engine import build_engine, init_distributed
    from vit_scale.train.loop import loss_function, train_step

    init_distributed(Config())
    overrides = [
        f"model.variant={args.variant}",
        f"model.img_size={args.img}",
        f"parallel.zero_stage={args.zero}",
    ]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config(None, [*overrides, f"train.global_batch={2 * world}", "precision.dtype=fp32"])
    batch = validate(cfg, world)
    engine, _, _ = build_engine(cfg, build_model(cfg.model).to(device()), batch, 100)
    images = [(torch.randint(0, 256, (2, 3, args.img, args.img), dtype=torch.uint8), torch.tensor([0, 1]))]
    loss_fn = loss_function(cfg)

    def step() -> float:
        t0 = time.perf_counter()
        train_step(engine, images, loss_fn, torch.float32)
        return time.perf_counter() - t0

    step()
    return cfg, batch, engine, step


def saves(engine, run: Path, background: bool, n: int) -> tuple[list[float], list[float]]:
    """n saves of the same state: the time each blocked the caller, and each one's time to its commit."""
    from vit_scale.checkpoint import commit

    saver = commit.Saver(engine, run, config={}, background=background)
    stalls, totals = [], []
    for step in range(1, n + 1):
        t0 = time.perf_counter()
        saver.save(step, {"step": step}, {"rng": commit.rng_state(), "data": {}})
        stalls.append(time.perf_counter() - t0)
        saver.wait()
        totals.append(saver.last_save_s)
    return stalls, totals


def slowdown(engine, step, run: Path, rounds: int, idle_steps: int) -> dict:
    """Rounds of: steps with no save in flight, a background save and the steps taken until it is
    committed, then steps with none again. Each round compares its writing steps with its own idle steps
    before and after, so a change in the machine's other load between rounds does not enter the ratio."""
    from vit_scale.checkpoint import commit

    saver = commit.Saver(engine, run, config={}, background=True)
    idle, busy, stalls, ratios = [], [], [], []
    for r in range(1, rounds + 1):
        before = [step() for _ in range(idle_steps)]
        t0 = time.perf_counter()
        saver.save(r, {"step": r}, {"rng": commit.rng_state(), "data": {}})
        stalls.append(time.perf_counter() - t0)
        job = saver.pending
        if job is None:
            raise SystemExit("the background save fell back to the foreground (not enough host memory)")
        writing = []
        while True:  # steps while the writer works; the last one may end after it
            writing.append(step())
            if not job.thread.is_alive():
                break
        saver.wait()
        after = [step() for _ in range(idle_steps)]
        ratios.append(statistics.median(writing) / statistics.median(before + after))
        idle += before + after
        busy += writing
    return {
        "step_s_idle": round(statistics.median(idle), 3),
        "step_s_during_write": round(statistics.median(busy), 3),
        "steps_during_write": len(busy),
        "slowdown_per_round": [round(x - 1, 3) for x in ratios],
        "slowdown": round(statistics.median(ratios) - 1, 3),
        "stall_s_while_training": [round(s, 3) for s in stalls],
    }


def files_of(ckpt: Path) -> dict:
    from vit_scale.checkpoint import commit

    return {name: f["sha256"] for name, f in commit.read_manifest(ckpt)["files"].items()}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def rank_main(args) -> int:
    """One of the two ranks of the verification measurement: write a checkpoint, then verify it."""
    import torch.distributed as dist

    from vit_scale.checkpoint import commit

    _, _, engine, _ = build(args)
    run = Path(args.dir) / "two"
    saves(engine, run, True, 1)
    ckpt = run / "checkpoints" / commit.step_dir_name(1)
    out = {}
    for mode in ("full", "size"):
        dist.barrier()
        t0 = time.perf_counter()
        assert commit.select_everywhere(ckpt, mode).path == ckpt
        dist.barrier()
        out[f"verify_2ranks_{mode}_s"] = round(time.perf_counter() - t0, 3)
    if dist.get_rank() == 0:
        Path(args.dir, "two.json").write_text(json.dumps(out))
    return 0


def two_ranks(args) -> dict:
    from vit_scale.checkpoint import commit
    from vit_scale.dist import free_port

    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank-of-two", *sys.argv[1:]],
            env=dict(
                os.environ,
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
        )
        for r in range(2)
    ]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("the 2-rank verification run failed")
    out = json.loads(Path(args.dir, "two.json").read_text())
    ckpt = Path(args.dir) / "two" / "checkpoints" / commit.step_dir_name(1)
    for mode in ("full", "size"):  # the same files, all verified by one process
        out[f"verify_1rank_{mode}_s"] = round(timed(lambda m=mode: commit.select(ckpt, m)), 3)
    out["verify_bytes"] = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="vit_b16")
    p.add_argument("--img", type=int, default=64, help="image size of the training steps")
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--saves", type=int, default=3, help="of each kind, all of the same state")
    p.add_argument("--rounds", type=int, default=5, help="of the slowdown measurement")
    p.add_argument(
        "--idle-steps", type=int, default=3, help="steps without a save in flight before and after each write"
    )
    p.add_argument("--dir", default="/tmp/vit-scale-ckpt-bench")
    p.add_argument("--reshard", action="store_true", help="also time the universal conversion and load")
    p.add_argument("--rank-of-two", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_of_two:
        return rank_main(args)

    import torch

    from vit_scale.checkpoint import commit

    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    load = [round(os.getloadavg()[0], 1)]
    cfg, batch, engine, step = build(args)
    sync_stall, _ = saves(engine, work / "sync", False, args.saves)
    async_stall, async_total = saves(engine, work / "async", True, args.saves)
    first = commit.step_dir_name(1)
    identical = files_of(work / "sync" / "checkpoints" / first) == files_of(
        work / "async" / "checkpoints" / first
    )
    ckpt = work / "async" / "checkpoints" / first
    size = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
    load.append(round(os.getloadavg()[0], 1))
    slow = slowdown(engine, step, work / "busy", args.rounds, args.idle_steps)
    load.append(round(os.getloadavg()[0], 1))

    reshard = {}
    if args.reshard:
        from vit_scale.dist import device
        from vit_scale.models import build_model
        from vit_scale.train.engine import build_engine

        sync_ckpt = work / "sync" / "checkpoints" / first
        reshard["convert_s"] = round(timed(lambda: commit._universal_copy(sync_ckpt, work)), 2)
        universal = work / commit.UNIVERSAL_DIR / first
        fresh, _, _ = build_engine(cfg, build_model(cfg.model).to(device()), batch, 100)
        fresh._config.load_universal_checkpoint = True
        reshard["universal_load_s"] = round(
            timed(lambda: fresh.load_checkpoint(str(universal.parent), tag=universal.name)), 2
        )
        commit.load(engine, sync_ckpt)  # the weights of the checkpoint, not of the slowdown rounds' steps
        want = engine.module.state_dict()
        reshard["weights_equal"] = all(torch.equal(v, want[k]) for k, v in fresh.module.state_dict().items())
        del fresh
    del engine
    verify = two_ranks(args)
    load.append(round(os.getloadavg()[0], 1))
    shutil.rmtree(work, ignore_errors=True)

    later = statistics.median(async_stall[1:]) if len(async_stall) > 1 else async_stall[0]
    result = {
        "bench": "ckpt_save",
        "variant": args.variant,
        "zero_stage": args.zero,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": load,
        "bytes": size,
        "sync_stall_s": [round(s, 2) for s in sync_stall],
        "async_stall_s": [round(s, 3) for s in async_stall],
        "async_write_s": [round(s, 2) for s in async_total],
        "identical_files": identical,
        "stall_ratio_first": round(async_stall[0] / statistics.median(sync_stall), 4),
        "stall_ratio": round(later / statistics.median(sync_stall), 4),
        **slow,
        **verify,
        **reshard,
    }
    print(json.dumps(result))
    print(
        f"stall: foreground {statistics.median(sync_stall):.2f} s, background {later:.3f} s "
        f"(1/{statistics.median(sync_stall) / later:.0f}; the first background save {async_stall[0]:.2f} s, "
        f"1/{statistics.median(sync_stall) / async_stall[0]:.0f}); files identical: {identical}; "
        f"step {slow['step_s_idle']:.2f} s idle, {slow['step_s_during_write']:.2f} s during a background write "
        f"({100 * slow['slowdown']:+.0f}%); verify {verify['verify_bytes'] / 1e9:.2f} GB with 1 rank "
        f"{verify['verify_1rank_full_s']:.2f} s, 2 ranks {verify['verify_2ranks_full_s']:.2f} s (size only: "
        f"{verify['verify_1rank_size_s']:.3f} / {verify['verify_2ranks_size_s']:.3f} s); load average {load}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
