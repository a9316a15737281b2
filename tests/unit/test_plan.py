"""`vit-scale plan`: the command's output, its errors, --fit for the paper's H/14 recipe, and the planner's
arithmetic where it can be written out by hand. The model-state, communication and activation figures are
checked against the real engine in tests/dist/test_plan_validation.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from vit_scale.cli import main as cli_main
from vit_scale.commands import plan as command
from vit_scale.config import load_config
from vit_scale.errors import UserError
from vit_scale.plan import cluster, fit, gpu_from_constraint, load_table, lookup, make_plan, zero
from vit_scale.plan.layout import layout

ROOT = Path(__file__).resolve().parents[2]
H14 = str(ROOT / "configs" / "pretrain" / "vit_h14_jft.yaml")
B16 = str(ROOT / "configs" / "pretrain" / "vit_b16_in21k.yaml")


def run(capsys, *argv) -> str:
    assert command.main(list(argv)) == 0
    return capsys.readouterr().out


def test_table_and_json_carry_the_same_numbers(capsys):
    args = [H14, "--gpu", "h100-80gb", "--nodes", "4", "--epoch-size", "303000000"]
    d = json.loads(run(capsys, *args, "--json"))
    text = run(capsys, *args)
    assert f"{d['total_gib']:8.2f}  of 79.1 GiB: fits" in text
    for row in d["memory"]:
        assert f"{row['label']:<60} {row['gib']:8.2f}  {row['where']}" in text
    t = d["time"]
    assert f"{t['step_s'] * 1e3:8.1f}" in text
    assert f"{t['images_per_s_per_gpu']:,.0f} images/s per GPU, {t['images_per_s']:,.0f} in total" in text
    assert f"{d['cost']['steps']:,} steps" in text and f"{d['cost']['gpu_hours']:,.0f} GPU-hours" in text
    # the recipe's own length: 14 epochs of 303M images at batch 4096
    assert d["cost"]["steps"] == 1035645
    assert d["config"]["world_size"] == 32 and d["config"]["micro_batch_per_rank"] == 128


def test_fit_finds_a_configuration_for_h14_on_80gb_at_batch_4096(capsys):
    """The paper's global batch on one node of eight 80 GB GPUs: 512 images per GPU per step."""
    out = json.loads(run(capsys, H14, "--gpu", "a100-80gb", "--nodes", "1", "--fit", "--json"))
    assert out["fits"] and out["total_gib"] <= 79.2
    overrides = out["fit_overrides"]
    cfg = load_config(H14, overrides)
    assert cfg.train.global_batch == 4096
    assert cfg.train.micro_batch_per_rank * cfg.train.grad_accum * 8 == 4096
    # applying the printed overrides reproduces the plan that fits
    again = make_plan(cfg, cluster(lookup("a100-80gb"), 1, 8)).to_dict()
    assert again["fits"] and again["total_gib"] == pytest.approx(out["total_gib"])
    # nothing faster fits: the plan without checkpointing at the same micro batch does not fit, or is slower
    assert out["time"]["images_per_s"] > 0


def test_the_configured_h14_recipe_on_one_node_does_not_fit_and_says_which_term(capsys):
    """Batch 4096 on 8 GPUs with the recipe's micro batch derived as 512 per GPU: the activations are the
    problem, the plan names them, and the cli turns it into no error (a plan is not a failure)."""
    d = json.loads(run(capsys, H14, "--gpu", "a100-80gb", "--json"))
    assert not d["fits"] and d["offending"].startswith("activations saved for backward (micro batch 512)")
    assert d["largest_micro_batch"] < 512 and d["largest_valid_micro_batch"] in (64, 128, 256)


def test_grid_prints_one_row_per_combination(capsys):
    out = run(capsys, B16, "--gpu", "a100-80gb,h200-141gb", "--grid", "parallel.zero_stage=1,3",
              "--grid", "parallel.activation_checkpointing=false,true")
    rows = [line.split() for line in out.splitlines() if line.startswith(("a100", "h200"))]
    assert len(rows) == 8
    assert rows[0][:4] == ["a100-80gb", "1", "parallel.zero_stage=1", "parallel.activation_checkpointing=false"]
    micro = {(r[0], r[2], r[3]): int(r[4]) for r in rows}
    # checkpointing lets a larger micro batch fit; the H200's memory too
    assert micro["a100-80gb", "parallel.zero_stage=1", "parallel.activation_checkpointing=true"] >= micro[
        "a100-80gb", "parallel.zero_stage=1", "parallel.activation_checkpointing=false"]
    assert micro["h200-141gb", "parallel.zero_stage=1", "parallel.activation_checkpointing=false"] >= micro[
        "a100-80gb", "parallel.zero_stage=1", "parallel.activation_checkpointing=false"]


