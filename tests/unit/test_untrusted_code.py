"""No code runs from data (issue 16, class 1): CIFAR pickles and checkpoint files that would run
`touch MARKER` when unpickled are refused with one line naming the file, the marker never appears, and
nothing is written outside the output. Real files: CIFAR's pickle layout, a real run directory written by
`vit-scale pretrain` (DeepSpeed's files and ours), tampered the way a hostile copy would be, its manifest
re-signed to match."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_helpers import Payload, assert_refused, cli, tree, written_outside
from train_helpers import make_shards, pretrain, tail

from vit_scale.checkpoint import load_consolidated_state_dict

# ---- CIFAR pickles -------------------------------------------------------------------------------------


def cifar10(root: Path, protocol: int = pickle.DEFAULT_PROTOCOL, **replace) -> Path:
    """A cifar-10-batches-py folder in the official layout; `replace` swaps whole files' contents."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    data = np.stack([np.full(3072, 20 * i, np.uint8) for i in range(4)])
    contents = {
        "data_batch_1": {
            b"data": data,
            b"labels": [0, 1, 2, 3],
            b"filenames": [b"a.png"] * 4,
            b"batch_label": b"b1",
        },
        "test_batch": {b"data": data[:2], b"labels": [4, 5], b"batch_label": b"test"},
        "batches.meta": {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 4},
    }
    contents.update(replace)
    for name, obj in contents.items():
        (d / name).write_bytes(pickle.dumps(obj, protocol=protocol))
    return root


def hostile_batches(marker: Path) -> dict[str, dict]:
    good = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
    payload_array = np.empty(1, dtype=object)
    payload_array[0] = Payload(marker)
    return {
        "top-level": {"data_batch_1": Payload(marker)},
        "in-labels": {"data_batch_1": {**good, b"labels": [Payload(marker)]}},
        "object-array": {"data_batch_1": {**good, b"data": payload_array}},
        "in-meta": {"batches.meta": {b"label_names": [b"a"], b"x": Payload(marker)}},
    }


@pytest.mark.parametrize("case", ["top-level", "in-labels", "object-array", "in-meta"])
def test_a_cifar_pickle_that_runs_a_command_is_refused(tmp_path, case):
    marker = tmp_path / "MARKER"
    src = cifar10(tmp_path / "cifar", **hostile_batches(marker)[case])
    bad = "batches.meta" if case == "in-meta" else "data_batch_1"
    before = tree(tmp_path)
    proc = cli("shards", "build", src, "--out", tmp_path / "out", "--no-progress", "--workers", "1")
    line = assert_refused(
        proc, "shards", f"cifar-10-batches-py/{bad}: refused to read this pickle", "posix.system"
    )
    assert "official release" in line
    assert not marker.exists(), "the pickle's command ran"
    assert written_outside(before, tree(tmp_path), "out") == []
    assert not list((tmp_path / "out").glob("*.tar")) if (tmp_path / "out").exists() else True


def test_cifar_pickles_of_other_kinds_of_values_are_refused(tmp_path):
    src = cifar10(tmp_path / "cifar", data_batch_1={b"data": np.zeros((1, 3072), np.uint8), b"labels": (0,)})
    proc = cli("shards", "build", src, "--out", tmp_path / "out", "--no-progress")
    assert_refused(proc, "shards", "data_batch_1 is not a CIFAR python pickle")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_genuine_cifar_pickles_still_build(tmp_path, protocol):
    """Protocol 2 is what the release's own files use: bytes arrive through `_codecs.encode`."""
    src = cifar10(tmp_path / "cifar", protocol=protocol)
    proc = cli("shards", "build", src, "--out", tmp_path / "out", "--no-progress", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["num_samples"] == 4 and index["num_classes"] == 10


# ---- checkpoint files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real run directory: one process, ZeRO-1, 4 steps, a committed checkpoint at step 4."""
    root = tmp_path_factory.mktemp("run")
    shards = make_shards(root / "shards", n=32, shard_size=16)
    proc = pretrain(
        root / "run",
        shards,
        "train.steps=4",
        "checkpoint.every_steps=4",
        "data.workers=0",
        nproc=0,
        extra_env={"VIT_SCALE_JOB_ID": "4242"},
    )
    assert proc.returncode == 0, tail(proc)
    return root / "run"


def ckpt_of(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step_000000004"


def plant(run_dir: Path, name: str, marker: Path) -> Path:
    """Add a payload to one of the checkpoint's files and re-sign the manifest, as a hostile copy would."""
    ckpt = ckpt_of(run_dir)
    obj = torch.load(ckpt / name, weights_only=False)  # our own file, to tamper with
    obj["note"] = Payload(marker)
    torch.save(obj, ckpt / name)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return ckpt / name


@pytest.fixture
def hostile_copy(run, tmp_path):
    def make(name: str) -> tuple[Path, Path, Path]:
        copy = tmp_path / "copied_run"
        shutil.copytree(run, copy)
        marker = tmp_path / "MARKER"
        return copy, plant(copy, name, marker), marker

    return make


def test_the_manifest_records_who_wrote_the_checkpoint(run):
    import getpass
    import socket

    writer = json.loads((ckpt_of(run) / "manifest.json").read_text())["writer"]
    assert writer["user"] == getpass.getuser() and writer["host"] == socket.gethostname()
    assert writer["job_id"] == "4242" and isinstance(writer["pid"], int)


def test_consolidated_weights_equal_deepspeeds_reader(run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ours, _ = load_consolidated_state_dict(run)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        theirs = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_of(run).parent), tag=ckpt_of(run).name)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k].float()) for k in ours)


