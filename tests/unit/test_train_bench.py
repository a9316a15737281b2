"""The Python part of bench/gpu.sh, run on CPU at a tiny size: every eager row of the table is produced
from real training steps, with MFU computed from the analytic FLOPs and the given peak, and our rows carry
the planner's prediction for the same setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vit_scale.dist import free_port

ROOT = Path(__file__).resolve().parents[2]

TINY = "--width 32 --depth 1 --heads 2 --img 32 --batch 4 --steps 2 --warmup 1".split()


def run_bench(mode: str, out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """bench/train_step.py MODE at the tiny size, writing its JSON result to `out`."""
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_step.py"), mode, *TINY, *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", **env},
    )


def test_gpu_table_runs_on_cpu_at_a_tiny_size(tmp_path):
    out = tmp_path / "gpu.json"
    # one rank started directly, without torch.distributed.run's agent
    rank = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = run_bench(
        "gpu",
        out,
        "--variant",
        "vit_ti16",
        "--dtype",
        "fp32",
        "--peak-tflops",
        "0.001",
        "--skip-compile",
        **rank,
        MASTER_PORT=str(free_port()),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["setting"] for r in result["rows"]] == [
        "ours ZeRO-1",
        "ours ZeRO-1 + act-ckpt",
        "timm + autocast",
    ]
    # the analytic training FLOPs of this tiny ViT, written out: 16-px patch embedding, one block of 4 + 1
    # tokens, a 1000-way head; training counts as 3 x forward
    n, w, mlp, patches = 5, 32, 128, 4
    forward = (
        2 * patches * (3 * 16 * 16) * w + 2 * n * w * 3 * w + 4 * n * n * w + 2 * n * w * w + 4 * n * w * mlp
    )
    flops = 3 * (forward + 2 * w * 1000)
    for r in result["rows"]:
        assert r["images_per_s"] > 0
        assert r["mfu"] == pytest.approx(r["images_per_s"] * flops / 1e12 / 0.001, rel=2e-3, abs=1e-3)
    ours, ckpt, plain = result["rows"]
    # One rank, no communication: the planner's step is the batch's FLOPs at its MFU of the peak, plus Adam's
    # update of every parameter (32 bytes each at 70% of the nominal 0.1 TB/s it gives a CPU); checkpointing
    # the one block adds its forward again.
    params = 3 * 16 * 16 * w + w + w + n * w + 4 * w + 3 * w * w + 3 * w + w * w + w + 2 * w * mlp + mlp + w + 2 * w
    params += w * 1000 + 1000
    step = 4 * flops / (0.001e12 * ours["predicted_mfu"]) + 32 * params / (0.1e12 * 0.7)
    assert ours["predicted_images_per_s"] == pytest.approx(4 / step, rel=2e-3)
    assert ckpt["predicted_images_per_s"] < ours["predicted_images_per_s"]
    assert 0 < ours["predicted_peak_mem_gb"] and "predicted_peak_mem_gb" not in plain
    assert "| ours ZeRO-1 + act-ckpt" in proc.stdout and "predicted images/s" in proc.stdout


def test_cpu_comparison_runs_both_loops_on_two_ranks_and_reports_their_ratio(tmp_path):
    """`bench/train_step.py cpu` at a tiny size: both loops ran on 2 gloo ranks, and the ratio and the
    extra milliseconds per step are the ones the two rates give."""
    out = tmp_path / "cpu.json"
    proc = run_bench("cpu", out, "--rounds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["world_size"], r["zero_stage"], r["micro_batch_per_rank"]) == (2, 1, 4)
    assert r["ours_images_per_s"] > 0 and r["ddp_images_per_s"] > 0
    assert r["ratio"] == pytest.approx(r["ours_images_per_s"] / r["ddp_images_per_s"], abs=2e-3)
    extra = 1000 * 8 * (1 / r["ours_images_per_s"] - 1 / r["ddp_images_per_s"])
    assert r["extra_ms_per_step"] == pytest.approx(extra, rel=1e-2, abs=0.2)
    assert f"ratio {r['ratio']}" in proc.stdout
