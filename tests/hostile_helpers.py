"""Shared pieces of the untrusted-input tests: run `vit-scale` as a user does, check that a refusal is
one line with no traceback, that nothing was written outside the output, and build hostile pickles."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# DeepSpeed logs its accelerator choice on import and torch's extension loader its CUDA search (glog
# style): lines of the libraries' own, not errors.
_LIBRARY_LOG = re.compile(r"^(\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|WARNING)\] |[IW]\d{4} [\d:.]+ \d+ \S+\] )")


def cli(
    *args, cwd: Path = ROOT, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`vit-scale ARGS` in a process of its own, as a user runs it."""
    e = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "VIT_SCALE_JOB_ID"):
        e.pop(key, None)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "vit_scale.cli", *map(str, args)],
        cwd=cwd,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


_PY_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")  # Python's `warnings`: this line, then the source line


def error_lines(stderr: str) -> list[str]:
    out, after_warning = [], False
    for line in stderr.splitlines():
        if after_warning and line.startswith("  "):
            after_warning = False
            continue
        after_warning = bool(_PY_WARNING.match(line))
        if line.strip() and not after_warning and not _LIBRARY_LOG.match(line):
            out.append(line)
    return out


def assert_refused(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """Exit status 2 and exactly one line `vit-scale COMMAND: error: ...` holding every needle; no traceback."""
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"vit-scale {command}: error: "), proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every entry under `root`, links not followed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def written_outside(before: dict, after: dict, out: str) -> list[str]:
    """Paths new or changed between two `tree` snapshots that are not under `out` (relative)."""
    return sorted(
        p
        for p, v in after.items()
        if before.get(p) != v and p != out and not p.startswith(out.rstrip("/") + "/")
    )


class Payload:
    """Unpickling this runs `touch MARKER`: what a hostile file would do with the reader's account."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
