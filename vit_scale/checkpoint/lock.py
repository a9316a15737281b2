"""One writer per run directory: `RUN/writer.lock`, held by rank 0 of the run that trains there.

Two runs writing one directory interleave their checkpoints and metrics and each prunes the other's
checkpoints. The lock must work where runs live, on shared filesystems that span nodes (NFS, Lustre),
where `flock` is unreliable or off, so it uses only operations those filesystems make atomic:

- taking it: the holder's record (user, host, pid, SLURM job id, since when, a random token) is written
  to a private file and hard-linked to `writer.lock`; `link` fails if the name exists, on NFS too;
- holding it: a thread of rank 0 touches the file every HEARTBEAT_S seconds;
- judging a holder: on the same host its pid says whether it lives (with the process start time, so a
  reused pid is not mistaken for it); elsewhere a SLURM job that has ended, or a heartbeat older than
  STALE_S, marks it dead; a requeued job with the holder's job id takes its own lock back;
- taking over a dead holder's lock: the file is renamed aside (one rename of a name succeeds), checked
  to be the record judged dead, and removed; then the lock is taken as above, with a note.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from vit_scale.errors import UserError

LOCK_NAME = "writer.lock"
HEARTBEAT_S = 30.0
STALE_S = 600.0  # twenty missed heartbeats: a holder on another host is presumed dead after this


class RunLockedError(UserError):
    """The run directory is held by a live run."""


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return str(os.getuid())


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), None where /proc has no entry."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process `pid` (clock ticks since boot), None where /proc has no entry."""
    fields = _stat(pid)
    return None if fields is None else fields[19]


