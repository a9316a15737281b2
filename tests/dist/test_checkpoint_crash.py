"""A checkpoint save SIGKILLed at each of its write points, written in the background or not: the next start
uses the newest committed checkpoint and never a torn one. Real DeepSpeed saves on one process; the kill is
a real SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

import train_helpers as h

from vit_scale.checkpoint import commit

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("mode", ["async", "sync"])
@pytest.mark.parametrize("point", commit.CRASH_POINTS)
def test_kill_at_each_write_point_falls_back_to_the_last_committed(tmp_path, point, mode):
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("crash_worker.py")), str(h.TINY), str(tmp_path), mode],
        cwd=h.ROOT,
        env=h.env(VIT_SCALE_CRASH_AT=f"{point}@2"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, h.tail(proc)
    torn = tmp_path / "checkpoints" / "step_000000002"
    assert torn.is_dir()  # the second save had started writing
    chosen = commit.select(tmp_path)
    if point in ("after_committed", "after_latest"):  # COMMITTED is on disk: the save is complete
        assert chosen.path == torn and chosen.notes == []
    else:
        assert chosen.path == tmp_path / "checkpoints" / "step_000000001"
        assert len(chosen.notes) == 1 and "step_000000002 has no COMMITTED marker" in chosen.notes[0]
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest == ("step_000000002" if point == "after_latest" else "step_000000001")


def test_one_process_run_killed_mid_save_resumes_from_the_previous_checkpoint(tmp_path):
    """The tiny recipe on one process (no launcher): killed after writing step 4's files but before its
    manifest, it resumes from step 2, says why it passed over step 4, and finishes with each step once."""
    shards = h.make_shards(tmp_path / "shards", n=32, shard_size=16)
    run = tmp_path / "run"
    args = ("train.steps=6", "checkpoint.every_steps=2", "data.workers=0")
    proc = h.pretrain(run, shards, *args, nproc=0, extra_env={"VIT_SCALE_CRASH_AT": "after_rank_files@4"})
    assert proc.returncode == -signal.SIGKILL, h.tail(proc)
    proc = h.pretrain(run, shards, *args, nproc=0)
    assert proc.returncode == 0, h.tail(proc)
    assert "step_000000004 has no COMMITTED marker" in proc.stderr
    assert "resumed from" in proc.stderr and "step_000000002 at step 2" in proc.stderr
    assert [r["step"] for r in h.records(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [p.parent.name for p in sorted((run / "checkpoints").glob("step_*/COMMITTED"))] == [
        "step_000000004",
        "step_000000006",
    ]
