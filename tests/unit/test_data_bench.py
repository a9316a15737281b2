"""bench/data.py's decode row of bench/gpu.sh, run on CPU at a tiny size: the GPU path's code (device "cpu")
against the CPU path on the same shards, in alternating rounds, as the GPU machine will run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RATE = r"([\d.]+) images/s wall, +([\d.]+) images per CPU-second  \(median\)"


def test_compare_decode_row_runs_both_paths_on_the_same_shards(tmp_path):
    args = "--compare-decode --device cpu --images 16 --size 300x200 --measure 32 --rounds 2 --workers 1 --batch 8"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "data.py"), *args.split(), "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("corpus: 16 JPEGs 300x200 q90") and ", 2 rounds, " in lines[0]
    assert lines[1].startswith("vit-scale data.decode=cpu:")
    assert lines[2].startswith("vit-scale data.decode=gpu (cpu):")
    rates = [re.search(RATE, line) for line in lines[1:3]]
    assert all(r and float(r[1]) > 0 and float(r[2]) > 0 for r in rates)
    per_round = r"ratio: [\d.]+x wall, [\d.]+x per CPU-second \(median of rounds; per round: [\d.]+, [\d.]+\)"
    assert re.fullmatch(per_round, lines[3])
    assert len(list((tmp_path / "imagefolder").rglob("*.jpg"))) == 16
    assert (tmp_path / "shards" / "index.json").exists()
