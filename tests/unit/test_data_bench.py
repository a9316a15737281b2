"""bench/data.py's decode row of bench/gpu.sh, run on CPU at a tiny size: the GPU path's code (device "cpu")
against the CPU path on the same shards, as the GPU machine will run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_compare_decode_row_runs_both_paths_on_the_same_shards(tmp_path):
    args = (
        "--compare-decode --device cpu --images 16 --size 300x200 --measure 32 --workers 1 --batch 8".split()
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "data.py"), *args, "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("corpus: 16 JPEGs 300x200 q90") and "load average" in lines[0]
    rates = [
        re.search(r"([\d.]+) images/s wall, +([\d.]+) images per CPU-second", line) for line in lines[1:3]
    ]
    assert lines[1].startswith("vit-scale data.decode=cpu:") and lines[2].startswith(
        "vit-scale data.decode=gpu (cpu):"
    )
    assert all(r and float(r[1]) > 0 and float(r[2]) > 0 for r in rates)
    assert re.fullmatch(r"ratio: [\d.]+x wall, [\d.]+x per CPU-second", lines[3])
    assert (
        len(list((tmp_path / "imagefolder").rglob("*.jpg"))) == 16
        and (tmp_path / "shards" / "index.json").exists()
    )
