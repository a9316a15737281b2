"""Turn the launcher's environment into the standard torch.distributed one.

torchrun and the deepspeed launcher already set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT. Under SLURM srun each task derives them from SLURM_*: the rank from SLURM_PROCID, the
master from the first host of the node list (`scontrol show hostnames`), the port from the job id, so
every task of a job computes the same address without talking to the others. It also passes the job id
(VIT_SCALE_JOB_ID, for the dashboard's record of requeues) and the job's end time (VIT_SCALE_DEADLINE,
so the trainer checkpoints before the time limit). Nothing in vit_scale/ reads SLURM_* itself.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from datetime import datetime

from vit_scale.errors import UserError

PORT_BASE, PORT_SPAN = 20000, 20000


def first_host(nodelist: str, env: Mapping[str, str] | None = None) -> str:
    """The first hostname of a SLURM node list such as `gpu[003-010,012]`."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            env=None if env is None else dict(env),
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except FileNotFoundError:
        raise UserError(
            "SLURM_JOB_NODELIST is set but `scontrol` is not on PATH; run under srun on the cluster"
        ) from None
    except subprocess.CalledProcessError as e:
        raise UserError(f"`scontrol show hostnames {nodelist}` failed: {e.stderr.strip()}") from None
    hosts = out.split()
    if not hosts:
        raise UserError(f"`scontrol show hostnames {nodelist}` printed no host")
    return hosts[0]


def job_port(job_id: str) -> int:
    """A port derived from the job id: the same on every task, different for jobs sharing a node."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def job_end_time(env: Mapping[str, str]) -> float | None:
    """Unix time at which SLURM ends the job, when it can be known."""
    if env.get("SLURM_JOB_END_TIME"):
        return float(env["SLURM_JOB_END_TIME"])
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%e"],
            env=dict(env),
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
    except (FileNotFoundError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    try:
        return datetime.fromisoformat(out).timestamp()  # squeue prints local time, as does fromisoformat
    except ValueError:
        return None  # "N/A", "Unknown": no limit


_ENDED = {
    "COMPLETED",
    "CANCELLED",
    "FAILED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "OUT_OF_MEMORY",
    "SPECIAL_EXIT",
}


def job_running(job_id: str) -> bool | None:
    """Whether SLURM job `job_id` is still queued or running; None when it cannot be told (no squeue)."""
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    states = set(proc.stdout.split())
    if proc.returncode != 0:
        # squeue fails with "Invalid job id" for a job that left the queue, and for other reasons too.
        return False if "invalid job id" in proc.stderr.lower() else None
    return bool(states - _ENDED)


def distributed_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to `env` so torch.distributed can start; {} when nothing is missing."""
    out: dict[str, str] = {}
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, the deepspeed launcher, or set by hand
        if "LOCAL_RANK" not in env:
            out["LOCAL_RANK"] = env["RANK"]
        return out
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = env.get("SLURM_JOB_ID", "0")
        out.update(
            RANK=env["SLURM_PROCID"],
            WORLD_SIZE=env["SLURM_NTASKS"],
            LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
            MASTER_ADDR=first_host(env["SLURM_JOB_NODELIST"], env)
            if env.get("SLURM_JOB_NODELIST")
            else "127.0.0.1",
            MASTER_PORT=env.get("MASTER_PORT") or str(job_port(job)),
            VIT_SCALE_JOB_ID=job,
        )
        end = job_end_time(env)
        if end is not None and "VIT_SCALE_DEADLINE" not in env:
            out["VIT_SCALE_DEADLINE"] = str(int(end))
    return out


def apply(env=None) -> int:
    """Complete os.environ (or `env`) for torch.distributed; returns the world size."""
    env = os.environ if env is None else env
    env.update(distributed_env(env))
    return int(env.get("WORLD_SIZE", "1"))


def under_launcher(env: Mapping[str, str] | None = None) -> bool:
    """True inside torchrun, the deepspeed launcher or an srun task: processes already exist."""
    env = os.environ if env is None else env
    return ("RANK" in env and "WORLD_SIZE" in env) or "SLURM_PROCID" in env
