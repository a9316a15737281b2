"""Pretraining through real sbatch on the two-node cluster: a plain run, preemption and requeue, a hung rank.

Every job is submitted with `vit-scale slurm pretrain` (the real template), one CPU rank per node, gloo.
The uninterrupted job and the preempted one run side by side (each takes one CPU of each node), and the
preempted one must reproduce the uninterrupted per-step losses exactly.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from slurm_helpers import read_losses, write_tiny_shards

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 100, 40


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards") / "train")


def submit(cluster, run_dir: Path, shards: Path, *overrides: str, nodes: int = 2) -> int:
    out = cluster.run(
        [
            sys.executable,
            "-m",
            "vit_scale.cli",
            "slurm",
            "pretrain",
            str(ROOT / "configs/pretrain/tiny_cpu.yaml"),
            f"data.train={shards}",
            f"train.steps={STEPS}",
            f"checkpoint.every_steps={EVERY}",
            "checkpoint.keep_last=5",
            *overrides,
            "--nodes",
            str(nodes),
            "--gpus-per-node",
            "0",
            "--cpus-per-task",
            "1",
            "--run-dir",
            str(run_dir),
        ],
        cwd=ROOT,
    )
    first = out.stdout.splitlines()[0]
    assert first.startswith("submitted job "), out.stdout
    assert f"run directory: {run_dir}" in out.stdout
    return int(first.split()[2])


def log_text(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("*.out")))


def wait_for_step(cluster, job: int, run_dir: Path, step: int, timeout: float, restarts: int = 0) -> int:
    """Wait until the job (in its `restarts`-th start) has logged `step`; the last step logged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job)
        if info.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}:
            pytest.fail(
                f"job {job} ended ({info.get('JobState')}) before step {step}:\n{log_text(run_dir)[-3000:]}"
            )
        if int(info.get("Restarts", 0)) == restarts and info.get("JobState") == "RUNNING":
            done = max(read_losses(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0
            if done >= step:
                return done
        time.sleep(0.3)
    pytest.fail(f"job {job} did not log step {step} within {timeout:.0f}s:\n{log_text(run_dir)[-3000:]}")


def wait_restarts(cluster, job: int, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while int(cluster.job(job).get("Restarts", 0)) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"job {job} was not requeued {n} time(s) within {timeout:.0f}s: {cluster.job(job)}")
        time.sleep(0.3)
    cluster.release_requeued(job)


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(
        int(d.name.split("_")[1])
        for d in (run_dir / "checkpoints").glob("step_*")
        if (d / "COMMITTED").exists()
    )


def wandb_run_ids(run_dir: Path) -> list[str]:
    """The run id of every wandb start in the run directory (one folder per process start)."""
    return sorted(d.name.rsplit("-", 1)[1] for d in (run_dir / "wandb").glob("offline-run-*") if d.is_dir())


@pytest.fixture(scope="module")
def baseline(slurm_cluster, shards, tmp_path_factory):
    """An uninterrupted 2-node job, submitted now and waited for by whoever needs it."""
    run_dir = tmp_path_factory.mktemp("baseline") / "run"
    return submit(slurm_cluster, run_dir, shards), run_dir


def test_preempted_job_resumes_exactly(slurm_cluster, shards, baseline, tmp_path):
    """SIGUSR1 from SLURM -> committed checkpoint + exit 75 + requeue; then a hard `scontrol requeue` mid-run.

    The job ends with each step's loss bit-equal to the uninterrupted job's, and one wandb run throughout.
    """
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, run_dir, shards, "logging.wandb=offline")

    # 1. A preemption notice, delivered by SLURM to the job's steps as `--signal=USR1@...` would.
    wait_for_step(slurm_cluster, job, run_dir, 12, timeout=180)
    slurm_cluster.run(["scancel", "--signal=USR1", str(job)])
    wait_restarts(slurm_cluster, job, 1, timeout=90)
    log = log_text(run_dir)
    assert "checkpoint committed before preemption or the time limit; requeueing" in log, log[-3000:]
    preempt = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    preempt = [r["step"] for r in preempt if r.get("checkpoint_reason") == "preempt"]
    assert len(preempt) == 1 and 12 <= preempt[0] < EVERY  # saved at the next step boundary, not an interval
    assert preempt[0] in committed_steps(run_dir)

    # 2. A hard requeue (as after a node failure): the job loses the steps after its last commit and redoes them.
    wait_for_step(slurm_cluster, job, run_dir, EVERY + 10, timeout=180, restarts=1)
    slurm_cluster.run(["scontrol", "requeue", str(job)])
    wait_restarts(slurm_cluster, job, 2, timeout=90)

    info = slurm_cluster.wait_done(job, timeout=240)
    log = log_text(run_dir)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert f"vit-scale: job {job} (restart 2)" in log

    base_job, base_dir = baseline
    assert slurm_cluster.wait_done(base_job, timeout=240)["JobState"] == "COMPLETED"
    expected, got = read_losses(base_dir), read_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bit-equal, step by step
    ids = wandb_run_ids(run_dir)
    assert len(ids) == 3 and len(set(ids)) == 1, ids  # three starts, one dashboard run


def test_two_node_job_pretrains_from_shards(slurm_cluster, baseline):
    job, run_dir = baseline
    info = slurm_cluster.wait_done(job, timeout=240)
    log = log_text(run_dir)
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2" and info["NumTasks"] == "2"
    assert f"vit-scale: job {job} (restart 0) on n[1-2]" in log
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    values = list(losses.values())
    assert sum(values[-10:]) < sum(values[:10])  # it learns
    assert committed_steps(run_dir)[-1] == STEPS
    assert (run_dir / "slurm" / "pretrain.sbatch").read_text().count("#SBATCH --nodes=2") == 1


def test_a_two_node_checkpoint_resumes_as_a_one_node_job(slurm_cluster, shards, baseline, tmp_path):
    """The job lost a node: its step-40 checkpoint (2 ranks) resumes in a 1-node job through DeepSpeed's
    universal checkpoint, trains to the end, and its own checkpoints are 1-rank ones."""
    base_job, base_dir = baseline
    assert slurm_cluster.wait_done(base_job, timeout=240)["JobState"] == "COMPLETED"
    run_dir = tmp_path / "run"
    job = submit(
        slurm_cluster, run_dir, shards, f"resume={base_dir / 'checkpoints' / 'step_000000040'}", nodes=1
    )
    info = slurm_cluster.wait_done(job, timeout=240)
    log = log_text(run_dir)
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "1", log[-3000:]
    assert "that checkpoint was written by 2 processes and 1 run now" in log
    assert sorted(read_losses(run_dir)) == list(range(EVERY + 1, STEPS + 1))
    last = run_dir / "checkpoints" / f"step_{STEPS:09d}"
    assert json.loads((last / "manifest.json").read_text())["world_size"] == 1


def test_sigterm_preemption_checkpoints_and_requeues(slurm_cluster, shards, tmp_path):
    """SLURM preempts with SIGTERM to every process of the job (then SIGKILL after KillWait/GraceTime)."""
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, run_dir, shards)
    wait_for_step(slurm_cluster, job, run_dir, 8, timeout=180)
    slurm_cluster.run(["scancel", "--signal=TERM", str(job)])
    deadline = time.monotonic() + 60
    while int(slurm_cluster.job(job).get("Restarts", 0)) < 1:
        info = slurm_cluster.job(job)
        assert info.get("JobState") not in {"FAILED", "CANCELLED", "COMPLETED"}, log_text(run_dir)[-2000:]
        assert time.monotonic() < deadline, info
        time.sleep(0.3)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("checkpoint_reason") == "preempt" for r in records)
    slurm_cluster.run(["scancel", str(job)])


