"""Background saves: the files hold the state of their step however training moves on meanwhile, and a run
killed again and again (every rank SIGKILLed at random steps, at the snapshot and during the background
write) ends bit-equal to an uninterrupted one (bench/chaos.py with 3 kills)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_helpers as h

from vit_scale.checkpoint import commit

pytestmark = pytest.mark.dist


def test_a_background_save_writes_the_state_of_its_step_while_training_changes_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("snapshot_worker.py")), str(h.TINY), str(tmp_path)],
        cwd=h.ROOT,
        env=h.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, h.tail(proc)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["moved"] and not got["committed_early"]  # the writer really ran after training moved on
    assert got["loaded_is_step_1"] and got["rank_data"] == {"position": 7}
    a, b = got["files"]["a"], got["files"]["b"]
    assert a == b and {"mp_rank_00_model_states.pt", "rank_00000.pt"} <= a.keys()  # byte for byte
    assert got["foreground_without_memory"]
    assert "checkpoint 2 is written in the foreground: a host copy of this rank's state needs" in proc.stderr


def test_three_kills_at_random_steps_end_bit_equal_to_the_uninterrupted_run(tmp_path):
    seed = int(os.environ.get("VIT_SCALE_TEST_SEED") or random.SystemRandom().randrange(2**32))
    print(f"replay with VIT_SCALE_TEST_SEED={seed}")
    proc = subprocess.run(
        [
            sys.executable,
            str(h.ROOT / "bench" / "chaos.py"),
            *(
                "--kills",
                "3",
                "--kinds",
                "snapshot,write,external",
                "--seed",
                str(seed),
                "--dir",
                str(tmp_path),
            ),
        ],
        cwd=h.ROOT,
        env=h.env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, h.tail(proc)
    kills = [line for line in proc.stdout.splitlines() if line.startswith("kill ")]
    assert len(kills) == 3 and all(line.endswith(": ok") for line in kills), proc.stdout
    assert {line.split()[2] for line in kills} == {"snapshot", "write", "external"}
    assert "survived 3/3" in proc.stdout
    # the bench's verdict, checked here from the runs it left
    chaos, reference = tmp_path / "chaos", tmp_path / "reference"
    assert h.losses(chaos) == h.losses(reference) and sorted(h.losses(chaos)) == list(range(1, 25))
    assert h.same_weights(h.weights(chaos), h.weights(reference))


def test_checkpoint_async_false_saves_in_the_foreground_and_verify_size_trusts_same_sized_files(tmp_path):
    """checkpoint.async=false: every save is committed before the loop goes on. Then step 4's rank file is
    rewritten with one byte of its RNG state changed (same length, a different sha256), which the default
    checkpoint.verify=full refuses: a resume with checkpoint.verify=size takes it."""
    shards = h.make_shards(tmp_path / "shards", n=32, shard_size=16)
    run = tmp_path / "run"
    args = ("checkpoint.every_steps=2", "checkpoint.keep_last=3", "data.workers=0")
    proc = h.pretrain(run, shards, "train.steps=4", "checkpoint.async=false", *args, nproc=0)
    assert proc.returncode == 0, h.tail(proc)
    saves = [(r["step"], r["checkpoint_async"]) for r in h.records(run) if "checkpoint_reason" in r]
    assert saves == [(2, False), (4, False)]

    rank_file = run / "checkpoints" / "step_000000004" / "rank_00000.pt"
    state = torch.load(rank_file, weights_only=False)
    state["rng"]["torch"][100] ^= 1
    size = rank_file.stat().st_size
    with open(rank_file, "wb") as f:  # a file object, as the writer saves: the same archive name inside
        torch.save(state, f)
    assert rank_file.stat().st_size == size

    ckpt = rank_file.parent
    assert "rank_00000.pt does not match its sha256" in commit.verify(ckpt)  # checkpoint.verify=full
    assert commit.verify(ckpt, "size") is None
    proc = h.pretrain(run, shards, "train.steps=5", "checkpoint.verify=size", *args, nproc=0)
    assert proc.returncode == 0, h.tail(proc)
    assert "step_000000004 at step 4" in proc.stderr and "sha256" not in proc.stderr, h.tail(proc)
