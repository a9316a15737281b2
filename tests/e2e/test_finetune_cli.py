"""Tiny pretrain -> transfer through the command line, on data built from the official layouts.

One pretraining run (with few-shot evaluation during it) feeds: a CIFAR-100-format fine-tune at a
higher resolution that is killed after a commit and resumed, `vit-scale eval` of its result, a
VTAB-1k run over two tiny tasks, and `vit-scale fewshot`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transfer_helpers import write_cifar100_python, write_class_shards, write_vtab_task

from vit_scale.cli import main as cli

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
QUIET = ["logging.wandb=disabled", "data.workers=0", "precision.dtype=fp32"]


def vit_scale(*args, cwd, env=None, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "vit_scale.cli", *map(str, args)],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=240,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vit-scale {args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny ViT (32 px) pretrained on 2 ranks under ZeRO-3, with few-shot evaluation every 3 steps."""
    w = tmp_path_factory.mktemp("transfer")
    write_class_shards(w / "pre" / "train", num_classes=5, per_class=8, seed=0, shard_size=10)
    # Noise images: few-shot scores near chance, so two computations agree only if they really match.
    write_class_shards(w / "fs" / "train", num_classes=4, per_class=4, seed=1, signal=False)
    write_class_shards(w / "fs" / "test", num_classes=4, per_class=6, seed=2, signal=False)
    vit_scale(
        "pretrain",
        REPO / "configs/pretrain/tiny_cpu.yaml",
        "train.steps=6",
        f"data.train={w / 'pre/train'}",
        "eval.fewshot_every_steps=3",
        f"eval.fewshot_train={w / 'fs/train'}",
        f"eval.fewshot_test={w / 'fs/test'}",
        "eval.fewshot_shots=[1,2]",
        "eval.fewshot_seeds=2",
        "checkpoint.every_steps=6",
        "parallel.zero_stage=3",  # few-shot gathers the partitioned weights and every rank's features
        *QUIET,
        "--run-dir",
        w / "pretrain",
        "--nproc",
        2,
        cwd=w,
    )
    return w