def rank_pid(job: int, rank: int) -> int | None:
    """The pid of a job's rank on this host: the process with the rank's SLURM variables whose parent
    is not one too (its DataLoader workers inherit the command line and the environment)."""
    want = {f"SLURM_JOB_ID={job}".encode(), f"SLURM_PROCID={rank}".encode()}
    matches = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"vit_scale.cli" in cmdline and want <= env:
            matches[int(pid)] = ppid
    mains = [pid for pid, ppid in matches.items() if ppid not in matches]
    return mains[0] if len(mains) == 1 else None


def test_killed_rank_ends_the_job_with_a_clear_error(slurm_cluster, shards, tmp_path):
    """A rank that dies (SIGKILL: OOM killer, a crashed node) ends the whole job promptly, well inside the
    collective timeout, with srun naming the task; the job fails instead of hanging or requeueing."""
    run_dir = tmp_path / "run"
    timeout_s = 30
    job = submit(
        slurm_cluster,
        run_dir,
        shards,
        f"parallel.timeout_minutes={timeout_s / 60}",
        "train.steps=100000",
        "checkpoint.every_steps=0",
    )
    wait_for_step(slurm_cluster, job, run_dir, 5, timeout=180)
    pid = rank_pid(job, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    info = slurm_cluster.wait_done(job, timeout=timeout_s + 30)
    took = time.monotonic() - killed
    log = log_text(run_dir)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    assert took <= timeout_s, (took, log[-3000:])
    assert "n2: task 1: Killed" in log, log[-3000:]
    assert "requeueing" not in log and int(info["Restarts"]) == 0
