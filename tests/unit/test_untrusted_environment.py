"""The environment's failures are one-line errors (issue 16, class 6): unwritable outputs refused before any
work, full disks (real small filesystems: tmpfs mounted for the test, skipped where mounting is not
allowed) while writing shards and checkpoints, and DeepSpeed's JIT ops: a held build lock, the directory
inside the environment, one builder per node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_helpers import image_folder
from hostile_helpers import assert_refused, cli
from train_helpers import TINY, make_shards

from vit_scale.errors import UserError
from vit_scale.train import ops


@pytest.fixture
def small_fs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size; unmounted afterwards. Skipped where mounting is not
    allowed (not root, or no CAP_SYS_ADMIN in this container)."""
    mounted = []

    def mount(size: str, name: str = "fs") -> Path:
        where = tmp_path / name
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small filesystem here ({proc.stderr.strip() or 'mount failed'})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("env") / "shards", n=32, shard_size=16)


# ---- unwritable outputs: refused before any work -------------------------------------------------------


def test_every_command_refuses_an_unwritable_output_before_any_work(tmp_path, shards):
    """The output lies under a regular file, which no user (root included) can create directories in. The
    weights named do not exist: a command that looked at them first would say so instead."""
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    out, missing = blocked / "out", tmp_path / "no_such_weights.pth"
    cases = {
        "eval": (["eval", missing, "--data", shards, "--run-dir", out], "--run-dir"),
        "fewshot": (["fewshot", missing, "--train", shards, "--test", shards, "--run-dir", out], "--run-dir"),
        "export": (["export", missing, "--out", out], "--out"),
        "inspect": (["inspect", missing, "--out", out], "--out"),
        "shards": (["shards", "build", tmp_path / "no_such_corpus", "--out", out], "--out"),
        "pretrain": (["pretrain", TINY, f"data.train={shards}", "--run-dir", out], "run directory"),
    }
    for command, (args, what) in cases.items():
        assert_refused(cli(*args), command, f"{what} {out}" if what != "run directory" else f"{what} {out}")


def test_a_read_only_filesystem_is_refused_before_any_work(tmp_path, small_fs, shards):
    ro = small_fs("1m")
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    proc = cli("eval", tmp_path / "missing.pth", "--data", shards, "--run-dir", ro / "ev")
    assert_refused(proc, "eval", f"--run-dir {ro / 'ev'} is not writable (Read-only file system)")


# ---- full disks ------------------------------------------------------------------------------------------


def test_a_full_disk_while_writing_shards_says_so_and_the_build_resumes_after(tmp_path, small_fs):
    src = image_folder(tmp_path / "src", {"a": 12, "b": 12}, size=(160, 120))
    out = small_fs("160k")
    args = [
        "shards",
        "build",
        src,
        "--out",
        out / "shards",
        "--shard-size",
        "4",
        "--workers",
        "1",
        "--no-progress",
    ]
    line = assert_refused(cli(*args), "shards", "disk full while writing shard", "free there, about",
                          "completed shards are kept")  # fmt: skip
    assert ".tar.tmp" in line
    assert not list((out / "shards").glob("*.tmp")) and not (out / "shards" / "index.json").exists()
    subprocess.run(["mount", "-o", "remount,size=4m", str(out)], check=True)
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    reference = tmp_path / "reference"
    assert cli("shards", "build", src, "--out", reference, "--shard-size", "4", "--workers", "1",
               "--no-progress").returncode == 0  # fmt: skip

    def digests(d: Path) -> list:
        return [(s["name"], s["sha256"]) for s in json.loads((d / "index.json").read_text())["shards"]]

    assert digests(out / "shards") == digests(reference)


