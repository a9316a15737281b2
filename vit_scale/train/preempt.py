"""Preemption: signals and a known job end time become a checkpoint and a "requeue me" exit.

A signal handler only sets a flag (checkpointing inside a handler can deadlock or tear files). At the
next step boundary every rank contributes its flag, and whether the job's deadline is near
(`vit_scale.checkpoint.policy`), to one all-reduce (in the loop), so all ranks stop together, after one
committed checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading

# Exit status meaning "saved and stopped early; requeue this job" (EX_TEMPFAIL). slurm/ templates requeue on it.
REQUEUE_EXIT_CODE = 75
DEADLINE_ENV = "VIT_SCALE_DEADLINE"  # unix seconds; launch/env.py sets it from the SLURM job's end time
DEADLINE_REASON = f"{DEADLINE_ENV} would pass before the next checkpoint"


class Preempted(Exception):
    """Raised by the loop after the checkpoint is committed; the command turns it into REQUEUE_EXIT_CODE."""

    exit_code = REQUEUE_EXIT_CODE


def job_deadline() -> float | None:
    """The job's end time in unix seconds, when the launcher knows one."""
    deadline = os.environ.get(DEADLINE_ENV)
    return float(deadline) if deadline else None


class PreemptionWatch:
    """Flags SIGUSR1 / SIGTERM: `requested` is this rank's wish to stop, `reason` the signal's name."""

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.requested = False
        self.reason = ""
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a caller elsewhere keeps its own
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True
        self.reason = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
