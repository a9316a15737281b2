"""A plan as the readable table `vit-scale plan` and `vit-scale slurm` print. Every figure comes from
`Plan.to_dict()`, the same object `--json` prints, so the two cannot disagree."""

from __future__ import annotations


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def _checkpointing(c: dict) -> str:
    if not c["activation_checkpointing"]:
        return "no activation checkpointing"
    k = c["checkpoint_every_k_blocks"]
    every = "every block" if k == 1 else f"every {_ordinal(k)} block"
    return f"activation checkpointing {every} ({c['checkpointed_blocks']} of {c['depth']} blocks)"


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def describe(c: dict) -> str:
    offload = []
    if c["offload_optimizer"]:
        offload.append("optimizer")
    if c["offload_params"]:
        offload.append("parameters")
    off = f", offloading the {' and '.join(offload)} to the host" if offload else ""
    return f"ZeRO-{c['zero_stage']}{off}, {_checkpointing(c)}"


def memory_lines(d: dict) -> list[str]:
    phase = "in backward" if d["peak_phase"] == "backward" else "in the optimizer step"
    lines = [f"{'Memory per GPU (peak ' + phase + ')':<62} {'GiB':>8}  where"]
    for r in d["memory"]:
        note = "" if r["counted"] else "  (not added: the larger of it and the activations counts)"
        lines.append(f"  {r['label']:<60} {r['gib']:8.2f}  {r['where']}{note}")
    lines.append(f"  {'allocated peak (torch.cuda.max_memory_allocated)':<60} {d['device_gib']:8.2f}")
    lines.append(f"  {'allowance: CUDA context, workspaces, fragmentation':<60} {d['allowance_gib']:8.2f}")
    verdict = "fits" if d["fits"] else f"DOES NOT FIT: {d['offending']} is the largest term"
    lines.append(f"  {'total':<60} {d['total_gib']:8.2f}  of {d['capacity_gib']:g} GiB: {verdict}")
    if d["host_gib_per_node"]:
        lines.append(f"  host memory per node for offloaded states: {d['host_gib_per_node']:.1f} GiB")
    return lines


def render(d: dict) -> str:
    c, t, a, cost = d["config"], d["time"], d["activations"], d["cost"]
    lines = [
        f"{c['variant']} at {c['img_size']} px, {c['dtype']}, {c['optimizer']} ({c['params'] / 1e6:.1f}M parameters)"
        f" on {c['nodes']} node(s) x {c['gpus_per_node']} {c['gpu']} ({c['world_size']} GPUs)",
        f"{describe(c)}; micro batch {c['micro_batch_per_rank']} x {c['grad_accum']} accumulation x "
        f"{c['world_size']} GPUs = global batch {c['global_batch']}",
        "",
        *memory_lines(d),
        "",
        f"Activations per micro batch of {c['micro_batch_per_rank']}: {a['configured_gib']:.2f} GiB as configured, "
        f"{a['without_checkpointing_gib']:.2f} without checkpointing, {a['every_block_gib']:.2f} checkpointing "
        "every block",
    ]
    valid = d["largest_valid_micro_batch"]
    if d["largest_micro_batch"]:
        lines.append(
            f"Fit: the largest micro batch that fits is {d['largest_micro_batch']}"
            + (f"; the largest that divides the global batch, {valid}" if valid else "; none divides the global batch")
        )
    else:
        lines.append("Fit: not even a micro batch of 1 fits this configuration")
    compute = f"compute ({t['flops_per_image'] / 1e9:.0f} GFLOP/image"
    if t["recompute_flops_per_image"]:
        compute += f" + {t['recompute_flops_per_image'] / 1e9:.0f} recomputed"
    compute += f", MFU {c['mfu']:.0%})"
    lines += ["", f"{'Time per optimizer step':<62} {'ms':>8}", f"  {compute:<60} {t['compute_s'] * 1e3:8.1f}"]
    for col in t["collectives"]:
        how = "overlapped with compute" if col["overlapped"] else "not overlapped"
        lines.append(
            f"  {col['label'] + ' (' + _gb(col['bytes']) + ')':<60} {col['seconds'] * 1e3:8.1f}  {how}"
            + (f", {col['exposed_s'] * 1e3:.1f} exposed" if col["overlapped"] else "")
        )
    if t["optimizer_s"]:
        lines.append(f"  {'optimizer step (memory-bound)':<60} {t['optimizer_s'] * 1e3:8.1f}")
    if t["offload_s"]:
        lines.append(f"  {'offload: PCIe copies and the host optimizer':<60} {t['offload_s'] * 1e3:8.1f}")
    lines.append(f"  {'step':<60} {t['step_s'] * 1e3:8.1f}")
    lines.append(
        f"Throughput: {t['images_per_s_per_gpu']:,.0f} images/s per GPU, {t['images_per_s']:,.0f} in total; "
        f"scaling efficiency against one node {t['scaling_efficiency_vs_one_node']:.1%}"
    )
    if cost.get("steps") is not None:
        lines.append(
            f"Cost: {cost['steps']:,} steps ({cost['steps_from']}): {cost['wall_hours']:,.1f} h wall, "
            f"{cost['gpu_hours']:,.0f} GPU-hours"
        )
    else:
        lines.append(f"Cost: unknown ({cost['steps_from']})")
    lines += ["", "Assumptions:"] + [f"  - {x}" for x in d["assumptions"]]
    return "\n".join(lines)
