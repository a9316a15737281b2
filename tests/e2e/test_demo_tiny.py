"""`vit-scale demo` end to end at a tiny size: every stage runs as the real command, and the final table
compares the glyph-pretrained model with the same architecture from random weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.e2e


def _committed(run_dir):
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return run_dir / "checkpoints" / latest / "COMMITTED"


# At this size (8 glyph classes x 64 images, 80 pretraining steps, 60 fine-tuning steps) the demo measured
# 41.4% (pretrained) against 16.0% (scratch) on this machine's CPU type (AMD EPYC, AVX-512 with bf16), with
# pretraining's loss 2.085 -> 1.193 (chance ln 8 = 2.08); before main's sample-granular data split changed
# the fine-tune's data order it measured 50.4% against 15.6%. With other kernels on the same machine
# (ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE, the way the README measures the spread) 47.2% against 16.0%,
# pretraining's loss ending at 1.035. From a zero head, 60 SGD steps leave a model with nothing to build on
# near chance (scratch's loss is still ln 10 at step 60), while pretrained features get it moving within 30
# steps. A model that learnt nothing scores at most
# 10% + 3 x 1.3% = 14% on the 500 test digits (binomial spread at chance), so PRETRAINED_AT_LEAST is far
# above that and 11 points below the lowest measured figure, room for other CPUs' rounding.
# Time: 112 s on the 2 shared cores at load average 2-3, 153 s at ~6 (about 125 CPU-seconds, most of it the
# start-up of three 2-rank training stages); not measured on an idle machine.
PRETRAINED_AT_LEAST = 0.30
GAP_AT_LEAST = 0.15


def test_tiny_demo_runs_every_stage_and_prints_the_comparison(tmp_path):
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--out",
        str(out),
        "--classes",
        "8",
        "--per-class",
        "64",
        "--pretrain-steps",
        "80",
        "--finetune-steps",
        "60",
        "--workers",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    proc = subprocess.run(
        [sys.executable, "-m", "vit_scale.cli", *argv], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert {name: s["status"] for name, s in stages.items() if s["status"] != "done"} == {}
    finetuned = summary["digits_top1"]["fine-tuned 60 steps"]
    assert set(summary["digits_top1"]) == {"fine-tuned 60 steps"} | {
        f"frozen, {k}-shot linear" for k in (1, 5, 10, 25)
    }
    # The paper's claim in miniature: pretraining (on glyphs, no digits) makes the same fine-tune budget
    # reach far more than chance, and more than the same steps from scratch.
    assert finetuned["pretrained"] >= PRETRAINED_AT_LEAST, finetuned
    assert finetuned["pretrained"] - finetuned["baseline"] >= GAP_AT_LEAST, finetuned
    # The probe on frozen features works: with 25 shots of each digit either model's features score far above
    # chance (measured 85.5% pretrained, 85.9% random init).
    assert min(summary["digits_top1"]["frozen, 25-shot linear"].values()) >= 0.6
    # The printed table carries the same numbers as the summary.
    assert "what pretraining on glyphs (no digits) bought" in proc.stdout
    assert f"{100 * finetuned['pretrained']:.1f}%" in proc.stdout
    assert f"{100 * finetuned['baseline']:.1f}%" in proc.stdout

    runs = out / "runs"
    pretrain = runs / "pretrain"
    assert _committed(pretrain).exists()
    config = yaml.safe_load((pretrain / "config.yaml").read_text())
    # The demo promises ZeRO-2 over two processes, bf16 and activation checkpointing.
    assert config["parallel"]["zero_stage"] == 2 and config["parallel"]["activation_checkpointing"] is True
    assert config["precision"]["dtype"] == "bf16" and config["train"]["steps"] == 80
    metrics = [json.loads(line) for line in (pretrain / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m and m["step"] == 80 for m in metrics)
    assert stages["pretrain"]["images_per_s"] > 0

    for name, init in (("finetune_pretrained", pretrain), ("finetune_scratch", runs / "random_init")):
        assert _committed(runs / name).exists()
        results = json.loads((runs / name / "results.json").read_text())
        assert results["datasets"]["digits"]["n"] == 500
        assert results["details"]["img_size"] == 32  # fine-tuned above the 24 px of pretraining
        assert results["details"]["init"]["path"].startswith(str(init))
    assert (out / "report" / "index.html").exists()


def test_demo_refuses_an_out_directory_it_did_not_make(tmp_path):
    from vit_scale.commands.demo import main
    from vit_scale.errors import UserError

    (tmp_path / "precious.txt").write_text("not the demo's")
    with pytest.raises(UserError, match="was not made by `vit-scale demo`"):
        main(["--out", str(tmp_path)])
    assert (tmp_path / "precious.txt").read_text() == "not the demo's"


def test_demo_refuses_more_glyph_classes_than_there_are(tmp_path):
    from vit_scale.commands.demo import main
    from vit_scale.errors import UserError

    with pytest.raises(UserError, match="the glyphs have 65 classes"):
        main(["--out", str(tmp_path / "demo"), "--classes", "66"])
    assert not (tmp_path / "demo").exists()
