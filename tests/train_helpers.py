"""Shared pieces of the pretraining tests: tiny real-JPEG shards, running `vit-scale pretrain` as the user
does (real processes, real DeepSpeed on gloo), and reading back what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from data_helpers import write_corpus

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain" / "tiny_cpu.yaml"
NUM_CLASSES = 5


def make_shards(out_dir: Path, n: int = 64, shard_size: int = 16) -> Path:
    """n real JPEG crops of the scikit-learn photos in n / shard_size tar shards, labels i mod 5."""
    write_corpus(out_dir, n, shard_size=shard_size, num_classes=NUM_CLASSES, size=(40, 36))
    return out_dir


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    for key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
    ):
        e.pop(key, None)
    e.update(extra)
    return e


def pretrain_cmd(run_dir: Path, shards: Path, *overrides: str, nproc: int = 2) -> list[str]:
    """The command line a user types; nproc=0 runs in this one process, without the elastic agent."""
    return [
        sys.executable,
        "-m",
        "vit_scale.cli",
        "pretrain",
        str(TINY),
        f"data.train={shards}",
        *overrides,
        "--run-dir",
        str(run_dir),
        *(["--nproc", str(nproc), "--max-restarts", "0"] if nproc else []),
    ]


def pretrain(
    run_dir: Path,
    shards: Path,
    *overrides: str,
    nproc: int = 2,
    timeout: float = 240,
    extra_env: dict | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        pretrain_cmd(run_dir, shards, *overrides, nproc=nproc),
        cwd=ROOT,
        env=env(**(extra_env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def records(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of the per-step records (checkpoint records carry no loss)."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def weights(path: Path) -> dict[str, torch.Tensor]:
    from vit_scale.checkpoint import load_consolidated_state_dict

    return load_consolidated_state_dict(path)[0]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tail(proc: subprocess.CompletedProcess, n: int = 3000) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-n:]}\nstderr:\n{proc.stderr[-n:]}"


def children(pid: int) -> list[int]:
    """The direct children of `pid`, whichever of its threads started them."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _ended(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL a `--nproc` run whole: the elastic agent starts each rank in a session of its own, so kill
    every rank's process group (the rank and its data workers), then the agent's; return once every rank
    has ended, so a restart finds the run directory's lock free, as a requeue would."""
    import signal
    import time

    ranks = children(proc.pid)
    for rank_pid in ranks:
        try:
            os.killpg(rank_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + 60
    while not all(_ended(r) for r in ranks):
        assert time.monotonic() < deadline, f"ranks {ranks} still run 60 s after SIGKILL"
        time.sleep(0.01)


def start_until_step(run_dir: Path, shards: Path, *overrides: str, step: int, timeout: float = 180):
    """Start a 2-process pretrain in a session of its own and return (process, rank pids) once it has
    logged `step`; fails if it ends first. The caller ends it (`kill_run`)."""
    import time

    proc = subprocess.Popen(
        pretrain_cmd(run_dir, shards, *overrides),
        cwd=ROOT,
        env=env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and max(losses(run_dir), default=0) < step:
        time.sleep(0.01)
    ranks = children(proc.pid)
    if proc.poll() is not None or len(ranks) != 2:
        kill_run(proc)
        raise AssertionError(
            f"the run did not reach step {step} with two ranks:\n{proc.stderr.read()[-3000:]}"
        )
    return proc, ranks


def cpu_kind() -> str:
    """What decides torch's CPU kernels, and so the last bits of float32 sums: the architecture, the
    vendor, the instruction-set extensions oneDNN and MKL dispatch on, and the torch build."""
    import platform

    vendor, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "vendor_id":
                vendor = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
    torch_build = f"torch-{torch.__version__.split('+')[0]}"
    return " ".join([platform.machine(), vendor, *sorted(f for f in isa if f in flags), torch_build])
