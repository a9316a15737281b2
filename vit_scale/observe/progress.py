"""The training progress line: rank 0 of interactive runs only; batch jobs read metrics.jsonl instead."""

from __future__ import annotations

import sys


class Progress:
    """A rich progress bar of steps, or nothing when `enabled` is false or stderr is not a terminal."""

    def __init__(self, enabled: bool, total: int, done: int):
        self._p = None
        if not (enabled and sys.stderr.isatty()):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        self._p = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._p.start()
        self._task = self._p.add_task("train", total=total, completed=done)

    def update(self, step: int) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=step)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
