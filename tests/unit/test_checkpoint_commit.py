"""Commit-protocol reading side on hand-made directories: what counts as committed, manifest checks,
fallback, retention, and the refusal to load another world size's shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vit_scale.checkpoint import commit
from vit_scale.checkpoint.commit import COMMITTED, MANIFEST, CheckpointError


def fake_checkpoint(root: Path, step: int, committed: bool = True, world_size: int = 2) -> Path:
    d = root / "checkpoints" / commit.step_dir_name(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"weights %d" % step)
    (d / "rank_00000.pt").write_bytes(b"rank0")
    manifest = {"step": step, "world_size": world_size, "zero_stage": 1, "files": commit._manifest_files(d)}
    (d / MANIFEST).write_text(json.dumps(manifest))
    if committed:
        (d / COMMITTED).write_text(f"{step}\n")
    return d


def test_newest_committed_wins_and_torn_ones_are_passed_over_with_a_note(tmp_path):
    fake_checkpoint(tmp_path, 10)
    good = fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, committed=False)
    chosen = commit.select(tmp_path)
    assert chosen.path == good
    assert len(chosen.notes) == 1 and "step_000000030 has no COMMITTED" in chosen.notes[0]


def test_a_file_that_disagrees_with_the_manifest_is_never_loaded(tmp_path):
    older = fake_checkpoint(tmp_path, 10)
    newer = fake_checkpoint(tmp_path, 20)
    (newer / "mp_rank_00_model_states.pt").write_bytes(b"weights 99")  # same size, other bytes
    chosen = commit.select(tmp_path)
    assert chosen.path == older and "sha256" in chosen.notes[0]
    (older / "rank_00000.pt").write_bytes(b"rank")  # truncated
    assert commit.select(tmp_path).path is None
    assert "has 4 bytes, the manifest says 5" in commit.verify(older)
    with pytest.raises(CheckpointError, match="cannot use checkpoint"):
        commit.select(newer)


def test_prune_keeps_last_k_and_every_nth_and_drops_torn_older_ones(tmp_path):
    for step in (100, 200, 300, 400, 500):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 250, committed=False)
    fake_checkpoint(tmp_path, 600, committed=False)  # a save in progress: newer than any committed one
    commit.prune(tmp_path / "checkpoints", keep_last=2, keep_every=200)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == [commit.step_dir_name(s) for s in (200, 400, 500, 600)]


def test_each_rank_verifies_the_files_its_rank_wrote_and_size_mode_checks_sizes_only(tmp_path):
    d = fake_checkpoint(tmp_path, 10)
    manifest = json.loads((d / MANIFEST).read_text())
    manifest["files"]["mp_rank_00_model_states.pt"]["rank"] = 0
    manifest["files"]["rank_00000.pt"]["rank"] = 1  # as if rank 1 had written it
    (d / MANIFEST).write_text(json.dumps(manifest))
    (d / "rank_00000.pt").write_bytes(b"RANK0")  # same size, other bytes
    assert commit.verify(d, part=(0, 2)) is None  # rank 0's share is intact
    assert "rank_00000.pt does not match its sha256" in commit.verify(d, part=(1, 2))
    assert commit.verify(d, "size") is None  # weaker: the same length passes
    (d / "rank_00000.pt").write_bytes(b"RANK")
    assert "has 4 bytes, the manifest says 5" in commit.verify(d, "size", part=(1, 2))
    assert commit.select(tmp_path, "size").path is None