def test_summary_rows_per_node_count_show_scaling_and_cost(capsys):
    rows = json.loads(run(capsys, B16, "--gpu", "a100-80gb", "--nodes", "1,4,16", "--summary", "--json",
                          "--epoch-size", "14200000"))
    assert [r["nodes"] for r in rows] == [1, 4, 16]
    assert rows[0]["scaling_efficiency_vs_one_node"] == 1.0
    assert rows[2]["scaling_efficiency_vs_one_node"] < rows[1]["scaling_efficiency_vs_one_node"] < 1
    # the same images at lower per-GPU speed: more GPU-hours, fewer wall hours
    assert rows[2]["gpu_hours"] > rows[0]["gpu_hours"] and rows[2]["wall_hours"] < rows[0]["wall_hours"]


def test_compute_time_is_the_flops_over_peak_at_the_mfu():
    """One GPU, no communication: the step is the FLOPs over the peak at the MFU, plus Adam's update of
    every parameter at 32 bytes each over 70% of the memory bandwidth."""
    cfg = load_config(B16, ["train.global_batch=64", "parallel.zero_stage=1"])
    d = make_plan(cfg, cluster(lookup("h100-80gb"), 1, 1, mfu=0.5)).to_dict()
    assert d["time"]["collectives"] == []
    compute = 64 * d["time"]["flops_per_image"] / (989e12 * 0.5)
    assert d["time"]["compute_s"] == pytest.approx(compute)
    assert d["time"]["optimizer_s"] == pytest.approx(32 * d["config"]["params"] / (3.35e12 * 0.7), rel=1e-3)
    assert d["time"]["images_per_s"] == pytest.approx(64 / (compute + d["time"]["optimizer_s"]))
    ckpt = load_config(B16, ["train.global_batch=64", "parallel.activation_checkpointing=true"])
    c = make_plan(ckpt, cluster(lookup("h100-80gb"), 1, 1, mfu=0.5)).to_dict()
    # every block recomputed: 12 blocks' forward again, a little under a third more work
    assert c["time"]["recompute_flops_per_image"] == pytest.approx(d["time"]["flops_per_image"] / 3, rel=0.02)
    assert c["activations"]["configured_gib"] < d["activations"]["configured_gib"] / 5


def test_zero_stages_and_offload_move_memory_where_they_should():
    def plan(*overrides):
        cfg = load_config(H14, ["train.micro_batch_per_rank=16", *overrides])
        return make_plan(cfg, cluster(lookup("a100-80gb"), 1, 8)).to_dict()

    def states(d):  # stage 1 holds every gradient whole until the end of backward, stage 2 a partition
        keys = {"params", "params_persistent", "grads", "grads_in_flight", "master", "optim"}
        return sum(r["gib"] for r in d["memory"] if r["key"] in keys and r["where"] == "device")

    s1, s2, s3 = (plan(f"parallel.zero_stage={s}") for s in (1, 2, 3))
    assert states(s3) < states(s2) < states(s1)
    off = plan("parallel.zero_stage=3", "parallel.offload_optimizer=true", "parallel.offload_params=true")
    assert states(off) < states(s3) / 4
    # Adam's moments and the fp32 master weights of 654M parameters, per 8-GPU node: 12 bytes each, plus
    # the fp32 and 16-bit gradient partitions and the 16-bit parameter partitions
    host = off["host_gib_per_node"]
    assert host == pytest.approx(654.2e6 * (12 + 4 + 2 + 2) / 2**30, rel=0.01)


def test_zero1_keeps_the_whole_16_bit_model_and_the_worst_rank_is_reported():
    cfg = load_config(B16, ["train.global_batch=64", "parallel.zero_stage=1"])
    lay, z = layout(cfg), zero.zero_settings(cfg, 8)
    worst = zero.worst_rank(lay, 8)
    held = [sum(zero.params_in_partition(lay.group_numels(g), 8, r) for g in range(len(lay.groups)))
            for r in range(8)]
    assert held[worst] == max(held) and max(held) > lay.total / 8
    params = next(t for t in zero.model_states(lay, z, worst, "idle") if t.key == "params")
    assert params.bytes == 2 * sum(zero.flat_numel(lay.group_numels(g), 8) for g in range(len(lay.groups)))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_polyak_averaging_costs_one_more_fp32_copy_of_the_ranks_master_weights(stage):
    """optim.ema_decay keeps the average where the fp32 master weights live (vit_scale.train.average), so
    each stage's plan grows by exactly the master term: the whole model without ZeRO, a partition with."""
    cfg = load_config(ROOT / "configs" / "finetune" / "imagenet_vit_b16.yaml", [f"parallel.zero_stage={stage}"])
    assert cfg.optim.ema_decay == 0.9999
    lay = layout(cfg)
    with_average = zero.model_states(lay, zero.zero_settings(cfg, 8), 0, "idle")
    cfg.optim.ema_decay = 0.0
    without = zero.model_states(lay, zero.zero_settings(cfg, 8), 0, "idle")
    added = [t for t in with_average if t not in without]
    master = next(t for t in without if t.key == "master")
    assert [(t.key, t.bytes, t.where, t.dtype) for t in added] == [("average", master.bytes, master.where, "fp32")]
    assert master.bytes == (4 * lay.total if stage == 0 else pytest.approx(4 * lay.total / 8, rel=0.01))