def test_a_full_disk_while_writing_a_checkpoint_says_so_and_leaves_nothing_to_load(
    tmp_path, small_fs, shards
):
    run_dir = small_fs("128k") / "run"  # room for the config and metrics, not for a 350 KB checkpoint
    proc = cli("pretrain", TINY, f"data.train={shards}", "train.steps=2", "checkpoint.every_steps=2",
               "parallel.zero_stage=0", "data.workers=0", "--run-dir", run_dir)  # fmt: skip
    assert_refused(proc, "pretrain", f"disk full while writing checkpoint {run_dir / 'checkpoints'}",
                   "free there, about", "removed the partial checkpoint")  # fmt: skip
    assert list((run_dir / "checkpoints").iterdir()) == [], "a partial checkpoint was left"
    assert not (run_dir / "writer.lock").exists()


def test_a_full_disk_anywhere_else_is_one_line_naming_the_file(tmp_path, small_fs, shards):
    from timm.models.vision_transformer import VisionTransformer

    weights = tmp_path / "w.pth"
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=5)
    torch.save(model.state_dict(), weights)
    full = small_fs("4k")  # one page: the run directory and an empty probe fit, results.json does not
    (full / "filler").write_bytes(b"x" * 4096)
    proc = cli("eval", weights, "--data", shards, "--run-dir", full / "ev", "--batch-size", "8")
    assert_refused(
        proc, "eval", f"disk full while writing file {full / 'ev' / 'results.json'}", "0 B free there"
    )
    assert list((full / "ev").iterdir()) == [], "a partial results file was left"


# ---- DeepSpeed's JIT ops -------------------------------------------------------------------------------------

HOLD_FLOCK = """
import sys, time
from filelock import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_held_op_build_lock_ends_the_start_after_the_timeout_saying_what_to_delete(tmp_path, shards):
    ext = tmp_path / "ext"
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_FLOCK, str(lock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"  # a build that hangs, or a stopped process
        proc = cli("pretrain", TINY, f"data.train={shards}", "train.steps=1", "--run-dir", tmp_path / "run",
                   env={"TORCH_EXTENSIONS_DIR": str(ext), ops.TIMEOUT_ENV: "3"})  # fmt: skip
        assert_refused(
            proc, "pretrain", f"locked by {lock} for over 3 s", f"delete {lock}", "vit-scale ops build"
        )
    finally:
        holder.kill()
        holder.wait()
    assert not (ext / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").exists(), "nothing was built meanwhile"


def test_a_lock_whose_existence_is_the_lock_times_out_too(tmp_path, monkeypatch):
    """torch before its flock-based lock (and filelock's fallback where flock is missing, as on Lustre
    without -o flock): a file left by a killed build blocks until deleted."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delattr(cpp_extension, "FileLock", raising=False)
    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "lock").touch()
    with pytest.raises(UserError, match=f"delete {tmp_path / 'cpu_adam' / 'lock'}"):
        ops.wait_for_lock("cpu_adam", timeout=1)
    (tmp_path / "cpu_adam" / "lock").unlink()
    ops.wait_for_lock("cpu_adam", timeout=1)


def test_ops_go_inside_the_environment_unless_a_directory_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert ops.extensions_dir() == Path(sys.prefix) / "torch_extensions"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert ops.extensions_dir() == tmp_path


def test_only_local_rank_0_builds_the_others_wait_for_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(ops.TIMEOUT_ENV, "1")
    with pytest.raises(
        UserError, match="waited 1 s for local rank 0 to build DeepSpeed's deepspeed_shm_comm op"
    ):
        ops.prepare(offload_optimizer=False)
    built = tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    built.parent.mkdir()
    built.touch()
    ops.prepare(offload_optimizer=False)  # built by local rank 0: nothing to wait for


def test_vit_scale_ops_build_readies_the_op():
    """In this environment's own extension directory, where the test runs have built it: no compile."""
    proc = cli("ops", "build", "deepspeed_shm_comm")
    assert proc.returncode == 0, proc.stderr
    assert f"deepspeed_shm_comm ready in {ops.extensions_dir() / 'deepspeed_shm_comm'}" in proc.stdout
