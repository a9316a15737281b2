"""One writer per run directory (issue 16, class 4): real `vit-scale pretrain` / `finetune` / `vtab`
processes and real lock holders (processes holding `RUN/writer.lock`, live, killed, on "another host" or
in an ended SLURM job), with `squeue` answered by a stub on PATH where a job's state matters."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hostile_helpers import ROOT, assert_refused, cli
from train_helpers import TINY, make_shards, pretrain, tail

from vit_scale.checkpoint.lock import LOCK_NAME, RunLock, RunLockedError, read_holder

HOLD = """
import sys, time
from vit_scale.checkpoint.lock import RunLock
lock = RunLock(sys.argv[1], heartbeat_s=float(sys.argv[2]))
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold(run_dir: Path, heartbeat_s: float = 30.0, env: dict | None = None) -> subprocess.Popen:
    """A process that takes the run directory's lock and keeps it (with its heartbeat) until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), str(heartbeat_s)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def end(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def planted_lock(run_dir: Path, *, host: str, pid: int = 4321, job_id: str | None = None, age_s: float = 0.0):
    """A lock file as a run on another node would have left it, last refreshed `age_s` seconds ago."""
    run_dir.mkdir(parents=True, exist_ok=True)
    since = time.time() - age_s - 3600
    record = {"user": "alice", "host": host, "pid": pid, "job_id": job_id, "since": since, "token": "f00d"}
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("lock") / "shards", n=32, shard_size=16)


SQUEUE = {
    "gone": 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1',
    "unreachable": 'echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1',
}


def squeue_stub(tmp_path: Path, state: str) -> dict:
    """PATH with an `squeue` that reports `state` for every job: a state name, "gone" (left the queue)
    or "unreachable" (no controller: the state cannot be told)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    body = SQUEUE.get(state, f'echo "{state}"')
    (bin_dir / "squeue").write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / "squeue").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


# ---- the command line ------------------------------------------------------------------------------------


def test_a_second_pretrain_on_a_live_runs_directory_fails_at_once_naming_it(tmp_path, shards):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "vit_scale.cli", "pretrain", str(TINY), f"data.train={shards}", "train.steps=100000",
         "checkpoint.every_steps=0", "data.workers=0", "--run-dir", str(run_dir)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "VIT_SCALE_JOB_ID": "31337"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while (
            not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline and first.poll() is None
        ):
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()[-3000:]
        before = (run_dir / "metrics.jsonl").stat().st_size
        config = (run_dir / "config.yaml").read_bytes()
        for nproc in ((), ("--nproc", "2")):
            proc = cli(
                "pretrain", TINY, f"data.train={shards}", "train.steps=7", "--run-dir", run_dir, *nproc
            )
            line = assert_refused(
                proc,
                "pretrain",
                f"{run_dir} is in use by another run",
                f"pid {first.pid}",
                socket.gethostname(),
                "SLURM job 31337",
                "since 20",
            )
            assert "delete" in line and LOCK_NAME in line
        # Refused before any work: the live run's files are its own, and it is still training.
        assert first.poll() is None, "the refused run disturbed the live one"
        assert (run_dir / "config.yaml").read_bytes() == config and not (run_dir / "checkpoints").exists()
        assert (run_dir / "metrics.jsonl").stat().st_size >= before
    finally:
        end(first)