def test_scaling_across_nodes_pays_for_stage_1_collectives_over_the_network():
    cfg = load_config(B16, ["train.micro_batch_per_rank=32"])
    one = make_plan(cfg, cluster(lookup("a100-80gb"), 2, 8)).to_dict()["time"]
    many = make_plan(cfg, cluster(lookup("a100-80gb"), 16, 8)).to_dict()["time"]
    assert 0 < many["scaling_efficiency_vs_one_node"] < one["scaling_efficiency_vs_one_node"] < 1
    assert many["bus_gbs"] == 25.0  # 200 Gb/s per GPU between nodes


def test_gpu_table_rows_can_be_overridden_and_added(tmp_path):
    table = tmp_path / "gpus.yaml"
    table.write_text("h100-80gb: {memory_gib: 70}\nb200-192gb: {memory_gib: 180, peak_tflops: 2250, "
                     "intra_node_gbs: 700, inter_node_gbps: 400, pcie_gbs: 50, hbm_tbs: 8}\n")
    rows = load_table(table)
    assert rows["h100-80gb"].memory_gib == 70 and rows["h100-80gb"].peak_tflops == 989
    assert rows["b200-192gb"].peak_tflops == 2250 and rows["b200-192gb"].reserve_gib == 1.0
    table.write_text("h100-80gb: {memroy_gib: 70}\n")
    with pytest.raises(UserError, match=r"unknown fields \['memroy_gib'\]"):
        load_table(table)


@pytest.mark.parametrize(
    ("constraint", "gpu"),
    [("a100&ib", "a100-40gb"), ("h100", "h100-80gb"), ("a100-80gb", "a100-80gb"), ("a100|a100-80gb", "a100-40gb"),
     ("H200&nvlink", "h200-141gb"), ("a100|h100", None), ("ib&bigmem", None)],
)
def test_slurm_constraints_map_to_a_gpu_only_when_they_name_one_model(constraint, gpu):
    assert gpu_from_constraint(constraint) == gpu


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--gpu", "tpu-v4"], "unknown GPU 'tpu-v4'; known: a100-40gb"),
        (["--gpu", "h100-80gb", "--nodes", "0"], "--nodes must be at least 1, got 0"),
        (["--gpu", "h100-80gb", "--nodes", "two"], "--nodes 'two' must be a number"),
        (["--gpu", "h100-80gb", "--mfu", "45"], "--mfu must be in (0, 1], got 45.0"),
        (["--gpu", "h100-80gb", "--grid", "parallel.zero_stage"], "--grid 'parallel.zero_stage' must look like"),
        (["--gpu", "h100-80gb", "model.dept=3"], "unknown config key 'model.dept'"),
        (["--gpu", "h100-80gb", "--gpus-per-node", "7"], "train.global_batch=4096 is not divisible"),
        (["--gpu", "h100-80gb", "--gpu-table", "/nonexistent.yaml"], "--gpu-table /nonexistent.yaml does not exist"),
        (["--nodes", "2"], "the following arguments are required: --gpu"),
    ],
)
def test_bad_input_is_a_one_line_error(capsys, argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        command.main([H14, *argv])
    assert cli_main(["plan", H14, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vit-scale plan: error:") and "\n" not in err


def test_fit_refuses_when_nothing_fits(capsys, tmp_path):
    """2 GiB: the reduce bucket DeepSpeed allocates (500M elements) and the context alone exceed it."""
    table = tmp_path / "gpus.yaml"
    table.write_text("a100-40gb: {memory_gib: 2}\n")
    assert fit(load_config(H14, []), cluster(load_table(table)["a100-40gb"], 1, 8)) is None
    assert cli_main(["plan", H14, "--gpu", "a100-40gb", "--gpu-table", str(table), "--fit"]) == 2
    assert "no configuration of ZeRO stage, offload, activation checkpointing and micro batch fits" in (
        capsys.readouterr().err)