def test_fewshot_runs_during_pretraining(work):
    records = [json.loads(line) for line in (work / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    fewshot = [r for r in records if "fewshot/fs_1shot" in r]
    assert [r["step"] for r in fewshot] == [3, 6]
    for r in fewshot:
        assert 0.0 <= r["fewshot/fs_1shot"] <= 1.0 and 0.0 <= r["fewshot/fs_2shot"] <= 1.0


def test_cifar100_finetune_at_higher_resolution_resumes_and_agrees_with_eval(work):
    src = write_cifar100_python(work / "cifar_src", train_per_class=4, test_per_class=3)
    for split in ("train", "test"):
        assert (
            cli(
                [
                    "shards",
                    "build",
                    str(src),
                    "--out",
                    str(work / "cifar100" / split),
                    "--format",
                    "cifar",
                    "--split",
                    split,
                    "--workers",
                    "1",
                    "--no-progress",
                ]
            )
            == 0
        )
    args = [
        REPO / "configs/finetune/cifar100_vit_b16.yaml",
        f"init={work / 'pretrain'}",
        "model.img_size=48",
        f"data.train={work / 'cifar100/train'}",
        f"data.test={work / 'cifar100/test'}",
        "sweep.lr=[]",
        "train.steps=4",
        "train.global_batch=8",
        "checkpoint.every_steps=2",
        "eval.batch_size=8",
        *QUIET,
        "--run-dir",
        work / "ft",
    ]
    killed = vit_scale(
        "finetune", *args, cwd=work, env={"VIT_SCALE_CRASH_AT": "after_committed@2"}, check=False
    )
    assert killed.returncode != 0 and not (work / "ft" / "results.json").exists()
    resumed = vit_scale("finetune", *args, cwd=work)
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr

    res = json.loads((work / "ft" / "results.json").read_text())
    test = res["datasets"]["cifar100"]
    assert test["n"] == 12 and res["details"]["img_size"] == 48 and res["details"]["init"]["img_size"] == 32
    assert "| cifar100 |" in (work / "ft" / "results.md").read_text()
    steps = [
        json.loads(line)["step"]
        for line in (work / "ft" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert steps[-1] == 4

    # The committed checkpoint, imported again, scores exactly what the fine-tune reported.
    vit_scale("eval", work / "ft", "--data", work / "cifar100/test", "--run-dir", work / "ev", cwd=work)
    again = json.loads((work / "ev" / "results.json").read_text())["datasets"]["cifar100"]
    assert (again["top1"], again["top5"], again["n"]) == (test["top1"], test["top5"], test["n"])


def test_vtab_over_two_tiny_tasks_writes_the_table(work):
    raw = work / "vtab_raw"
    for i, (task, classes) in enumerate((("svhn", 3), ("dmlab", 2))):
        folder = write_vtab_task(raw, task, classes, seed=i)
        for split in ("train800", "val200", "train800val200", "test"):
            out = work / "vtab" / task / split
            assert (
                cli(
                    [
                        "shards",
                        "build",
                        str(folder),
                        "--out",
                        str(out),
                        "--format",
                        "vtab",
                        "--split",
                        split,
                        "--workers",
                        "1",
                        "--no-progress",
                    ]
                )
                == 0
            )
    vit_scale(
        "vtab",
        work / "pretrain",
        "--data",
        work / "vtab",
        "model.img_size=48",
        "train.steps=2",
        "train.global_batch=4",
        "eval.batch_size=8",
        "sweep.lr=[0.01,0.03]",
        "--sweep",
        *QUIET,
        "data.workers=4",  # the default: every split is one shard, read by 2 ranks × 4 workers
        "--run-dir",
        work / "vt",
        "--nproc",
        2,
        cwd=work,
    )
    res = json.loads((work / "vt" / "results.json").read_text())
    assert list(res["datasets"]) == ["svhn", "dmlab"]
    # Two ranks split every test set, and each image is counted exactly once.
    assert res["datasets"]["svhn"]["n"] == 9 and res["datasets"]["dmlab"]["n"] == 6
    mean = res["summary"]["VTAB mean (2/19 tasks)"]["top1"]
    assert mean == pytest.approx((res["datasets"]["svhn"]["top1"] + res["datasets"]["dmlab"]["top1"]) / 2)
    # Each task swept both rates on val200, then retrained on train800val200 with the better one.
    svhn = json.loads((work / "vt" / "svhn" / "results.json").read_text())["details"]
    assert [s["lr"] for s in svhn["sweep"]] == [0.01, 0.03] and all(s["val"]["n"] == 3 for s in svhn["sweep"])
    best = max(svhn["sweep"], key=lambda s: s["val"]["top1"])["lr"]
    assert svhn["lr"] == best and (work / "vt" / "svhn" / "final" / "checkpoints").is_dir()
    table = (work / "vt" / "results.md").read_text()
    assert "| svhn |" in table and "| **Structured (1/8 tasks)** |" in table


def test_fewshot_command_matches_the_metric_logged_during_pretraining(work):
    vit_scale("fewshot", work / "pretrain", "--train", work / "fs/train", "--test", work / "fs/test",
              "--shots", "1,2,3", "--seeds", "2", "--run-dir", work / "fsr", cwd=work)  # fmt: skip
    scores = json.loads((work / "fsr" / "results.json").read_text())["datasets"]
    assert list(scores) == ["fs 1-shot", "fs 2-shot", "fs 3-shot"]
    assert all(r["n"] == 24 and 0 <= r["top1"] <= 1 for r in scores.values())
    # Same final weights, same samples in the same order (rank 0's share, then rank 1's), same draws:
    # one process here reproduces what two ranks gathered at step 6.
    logged = [json.loads(line) for line in (work / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    at6 = next(r for r in logged if r.get("step") == 6 and "fewshot/fs_1shot" in r)
    assert at6["fewshot/fs_1shot"] == scores["fs 1-shot"]["top1"]
    assert at6["fewshot/fs_2shot"] == scores["fs 2-shot"]["top1"]


def test_exported_folder_imports_like_the_checkpoint(work):
    import torch

    from vit_scale.checkpoint.export import export
    from vit_scale.checkpoint.weights import build_pretrained, load_pretrained
    from vit_scale.models import model_dims

    export(work / "pretrain", work / "exported")
    from_ckpt, from_export = load_pretrained(work / "pretrain"), load_pretrained(work / "exported")
    assert (from_ckpt.source, from_export.source) == ("checkpoint", "safetensors")
    a, b = from_ckpt.model, from_export.model
    assert model_dims(b) == model_dims(a)  # heads come from the export's config.json
    assert (b.img_size, b.num_classes, b.pool) == (a.img_size, a.num_classes, a.pool) == (32, 5, "token")
    assert from_export.state_dict.keys() == from_ckpt.state_dict.keys()
    assert all(torch.equal(from_export.state_dict[k], v) for k, v in from_ckpt.state_dict.items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(build_pretrained(from_export).eval()(x), build_pretrained(from_ckpt).eval()(x))