def test_finetune_refuses_a_held_directory_and_takes_over_a_killed_holders_lock(tmp_path, shards):
    pre = tmp_path / "pre"
    proc = pretrain(pre, shards, "train.steps=2", "checkpoint.every_steps=2", "data.workers=0", nproc=0)
    assert proc.returncode == 0, tail(proc)
    run_dir = tmp_path / "ft"
    args = ["finetune", "configs/finetune/cifar10_vit_b16.yaml", f"init={pre}", f"data.train={shards}",
            f"data.test={shards}", "sweep.lr=[]", "model.num_classes=5", "model.img_size=32", "train.steps=2",
            "schedule.warmup_steps=0", "train.global_batch=4", "eval.batch_size=8", "data.workers=0",
            "--run-dir", run_dir]  # fmt: skip
    holder = hold(run_dir)
    try:
        assert_refused(cli(*args), "finetune", f"{run_dir} is in use by another run", f"pid {holder.pid}")
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # dies holding it: the lock file stays
        holder.wait()
    assert read_holder(run_dir / LOCK_NAME).pid == holder.pid
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"took over the lock of {run_dir}" in proc.stderr and f"process {holder.pid}" in proc.stderr
    assert "has ended" in proc.stderr
    assert not (run_dir / LOCK_NAME).exists(), "a finished run leaves no lock behind"


def test_vtab_refuses_a_task_directory_in_use(tmp_path, shards):
    from timm.models.vision_transformer import VisionTransformer

    weights = tmp_path / "w.pth"
    torch.save(
        VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3).state_dict(),
        weights,
    )
    data = tmp_path / "vtab"
    for split in ("train800val200", "test"):
        (data / "svhn" / split).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(shards, data / "svhn" / split)
    holder = hold(tmp_path / "runs" / "svhn")
    try:
        proc = cli(
            "vtab",
            weights,
            "--data",
            data,
            "--tasks",
            "svhn",
            "train.steps=1",
            "--run-dir",
            tmp_path / "runs",
        )
        assert_refused(
            proc, "vtab", f"{tmp_path / 'runs' / 'svhn'} is in use by another run", f"pid {holder.pid}"
        )
    finally:
        end(holder)


# ---- holders elsewhere: stale heartbeat, ended job, requeue ------------------------------------------------


def test_a_stale_lock_of_another_host_is_taken_over_by_pretrain_with_a_note(tmp_path, shards):
    run_dir = tmp_path / "run"
    planted_lock(run_dir, host="node-17", pid=99, job_id="8001", age_s=5)
    env = squeue_stub(tmp_path, "RUNNING")
    proc = cli("pretrain", TINY, f"data.train={shards}", "--run-dir", run_dir, env=env)
    assert_refused(proc, "pretrain", "alice@node-17 pid 99, SLURM job 8001")

    env = squeue_stub(tmp_path, "gone")
    proc = pretrain(
        run_dir, shards, "train.steps=1", "checkpoint.every_steps=0", "data.workers=0", nproc=0, extra_env=env
    )
    assert proc.returncode == 0, tail(proc)
    assert f"took over the lock of {run_dir} from alice@node-17 pid 99, SLURM job 8001" in proc.stderr
    assert "SLURM job 8001 has ended" in proc.stderr
    assert not (run_dir / LOCK_NAME).exists()


@pytest.mark.parametrize(
    "squeue, age_s, job_id, mine, outcome",
    [
        ("unreachable", 5, "8001", None, "refused"),  # state unknown, heartbeat fresh: presumed alive
        ("unreachable", 3600, "8001", None, "heartbeat stopped 60 minutes ago"),
        ("gone", 5, "8001", None, "SLURM job 8001 has ended"),
        ("COMPLETED", 5, "8001", None, "SLURM job 8001 has ended"),
        ("RUNNING", 5, "8001", None, "refused"),
        ("RUNNING", 5, None, None, "refused"),  # no job: only the heartbeat tells
        ("RUNNING", 5, "555", "555", "this is SLURM job 555 again (requeued)"),
    ],
)
def test_how_a_holder_on_another_host_is_judged(tmp_path, monkeypatch, squeue, age_s, job_id, mine, outcome):
    from launch.env import job_running

    monkeypatch.setenv("PATH", squeue_stub(tmp_path, squeue)["PATH"])
    run_dir = tmp_path / "run"
    planted_lock(run_dir, host="node-4", job_id=job_id, age_s=age_s)
    lock = RunLock(run_dir, job_id=mine, job_alive=job_running)
    if outcome == "refused":
        with pytest.raises(RunLockedError, match="is in use by another run .alice@node-4 pid 4321"):
            lock.acquire()
        assert read_holder(run_dir / LOCK_NAME).token == "f00d"
        return
    notes = lock.acquire()
    try:
        assert len(notes) == 1 and notes[0].startswith(f"took over the lock of {run_dir} from alice@node-4")
        assert outcome in notes[0], notes
        assert read_holder(run_dir / LOCK_NAME).token == lock.me.token
    finally:
        lock.release()