def weight_commands(run_dir: Path, shards: Path, out: Path) -> dict[str, list]:
    vtab = out / "vtab_data" / "svhn"
    for split in ("train800val200", "test"):
        shutil.copytree(shards, vtab / split)
    tiny = [
        "train.steps=1",
        "schedule.warmup_steps=0",
        "train.global_batch=4",
        "model.img_size=32",
        "eval.batch_size=8",
        "data.workers=0",
    ]
    return {
        "eval": ["eval", run_dir, "--data", shards, "--run-dir", out / "eval"],
        "export": ["export", run_dir, "--out", out / "export"],
        "fewshot": [
            "fewshot",
            run_dir,
            "--train",
            shards,
            "--test",
            shards,
            "--shots",
            "1",
            "--seeds",
            "1",
            "--run-dir",
            out / "fewshot",
        ],
        "inspect": ["inspect", run_dir, "--out", out / "inspect"],
        "finetune": [
            "finetune",
            "configs/finetune/cifar10_vit_b16.yaml",
            f"init={run_dir}",
            f"data.train={shards}",
            f"data.test={shards}",
            "sweep.lr=[]",
            "model.num_classes=5",
            *tiny,
            "--run-dir",
            out / "ft",
        ],
        "vtab": [
            "vtab",
            run_dir,
            "--data",
            out / "vtab_data",
            "--tasks",
            "svhn",
            *tiny,
            "--run-dir",
            out / "vtab",
        ],
    }


def test_every_weight_reader_refuses_a_model_file_that_runs_code(hostile_copy, tmp_path):
    copy, planted, marker = hostile_copy("mp_rank_00_model_states.pt")
    out = tmp_path / "out"
    out.mkdir()
    data = tmp_path / "shards"
    make_shards(data, n=16, shard_size=16)
    for command, args in weight_commands(copy, data, out).items():
        before = tree(tmp_path)
        proc = cli(*args)
        assert_refused(proc, command, f"{planted}: refused to load", "asks for posix.system")
        assert not marker.exists(), f"`vit-scale {command}` ran the pickle's command"
        changed = written_outside(before, tree(tmp_path), "out")
        assert changed == [], f"{command} wrote {changed}"


def test_a_torch_state_dict_that_runs_code_is_refused(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    marker = tmp_path / "MARKER"
    sd = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3).state_dict()
    torch.save({"state_dict": sd, "epoch": Payload(marker)}, tmp_path / "timm.pth")
    proc = cli("inspect", tmp_path / "timm.pth", "--out", tmp_path / "pictures")
    assert_refused(proc, "inspect", f"{tmp_path / 'timm.pth'}: refused to load", "posix.system")
    assert not marker.exists()


def test_a_zero_optimizer_shard_that_runs_code_is_refused(hostile_copy, tmp_path):
    copy, planted, marker = hostile_copy("zero_pp_rank_0_mp_rank_00_optim_states.pt")
    proc = cli("export", copy, "--out", tmp_path / "export")
    assert_refused(proc, "export", f"{planted}: refused to load")
    assert not marker.exists() and list((tmp_path / "export").iterdir()) == []  # checked writable, then empty


def test_a_rank_file_that_runs_code_is_refused_on_resume(run, hostile_copy):
    """The per-rank file (RNG states, data position) is ours and read with the allowlist; DeepSpeed's own
    files, read by its engine on resume, are the documented trust boundary (README)."""
    copy, planted, marker = hostile_copy("rank_00000.pt")
    proc = pretrain(
        copy, run.parent / "shards", "train.steps=6", "checkpoint.every_steps=4", "data.workers=0", nproc=0
    )
    assert_refused(proc, "pretrain", f"{planted}: refused to load")
    assert not marker.exists()
