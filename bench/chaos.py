"""Chaos: the tiny recipe on 2 ranks, every rank SIGKILLed again and again and resumed after each kill; the
end must be bit-equal to an uninterrupted run.

    python bench/chaos.py [--kills 20] [--steps-per-kill 8] [--every 4] [--seed S] [--dir DIR]

The run has kills × steps-per-kill steps and a checkpoint every `--every` steps, written in the background
(the default). Kill i lands at a random step of the i-th stretch of steps-per-kill steps, in one of four
ways, drawn in turn from a shuffled cycle:

  external  SIGKILL to every rank's process group once the step is logged: wherever the ranks are then
  snapshot  every rank kills itself at the snapshot of that step's checkpoint (VIT_SCALE_CRASH_AT=after_snapshot)
  write     every rank's writer thread kills its rank after writing DeepSpeed's files, its own state file or
            its done-marker, while training goes on (after_engine_save, after_rank_files, after_done_marker)
  commit    rank 0 is killed after the manifest or after COMMITTED (after_manifest, after_committed)

Whatever a kill spares, the harness SIGKILLs at once (before the launcher's SIGTERM could turn it into a
preemption), so every rank dies by SIGKILL. A kill is survived when the next start resumes from the newest
committed checkpoint and that checkpoint verifies (no torn or half-committed directory is ever chosen),
or starts afresh when none was committed. At the end the per-step losses and the final weights must be
bit-equal to the uninterrupted run's. It prints one line per kill, `survived K/N`, the verdict, and the
time lost per kill: the chaos run's wall time (every start, kill and resume) minus the uninterrupted run's,
over the number of kills. Exit status 0 only when every kill was survived and the end is bit-equal.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vit_scale.checkpoint import commit, load_consolidated_state_dict  # noqa: E402
from vit_scale.data.synth import write_fractals  # noqa: E402

TINY = ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"
KINDS = {
    "external": [None],
    "snapshot": ["after_snapshot"],
    "write": ["after_engine_save", "after_rank_files", "after_done_marker"],
    "commit": ["after_manifest", "after_committed"],
}


def command(run: Path, shards: Path, steps: int, every: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vit_scale.cli",
        "pretrain",
        str(TINY),
        f"data.train={shards}",
        f"train.steps={steps}",
        f"checkpoint.every_steps={every}",
        "checkpoint.keep_last=3",
        "logging.progress=false",
        "--run-dir",
        str(run),
        "--nproc",
        "2",
        "--max-restarts",
        "0",
    ]


def environment(crash_at: str | None) -> dict[str, str]:
    launched = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "VIT_SCALE_CRASH_AT")
    env = {k: v for k, v in os.environ.items() if k not in launched}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    if crash_at:
        env["VIT_SCALE_CRASH_AT"] = crash_at
    return env


def logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [0]
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "loss" in rec:
            steps.append(rec["step"])
    return max(steps)


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def ranks_of(agent: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{agent}/task/{agent}/children").read_text().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def kill_all(proc: subprocess.Popen, ranks: list[int]) -> None:
    """SIGKILL every rank's process group (the rank and its data worker), then the launcher's, and return
    once every rank has exited: a rank still tearing down holds the run directory's writer lock, and the
    next start would be refused for it (as a requeue is only started once the job's processes are gone)."""
    for pid in [*ranks, proc.pid]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 60  # until reaped: the lock asks kill(pid, 0), which a zombie answers
    while any(Path(f"/proc/{p}").exists() for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.01)


def resumed_from(stderr: str) -> str | None:
    for line in stderr.splitlines():
        if "vit-scale: resumed from " in line:
            return line.split("resumed from ", 1)[1].split(" at step")[0]
    return None


def start(run: Path, shards: Path, args, crash_at: str | None, log: Path) -> subprocess.Popen:
    with open(log, "w") as err:
        return subprocess.Popen(
            command(run, shards, args.steps, args.every),
            cwd=ROOT,
            env=environment(crash_at),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def segment(run: Path, shards: Path, args, kind: str, point: str | None, step: int, log: Path) -> str:
    """One start of the run, killed as `kind` at `step`; returns how it ended."""
    # A start rewrites metrics.jsonl (a new file) without the steps it will redo; until then the steps the
    # last start logged past its kill are still there and must not trigger this one.
    stale = inode(run / "metrics.jsonl")
    proc = start(run, shards, args, f"{point}@{step}" if point else None, log)
    deadline = time.monotonic() + args.timeout
    ranks: list[int] = []
    while time.monotonic() < deadline:
        if len(ranks) < 2:
            ranks = ranks_of(proc.pid)
        metrics = run / "metrics.jsonl"
        if kind == "external" and inode(metrics) not in (None, stale) and logged_step(run) >= step:
            kill_all(proc, ranks)
            return "killed"
        if len(ranks) == 2 and not all(alive(p) for p in ranks):  # a rank killed itself at its fault point
            kill_all(proc, ranks)
            return "killed"
        if proc.poll() is not None:
            return f"ended on its own with exit status {proc.returncode} before the kill"
        time.sleep(0.002)
    kill_all(proc, ranks)
    return f"timed out after {args.timeout} s"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps-per-kill", type=int, default=8)
    p.add_argument("--every", type=int, default=4, help="checkpoint.every_steps")
    p.add_argument("--kinds", default=",".join(KINDS), help="the kinds of kill to draw from")
    p.add_argument("--seed", type=int, default=None, help="of the kill plan (printed, for a replay)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one start may take")
    p.add_argument("--dir", default=None, help="keep the runs here (default: a temporary directory)")
    args = p.parse_args()
    if unknown := set(args.kinds.split(",")) - set(KINDS):
        p.error(f"--kinds: unknown {', '.join(sorted(unknown))}; choose from {', '.join(KINDS)}")
    args.steps = args.kills * args.steps_per_kill
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vit-scale-chaos-"))
    shutil.rmtree(work / "reference", ignore_errors=True)
    shutil.rmtree(work / "chaos", ignore_errors=True)
    shards = work / "shards"
    if not (shards / "index.json").exists():
        write_fractals(shards, classes=5, per_class=32, size=40, workers=1, shard_size=32, progress=False)
    print(
        f"chaos: tiny recipe, 2 ranks, {args.steps} steps, a checkpoint every {args.every} (background), "
        f"{args.kills} kills, seed {seed}, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    reference = work / "reference"
    t0 = time.perf_counter()
    ref = subprocess.run(
        command(reference, shards, args.steps, args.every),
        cwd=ROOT,
        env=environment(None),
        capture_output=True,
        text=True,
        timeout=args.timeout,
    )
    reference_s = time.perf_counter() - t0
    if ref.returncode != 0:
        print(f"the uninterrupted run failed (exit {ref.returncode}):\n{ref.stderr[-3000:]}")
        return 1

    run = work / "chaos"
    cycle: list[str] = []
    survived, redone = 0, []
    t0 = time.perf_counter()
    expected: Path | None = None  # where the next start must resume from
    for i in range(args.kills):
        if not cycle:
            kinds = args.kinds.split(",")
            cycle = rng.sample(kinds, len(kinds))
        kind = cycle.pop()
        lo, hi = i * args.steps_per_kill + 1, (i + 1) * args.steps_per_kill
        if kind == "external":
            step = rng.randint(lo, hi)
        else:
            saves = [s for s in range(lo, hi + 1) if s % args.every == 0]
            step = rng.choice(saves)
        point = rng.choice(KINDS[kind])
        log = work / f"chaos-{i + 1:02d}.log"
        how = segment(run, shards, args, kind, point, step, log)
        start_from = resumed_from(log.read_text())
        ok = how == "killed" and start_from == (str(expected) if expected else None)
        chosen = commit.select(run)
        newest = commit.committed_dirs(run / "checkpoints")
        ok = ok and chosen.path == (newest[-1] if newest else None)
        survived += ok
        resumed_at = int(chosen.path.name.split("_")[1]) if chosen.path else 0
        redone.append(max(0, step - resumed_at))
        print(
            f"kill {i + 1:2d}: {kind:8s} {point or 'SIGKILL':17s} at step {step:3d}, this start resumed from "
            f"{Path(start_from).name if start_from else 'nothing'}; next from "
            f"{chosen.path.name if chosen.path else 'nothing'}: {'ok' if ok else 'FAILED (' + how + ')'}",
            flush=True,
        )
        expected = chosen.path
    log = work / "chaos-final.log"
    final = start(run, shards, args, None, log)
    final.wait(timeout=args.timeout)
    chaos_s = time.perf_counter() - t0
    if final.returncode != 0 or resumed_from(log.read_text()) != (str(expected) if expected else None):
        print(f"the final start failed (exit {final.returncode}):\n{log.read_text()[-3000:]}")
        return 1

    def losses(d: Path) -> dict[int, float]:
        recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if "loss" in r}

    got, want = losses(run), losses(reference)
    same_losses = got == want and sorted(got) == list(range(1, args.steps + 1))
    a, _ = load_consolidated_state_dict(run)
    b, _ = load_consolidated_state_dict(reference)
    same_weights = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    lost = (chaos_s - reference_s) / args.kills
    print(f"survived {survived}/{args.kills}")
    print(
        f"per-step losses {'bit-equal' if same_losses else 'DIFFER'}, final weights "
        f"{'bit-equal' if same_weights else 'DIFFER'} to the uninterrupted run"
    )
    print(
        f"uninterrupted {reference_s:.1f} s, with {args.kills} kills {chaos_s:.1f} s: {lost:.1f} s lost per kill "
        f"({sum(redone) / len(redone):.1f} steps redone per kill on average; the rest is the restart), "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if survived == args.kills and same_losses and same_weights else 1


if __name__ == "__main__":
    sys.exit(main())