def writer(job_id: str | None = None) -> dict:
    """Who this process is: what a lock and a checkpoint manifest record about their writer."""
    return {
        "user": _user(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": job_id if job_id is not None else os.environ.get("VIT_SCALE_JOB_ID") or None,
    }


@dataclass
class Holder:
    user: str
    host: str
    pid: int
    job_id: str | None
    since: float
    token: str
    pid_start: str | None = None

    def describe(self) -> str:
        job = f", SLURM job {self.job_id}" if self.job_id else ""
        when = datetime.fromtimestamp(self.since).strftime("%Y-%m-%d %H:%M:%S")
        return f"{self.user}@{self.host} pid {self.pid}{job}, since {when}"


def read_holder(path: Path) -> Holder | None:
    """The record in a lock file; None when there is none (or it is not a record: a torn or foreign file)."""
    try:
        data = json.loads(path.read_text())
        return Holder(**{k: data[k] for k in Holder.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    fields = _stat(pid)
    if fields is not None and fields[0] in ("Z", "X"):
        # Killed but not reaped: a container whose init does not reap orphans keeps such entries for good.
        return False
    return start is None or fields is None or fields[19] == start


JobAlive = Callable[[str], "bool | None"]  # SLURM job id -> running?, None when it cannot be told


class RunLock:
    """The writer lock of `run_dir`. `job_alive` tells whether a SLURM job still runs (the command layer
    asks squeue); `job_id` is this run's (default: VIT_SCALE_JOB_ID, set by the launcher)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        job_id: str | None = None,
        job_alive: JobAlive | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        stale_s: float = STALE_S,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.me = Holder(
            **writer(job_id),
            since=time.time(),
            token=secrets.token_hex(8),
            pid_start=_start_time(os.getpid()),
        )
        self.job_alive = job_alive
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.notes: list[str] = []
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ---- judging a holder

    def stale_reason(self, holder: Holder, mtime: float) -> str | None:
        """Why `holder` is no longer running (its lock may be taken), or None while it may be."""
        here = holder.host == self.me.host
        if holder.token == self.me.token:
            return "it is this process's own"
        if here and holder.pid == self.me.pid:
            return "this process held it before (its record was not removed)"
        if here:
            if not _pid_alive(holder.pid, holder.pid_start):
                return f"process {holder.pid} on {holder.host} has ended"
            return None
        if holder.job_id and holder.job_id == self.me.job_id:
            return f"this is SLURM job {holder.job_id} again (requeued), taking its own lock back"
        if holder.job_id and self.job_alive is not None and self.job_alive(holder.job_id) is False:
            return f"SLURM job {holder.job_id} has ended"
        age = time.time() - mtime
        if age > self.stale_s:
            return f"its heartbeat stopped {age / 60:.0f} minutes ago (stale after {self.stale_s / 60:.0f})"
        return None

    def check_free(self) -> None:
        """Raise RunLockedError if a live run holds the directory (a check only; nothing is written)."""
        holder, mtime = self._current()
        if holder is not None and self.stale_reason(holder, mtime) is None:
            raise self._locked(holder)

    def _current(self) -> tuple[Holder | None, float]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None, 0.0
        holder = read_holder(self.path)
        if holder is None:
            # Not a record: a file from elsewhere, or one being written (link publishes it whole, so
            # only a foreign writer leaves it torn). Treat it as held by nobody once it is stale.
            holder = Holder("?", "?", 0, None, mtime, "unreadable")
        return holder, mtime

    def _locked(self, holder: Holder) -> RunLockedError:
        who = (
            holder.describe()
            if holder.token != "unreadable"
            else "an unreadable lock file, touched "
            + (datetime.fromtimestamp(holder.since).strftime("%Y-%m-%d %H:%M:%S"))
        )
        return RunLockedError(
            f"{self.run_dir} is in use by another run ({who}); two runs in one directory "
            f"overwrite each other's checkpoints. Wait for it, stop it, or use another --run-dir; if it "
            f"has surely ended, delete {self.path}"
        )

    # ---- taking and giving back

    def acquire(self) -> list[str]:
        """Take the lock (taking over a dead holder's, with a note) and start the heartbeat; returns the
        notes. RunLockedError when a live run holds it."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run directory {self.run_dir} ({e.strerror or e})") from None
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return self.notes
            holder, mtime = self._current()
            if holder is None:
                continue  # released meanwhile
            why = self.stale_reason(holder, mtime)
            if why is None:
                raise self._locked(holder)
            if self._remove_stale(holder):
                self.notes.append(f"took over the lock of {self.run_dir} from {holder.describe()}: {why}")
        raise RunLockedError(f"could not take the lock {self.path}: other runs keep taking it; try again")

    def _create(self) -> bool:
        tmp = self.run_dir / f".{LOCK_NAME}.{self.me.token}"
        try:
            with open(tmp, "w") as f:
                json.dump(asdict(self.me), f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write in the run directory {self.run_dir} ({e.strerror or e})") from None
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            # NFS may report a link that happened as failed (a lost reply): the link count says.
            with contextlib.suppress(OSError):
                if os.stat(tmp).st_nlink == 2:
                    return True
            return self._create_exclusive()
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self) -> bool:
        """For filesystems without hard links: O_CREAT|O_EXCL, atomic on local filesystems and NFSv3+."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.me), f)
        return True

    def _remove_stale(self, holder: Holder) -> bool:
        aside = self.run_dir / f".{LOCK_NAME}.stale.{self.me.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        moved = read_holder(aside)
        if moved is not None and moved.token != holder.token:
            # Another run took the lock between our reading and the rename: give it back.
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        holder = read_holder(self.path)
        if holder is not None and holder.token == self.me.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        for note in self.acquire():
            print(f"vit-scale: {note}", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- heartbeat

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="vit-scale-run-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = read_holder(self.path)
            if holder is None or holder.token != self.me.token:
                print(
                    f"vit-scale: warning: lost the lock of {self.run_dir}"
                    f"{f' to {holder.describe()}' if holder else ''}; another run presumed this one dead "
                    "and now writes there too: stop one of them",
                    file=sys.stderr,
                    flush=True,
                )
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)
