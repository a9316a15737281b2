"""A real two-node SLURM cluster on this host, for tests/slurm.

munged, slurmctld and two slurmd daemons (`slurmd -N n1`, `slurmd -N n2`, one port each) run from a
temporary directory with their own slurm.conf; clients find it through SLURM_CONF. Every wait has a
timeout, so a broken daemon fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NODES = ("n1", "n2")
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def unavailable_reason() -> str | None:
    """Why a SLURM cluster cannot be started here, or None when it can."""
    missing = [b for b in DAEMONS if shutil.which(b) is None]
    if missing:
        return f"SLURM/munge binaries missing ({', '.join(missing)}); .ci/run installs them as root"
    if os.geteuid() != 0:
        return "SLURM daemons need root here (SlurmUser=root); run the tests as root, as .ci/run does"
    return None


def _ensure_node_names_resolve() -> None:
    """Add n1/n2 to /etc/hosts when they do not resolve: MASTER_ADDR is the first node's name, resolved."""
    missing = []
    for node in NODES:
        try:
            socket.gethostbyname(node)
        except OSError:
            missing.append(node)
    if missing:
        with open("/etc/hosts", "a") as f:
            f.write(f"127.0.0.1 {' '.join(missing)}  # vit-scale tests/slurm\n")


def _wait(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class SlurmCluster:
    def __init__(self, root: Path, cpus_per_node: int = 2):
        self.root = Path(root)
        self.cpus = cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # A job inherits the submitter's environment; pytest's own variables are noise there.
        self.env.pop("PYTEST_CURRENT_TEST", None)

    # ------------------------------------------------------------------ lifecycle

    def _conf_text(self) -> str:
        from vit_scale.dist import free_port

        r = self.root
        ctld, p1, p2 = free_port(), free_port(), free_port()
        host = socket.gethostname()
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
            f"RealMemory=2000 State=UNKNOWN"
            for n, p in zip(NODES, (p1, p2))
        )
        return f"""\
ClusterName=vitscale
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.sock
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool_%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd_%n.pid
SlurmctldLogFile={self.logs}/slurmctld.log
SlurmdLogFile={self.logs}/slurmd_%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobRequeue=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""

    def start(self) -> None:
        r = self.root
        for d in ("munge", "state", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        # munged refuses keys readable by others and sockets in directories others cannot enter.
        os.chmod(r, 0o755)
        os.chmod(r / "munge", 0o755)
        key = r / "munge" / "munge.key"
        subprocess.run(["mungekey", "-c", "-f", "-k", str(key)], check=True, capture_output=True, timeout=30)
        os.chmod(key, 0o600)
        subprocess.run(
            [
                "munged",
                "-f",
                f"--key-file={key}",
                f"--socket={r}/munge/munge.sock",
                f"--pid-file={r}/munge/munged.pid",
                f"--log-file={r}/munge/munged.log",
                f"--seed-file={r}/munge/munged.seed",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        _ensure_node_names_resolve()
        self.conf.write_text(self._conf_text())
        self._daemon(["slurmctld", "-f", str(self.conf)])
        _wait(lambda: self._ok(["scontrol", "ping"]), 30, "slurmctld to answer")
        for node in NODES:
            self._daemon(["slurmd", "-f", str(self.conf), "-N", node])
        _wait(self._all_idle, 60, f"nodes {', '.join(NODES)} to be idle")

    def _daemon(self, cmd: list[str]) -> None:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}\n{self.log_tail()}"
            )

    def _ok(self, cmd: list[str]) -> bool:
        try:
            return subprocess.run(cmd, env=self.env, capture_output=True, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _all_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split()
        states = dict(zip(out[0::2], out[1::2]))
        return all(states.get(n) == "idle" for n in NODES)

    def _pids(self) -> list[int]:
        files = [self.root / "slurmctld.pid", self.root / "munge" / "munged.pid"]
        files += [self.root / f"slurmd_{n}.pid" for n in NODES]
        pids = []
        for f in files:
            try:
                pids.append(int(f.read_text().strip()))
            except (OSError, ValueError):
                pass
        return pids

    def stop(self) -> None:
        """Cancel every job, stop the daemons (politely, then SIGKILL) and wait for them to go."""
        if self.conf.exists():
            self.run(["scancel", "--full", "--state=RUNNING"], check=False)
            self.run(["scancel", "--state=PENDING"], check=False)
            try:
                _wait(lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(), 30, "jobs to end")
            except TimeoutError:
                pass
        pids = self._pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

        def gone():
            alive = []
            for pid in pids:
                try:
                    os.kill(pid, 0)
                    alive.append(pid)
                except ProcessLookupError:
                    pass
            return not alive

        try:
            _wait(gone, 20, "SLURM daemons to stop")
        except TimeoutError:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------------ client commands

    def run(
        self, cmd: list[str], check: bool = True, timeout: float = 60, **kw
    ) -> subprocess.CompletedProcess:
        out = subprocess.run(
            cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stdout}{out.stderr}")
        return out

    def sbatch(self, args: list[str], cwd: str | Path | None = None) -> int:
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False).stdout
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", out))

    def wait_state(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        return _wait(
            lambda: (j := self.job(job_id)).get("JobState") in states and j,
            timeout,
            f"job {job_id} to reach {sorted(states)} (now {self.job(job_id).get('JobState')})",
            interval=0.5,
        )

    def wait_done(self, job_id: int, timeout: float) -> dict[str, str]:
        return self.wait_state(job_id, TERMINAL, timeout)

    def release_requeued(self, job_id: int, timeout: float = 60) -> None:
        """Start a requeued job now: SLURM holds a requeued batch job back for two minutes (BeginTime)
        to let the old one's epilog finish, which would only make the tests slow."""

        def held():
            j = self.job(job_id)
            return j.get("JobState") in ("RUNNING", "COMPLETED") or (
                j.get("JobState") == "PENDING" and j.get("Reason") == "BeginTime"
            )

        _wait(held, timeout, f"requeued job {job_id} to be pending", interval=0.3)
        if self.job(job_id).get("JobState") == "PENDING":
            self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for f in sorted(self.logs.glob("*.log")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(parts)


def write_tiny_shards(out_dir: Path, n: int = 64, classes: int = 5, per_shard: int = 16) -> Path:
    """Real JPEG crops of sklearn's sample photos in real tar shards (ShardWriter), labelled by crop position."""
    import glob
    import io

    import sklearn
    from PIL import Image

    from vit_scale.data.shards import ShardWriter

    photos = sorted(glob.glob(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "*.jpg")))
    images = [Image.open(p).convert("RGB") for p in photos]
    names = [f"c{i}" for i in range(classes)]
    with ShardWriter(out_dir, shard_size=per_shard, classes=names, split="train") as w:
        for i in range(n):
            img = images[i % len(images)]
            x, y = (i * 37) % (img.width - 96), (i * 23) % (img.height - 96)
            buf = io.BytesIO()
            img.crop((x, y, x + 96, y + 96)).resize((40, 40)).save(buf, "JPEG", quality=85)
            w.write(
                f"s{i:05d}", buf.getvalue(), "jpg", i % classes, {"source": f"{photos[i % len(photos)]}#{i}"}
            )
    return out_dir


def read_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss from a run's metrics.jsonl (the last record of each step)."""
    from vit_scale.observe.report import read_metrics

    by_step, _ = read_metrics(Path(run_dir) / "metrics.jsonl")
    return {s: r["loss"] for s, r in sorted(by_step.items()) if "loss" in r}


def make_cluster_dir() -> Path:
    # Unix sockets have a ~100-byte path limit, so keep the cluster directory short and under /tmp.
    return Path(tempfile.mkdtemp(prefix="vs-slurm-", dir="/tmp"))
