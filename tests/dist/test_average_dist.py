"""Polyak averaging of the parameters (optim.ema_decay) through the real DeepSpeed engine on 2 CPU ranks:
what it averages under every ZeRO stage, that it resumes bit for bit after a kill and continues across a
change of the number of processes, and that evaluation and export use it."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_helpers as h
from vit_scale.checkpoint import load_consolidated_state_dict
from vit_scale.checkpoint.average import AVERAGE, read_average
from vit_scale.checkpoint.commit import rank_file_name
from vit_scale.config import load_config
from vit_scale.models import build_model

pytestmark = pytest.mark.dist
DECAY = 0.8  # far from 1, so that four steps move the average visibly away from both ends


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return h.make_shards(tmp_path_factory.mktemp("shards"))


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:09d}"


def initial_weights(dtype: str) -> dict[str, torch.Tensor]:
    """The tiny recipe's weights before step 1 (the loop seeds train.seed and builds the model), as the
    optimizer's fp32 master copy holds them: rounded through bf16 when the model trains in bf16."""
    cfg = load_config(h.TINY, [])
    torch.manual_seed(cfg.train.seed)
    sd = build_model(cfg.model).state_dict()
    cast = torch.bfloat16 if dtype == "bf16" else torch.float32
    return {k: v.detach().to(cast).float() for k, v in sd.items()}


def fp32_masters(path: Path, stage: int, dtype: str) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 master weights saved in checkpoint `path`."""
    if stage == 0 and dtype == "bf16":
        # 16-bit without ZeRO: DeepSpeed's optimizer saves one fp32 copy per parameter, in our param groups.
        from vit_scale.train.engine import param_groups

        cfg = load_config(h.TINY, [])
        model = build_model(cfg.model)
        names = {id(p): n for n, p in model.named_parameters()}
        states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        groups = states["optimizer"]["fp32_groups"]
        order = [names[id(p)] for g in param_groups(model, cfg.optim.weight_decay) for p in g["params"]]
        return dict(zip(order, (t for g in groups for t in g)))
    return load_consolidated_state_dict(path, averaged=False)[0]


@pytest.mark.parametrize("stage, dtype", [(0, "fp32"), (0, "bf16"), (1, "fp32"), (2, "bf16"), (3, "fp32")])
def test_the_average_is_the_polyak_average_of_each_ranks_fp32_masters(tmp_path, shards, stage, dtype):
    """After step k the saved average equals a_k = decay * a_{k-1} + (1 - decay) * w_k over the fp32 master
    weights w_k of that step's checkpoint, bit for bit, from a_0 = the initial weights; each rank keeps only
    its ZeRO partition (all of it without ZeRO)."""
    # No weight decay: DeepSpeed's 16-bit optimizer without ZeRO builds its state with a zero-gradient step,
    # which with decoupled decay shrinks the fp32 masters (not the bf16 weights) before step 1; without it
    # the masters start at the initial weights in every layout, and a_0 is known.
    args = ("train.steps=4", "checkpoint.every_steps=1", "checkpoint.keep_last=4", f"optim.ema_decay={DECAY}",
            f"parallel.zero_stage={stage}", f"precision.dtype={dtype}", "optim.weight_decay=0")  # fmt: skip
    proc = h.pretrain(tmp_path, shards, *args)
    assert proc.returncode == 0, h.tail(proc)
    want = initial_weights(dtype)
    for step in range(1, 5):
        masters = fp32_masters(ckpt(tmp_path, step), stage, dtype)
        for name in want:
            want[name].lerp_(masters[name], 1 - DECAY)
        got = read_average(ckpt(tmp_path, step))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want), step
    assert not any(torch.equal(got[n], masters[n]) for n in ("patch_embed.proj.weight", "head.weight"))

    total = sum(v.numel() for v in want.values())
    held = []
    for r in range(2):
        own = torch.load(ckpt(tmp_path, 4) / rank_file_name(r), map_location="cpu", weights_only=False)
        held.append(sum(s["value"].numel() for s in own[AVERAGE]["params"].values()))
    if stage == 0:
        assert held == [total, total]  # nothing is partitioned: every rank averages every parameter
    else:
        assert sum(held) == total and all(0 < n < total for n in held)  # each its own partition


STEPS_20 = ("train.steps=20", "checkpoint.every_steps=10", "optim.ema_decay=0.9", "parallel.zero_stage=3")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> Path:
    """20 uninterrupted steps on 2 processes, ZeRO-3 (partitioned parameters), averaging at 0.9."""
    run = tmp_path_factory.mktemp("reference")
    proc = h.pretrain(run, shards, *STEPS_20)
    assert proc.returncode == 0, h.tail(proc)
    return run


def test_the_average_resumes_bit_exactly_after_a_sigkill(tmp_path, shards, reference):
    seed = int(os.environ.get("VIT_SCALE_TEST_SEED") or random.SystemRandom().randrange(2**32))
    kill_after = random.Random(seed).randint(11, 18)
    print(f"kill after step {kill_after} (replay with VIT_SCALE_TEST_SEED={seed})")
    proc, _ = h.start_until_step(tmp_path, shards, *STEPS_20, step=kill_after)
    h.kill_run(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (ckpt(tmp_path, 20) / "COMMITTED").exists()

    resumed = h.pretrain(tmp_path, shards, *STEPS_20)
    assert resumed.returncode == 0, h.tail(resumed)
    assert "resumed from" in resumed.stderr and "step_000000010" in resumed.stderr
    assert h.losses(tmp_path) == h.losses(reference), f"VIT_SCALE_TEST_SEED={seed}"
    got, want = read_average(ckpt(tmp_path, 20)), read_average(ckpt(reference, 20))
    assert h.same_weights(got, want), f"VIT_SCALE_TEST_SEED={seed}"
    raw = load_consolidated_state_dict(ckpt(reference, 20), averaged=False)[0]
    assert h.same_weights(load_consolidated_state_dict(ckpt(tmp_path, 20), averaged=False)[0], raw)
    assert not h.same_weights(want, raw)


def test_the_average_continues_when_one_process_resumes_what_two_wrote(tmp_path, shards, reference):
    """The step-10 average of two ZeRO-3 ranks, put together from both rank files and sliced for one
    process, is the start of step 11's: a_11 = 0.9 * a_10 + 0.1 * w_11."""
    args = ("train.steps=11", "checkpoint.every_steps=0", "optim.ema_decay=0.9", "parallel.zero_stage=3")
    proc = h.pretrain(tmp_path, shards, *args, f"resume={ckpt(reference, 10)}", nproc=1)
    assert proc.returncode == 0, h.tail(proc)
    assert "written by 2 processes and 1 run now" in proc.stderr
    want = read_average(ckpt(reference, 10))
    masters = load_consolidated_state_dict(ckpt(tmp_path, 11), averaged=False)[0]
    for name in want:
        want[name].lerp_(masters[name], 0.1)
    assert h.same_weights(read_average(ckpt(tmp_path, 11)), want)