# ---- the mechanism -------------------------------------------------------------------------------------------


def _race(run_dir: str, barrier, results) -> None:
    lock = RunLock(run_dir, heartbeat_s=600)
    barrier.wait()
    try:
        lock.acquire()
        results.put("won")
        time.sleep(2)  # hold it while the others try
    except RunLockedError:
        results.put("refused")


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "taking-over-a-stale-lock"])
def test_of_processes_racing_for_the_lock_exactly_one_wins(tmp_path, stale):
    run_dir = tmp_path / "run"
    if stale:
        planted_lock(run_dir, host="node-1", age_s=7200)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(run_dir), barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    outcome = sorted(results.get(timeout=5) for _ in procs)
    assert outcome == ["refused"] * 5 + ["won"]
    assert not list(run_dir.glob(f".{LOCK_NAME}.*")), "temporary files left behind"


def test_the_holder_refreshes_its_heartbeat_and_removes_the_lock_when_done(tmp_path):
    run_dir = tmp_path / "run"
    lock = RunLock(run_dir, heartbeat_s=0.2)
    lock.acquire()
    path = run_dir / LOCK_NAME
    os.utime(path, (0, 0))
    time.sleep(1.0)
    assert time.time() - path.stat().st_mtime < 5
    holder = read_holder(path)
    assert (holder.pid, holder.host, holder.token) == (os.getpid(), socket.gethostname(), lock.me.token)
    lock.release()
    assert not path.exists()


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    """A dead holder's pid may belong to a new process by now: the recorded start time tells them apart."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"user": "bob", "host": socket.gethostname(), "pid": os.getppid(), "job_id": None,
              "since": time.time(), "token": "0ld", "pid_start": "1"}  # fmt: skip
    (run_dir / LOCK_NAME).write_text(json.dumps(record))
    lock = RunLock(run_dir)
    assert lock.acquire()[0].endswith(f"process {os.getppid()} on {socket.gethostname()} has ended")
    lock.release()


def test_a_killed_holder_not_yet_reaped_has_ended(tmp_path):
    """A SIGKILLed rank whose parent died first stays a zombie where the container's init does not reap
    orphans; its pid still answers kill(pid, 0), but its lock is free."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = {"user": "bob", "host": socket.gethostname(), "pid": child.pid, "job_id": None,
              "since": time.time(), "token": "0ld", "pid_start": Path(f"/proc/{child.pid}/stat").read_text()
              .rsplit(")", 1)[1].split()[19]}  # fmt: skip
    (run_dir / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(RunLockedError):
        RunLock(run_dir).check_free()  # alive: held
    child.kill()
    deadline = time.time() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.time() < deadline, "the killed child never became a zombie"
        time.sleep(0.01)
    os.kill(child.pid, 0)  # still there for kill(pid, 0)
    lock = RunLock(run_dir)
    assert lock.acquire()[0].endswith(f"process {child.pid} on {socket.gethostname()} has ended")
    lock.release()
    child.wait()


def test_an_unwritable_run_directory_is_one_line(tmp_path, shards):
    if os.geteuid() == 0:
        blocked = tmp_path / "file"
        blocked.write_text("not a directory")
        run_dir = blocked / "run"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        run_dir = tmp_path / "ro" / "run"
    proc = cli("pretrain", TINY, f"data.train={shards}", "--run-dir", run_dir)
    assert_refused(proc, "pretrain", f"cannot create the run directory {run_dir}")
