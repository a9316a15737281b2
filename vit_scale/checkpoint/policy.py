"""When to checkpoint and when to stop for the job's deadline: `checkpoint.every_steps`, `every_minutes`
and the deadline, as one object of pure logic over the step and two clocks.

Each rank reads its own clocks, so the loop all-reduces the answers before acting on them (a step-based
save is the same on every rank anyway).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class CheckpointPolicy:
    def __init__(
        self,
        every_steps: int,
        every_minutes: float,
        deadline: float | None,
        step: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        """`deadline` in unix seconds (read from `wall_clock`), None without one; `step` is where the run
        starts, which counts as saved (a fresh run has nothing to save, a resumed one was just loaded)."""
        self.every_steps = every_steps
        self.interval_s = 60 * every_minutes
        self.deadline = deadline
        self.clock, self.wall_clock = clock, wall_clock
        self.last_time, self.last_save_s, self.last_step = clock(), 0.0, step

    def save_due(self, step: int) -> bool:
        """Save now: `step` is a multiple of every_steps, or every_minutes have passed since the last save."""
        by_step = self.every_steps > 0 and step % self.every_steps == 0
        return by_step or (self.interval_s > 0 and self.clock() - self.last_time >= self.interval_s)

    def deadline_near(self, step: int, step_s: float) -> bool:
        """Stop now (after a save): the run would still be writing its next checkpoint at the deadline.
        Without a checkpoint schedule, "next" is one more step and a save."""
        if self.deadline is None:
            return False
        to_next = (self.every_steps - step % self.every_steps) * step_s if self.every_steps > 0 else math.inf
        if self.interval_s > 0:
            to_next = min(to_next, self.last_time + self.interval_s - self.clock())
        horizon = (to_next if math.isfinite(to_next) else 0.0) + step_s + self.last_save_s
        return self.wall_clock() + horizon >= self.deadline

    def unsaved(self, step: int) -> bool:
        """Steps were taken since the last save (or the start)."""
        return step > self.last_step

    def saved(self, step: int, seconds: float) -> None:
        """A save of `step` that took `seconds` has just finished."""
        self.last_time, self.last_save_s, self.last_step = self.clock(), seconds, step