def test_evaluation_and_export_use_the_average(tmp_path, shards):
    """The module each training hook evaluates and the one `train` returns for scoring hold the average of
    that step; `vit-scale export` and weight import (`vit-scale eval`, `init=` a run) read it too, and
    `export --raw` the trained parameters."""
    from safetensors.torch import load_file

    from vit_scale.checkpoint.weights import load_pretrained
    from vit_scale.cli import main as cli

    run, seen_file = tmp_path / "run", tmp_path / "seen.pt"
    args = [f"data.train={shards}", "train.steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
            "optim.ema_decay=0.5", "data.workers=0"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("average_worker.py")), str(h.TINY), str(run), str(seen_file),
         *args],
        cwd=h.ROOT, env=h.env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, h.tail(proc)
    seen = torch.load(seen_file)
    averages = {step: read_average(ckpt(run, step)) for step in (2, 4)}
    raw = load_consolidated_state_dict(ckpt(run, 4), averaged=False)[0]
    assert [h.same_weights(s, averages[step]) for s, step in zip(seen["hooks"], (2, 4))] == [True, True]
    assert h.same_weights(seen["final"], averages[4]) and not h.same_weights(averages[4], raw)

    assert cli(["export", str(run), "--out", str(tmp_path / "avg")]) == 0
    assert cli(["export", str(run), "--out", str(tmp_path / "raw"), "--raw"]) == 0
    assert h.same_weights(load_file(tmp_path / "avg" / "model.safetensors"), averages[4])
    assert h.same_weights(load_file(tmp_path / "raw" / "model.safetensors"), raw)
    assert h.same_weights(load_pretrained(run).state_dict, averages[4])
