"""The GPU table the planner works from, and the assumptions about hardware it cannot measure from here.

Every figure is a stated assumption, overridable per run (`vit-scale plan --gpu-table FILE`, a YAML
mapping of rows merged over this table, or the single-value flags). Memory is what CUDA reports as the
device total (`torch.cuda.get_device_properties(0).total_memory`), which is a little under the marketing
figure; peak TFLOP/s are NVIDIA's dense bf16 tensor-core figures, the same ones `vit_scale.observe.metrics`
uses for MFU.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from vit_scale.errors import UserError

GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # device total as CUDA reports it
    peak_tflops: float  # dense bf16 tensor-core peak
    intra_node_gbs: float  # NCCL bus bandwidth between the GPUs of one node, GB/s
    inter_node_gbps: float  # network bandwidth per GPU between nodes, Gbit/s
    pcie_gbs: float  # host <-> device copy bandwidth per GPU, GB/s (offload)
    hbm_tbs: float  # device memory bandwidth, TB/s (the optimizer step is bound by it)
    reserve_gib: float = 1.0  # CUDA context, cuBLAS/NCCL workspaces: memory the allocator never reports


# Bus bandwidths are the all-reduce "busbw" nccl-tests typically reports on the vendor's 8-GPU boards
# (NVLink 3 on A100 SXM, NVLink 4 on H100/H200 SXM); the network figures are one NIC per GPU as on DGX
# systems (HDR 200 Gb/s for A100, NDR 400 Gb/s for H100/H200). L40S has no NVLink: PCIe only.
GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("a100-40gb", 39.4, 312.0, 230.0, 200.0, 25.0, 1.56),
        GPU("a100-80gb", 79.2, 312.0, 230.0, 200.0, 25.0, 2.04),
        GPU("h100-80gb", 79.1, 989.0, 360.0, 400.0, 50.0, 3.35),
        GPU("h200-141gb", 139.8, 989.0, 360.0, 400.0, 50.0, 4.8),
        GPU("l40s-48gb", 44.4, 362.0, 20.0, 200.0, 25.0, 0.86),
    )
}

# Model-FLOPs utilisation measured by bench/gpu.sh for our trainer (docs/performance.md, "Training step on
# GPU"), per GPU. Empty until a GPU run is recorded there; the planner then uses DEFAULT_MFU and says so.
MEASURED_MFU: dict[str, float] = {}
# FlagPerf's ViT-B/16 on one A100-40GB (1,151 images/s, AMP) is 39% MFU by our FLOP count; the recipes aim
# at 45%. 0.40 is the planner's default until bench/gpu.sh measures ours.
DEFAULT_MFU = 0.40

# Allocator allowance on top of the bytes the model predicts: the caching allocator's reserved-but-unused
# blocks (fragmentation), as a fraction of the predicted peak of allocated memory.
DEFAULT_FRAGMENTATION = 0.05

# ZeRO-Offload's optimizer runs on the host (DeepSpeedCPUAdam): parameters updated per second per rank.
CPU_ADAM_PARAMS_PER_S = 1.0e9
# The optimizer step on the device is bound by memory traffic: per updated element it reads the fp32 master
# weight, both moments and the fp32 gradient, writes the first three back (28 bytes), and reads the 16-bit
# gradient and writes the 16-bit weight (4 more). Achieved bandwidth is taken as this fraction of the peak.
OPTIMIZER_BYTES_PER_ELEMENT = 32
HBM_EFFICIENCY = 0.7


def load_table(path: str | os.PathLike | None) -> dict[str, GPU]:
    """The built-in table with the rows of a YAML file merged over it (new GPUs, or changed fields)."""
    table = dict(GPUS)
    if path is None:
        return table
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--gpu-table {path} does not exist") from None
    except yaml.YAMLError as e:
        raise UserError(f"--gpu-table {path} is not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"--gpu-table {path} must map GPU names to their fields")
    fields = {f.name for f in dataclasses.fields(GPU)} - {"name"}
    for name, row in data.items():
        if not isinstance(row, dict):
            raise UserError(f"--gpu-table {path}: row {name!r} must be a mapping of {', '.join(sorted(fields))}")
        unknown = sorted(set(row) - fields)
        if unknown:
            raise UserError(f"--gpu-table {path}: row {name!r} has unknown fields {unknown}; known: {sorted(fields)}")
        base = table.get(name)
        if base is None:
            missing = sorted(fields - set(row) - {"reserve_gib"})
            if missing:
                raise UserError(f"--gpu-table {path}: new GPU {name!r} needs {', '.join(missing)}")
            base = GPU(name, **{k: float(row[k]) for k in fields - {"reserve_gib"}})
        try:
            table[name] = dataclasses.replace(base, **{k: float(v) for k, v in row.items()})
        except (TypeError, ValueError):
            raise UserError(f"--gpu-table {path}: row {name!r} must hold numbers") from None
    return table


def lookup(name: str, table: dict[str, GPU] | None = None) -> GPU:
    table = GPUS if table is None else table
    key = name.lower()
    if key not in table:
        raise UserError(f"unknown GPU {name!r}; known: {', '.join(table)} (or add a row with --gpu-table FILE)")
    return table[key]


def mfu_for(gpu: GPU, override: float | None) -> tuple[float, str]:
    """(MFU, where it came from) for `gpu`."""
    if override is not None:
        if not 0 < override <= 1:
            raise UserError(f"--mfu must be in (0, 1], got {override}")
        return override, "given (--mfu)"
    if gpu.name in MEASURED_MFU:
        return MEASURED_MFU[gpu.name], "measured (docs/performance.md)"
    return DEFAULT_MFU, "default assumption (no GPU measurement recorded yet)"


def detect(peak_tflops: float | None = None) -> GPU:
    """The table's row for the visible CUDA device (matched by name and memory), or a row built from what
    the device reports; on a machine without CUDA, the host as a nominal device (bench/ tests on CPU)."""
    import torch

    if not torch.cuda.is_available():
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        return GPU("cpu", memory, peak_tflops or 1.0, 1.0, 1.0, 1.0, 0.1, reserve_gib=0.0)
    props = torch.cuda.get_device_properties(0)
    name, memory = props.name.upper(), props.total_memory / GIB
    for key, row in GPUS.items():
        model = key.split("-")[0].upper()
        if model in name and abs(row.memory_gib - memory) < 0.1 * row.memory_gib:
            return dataclasses.replace(row, peak_tflops=peak_tflops or row.peak_tflops)
    from vit_scale.observe.metrics import peak_tflops as table_peak

    return GPU(props.name, memory, peak_tflops or table_peak() or 1.0, 230.0, 200.0, 25.0, 2.0)


# SLURM --constraint features that name a GPU model. Ambiguous ones (a bare "a100" is 40 or 80 GB) map to
# the smaller card, so a job that fits the plan fits either.
CONSTRAINTS = {
    "a100": "a100-40gb",
    "a100-40gb": "a100-40gb",
    "a100_40gb": "a100-40gb",
    "a100-sxm4-40gb": "a100-40gb",
    "a100-80gb": "a100-80gb",
    "a100_80gb": "a100-80gb",
    "a100-sxm4-80gb": "a100-80gb",
    "h100": "h100-80gb",
    "h100-80gb": "h100-80gb",
    "h100_80gb": "h100-80gb",
    "h200": "h200-141gb",
    "h200-141gb": "h200-141gb",
    "l40s": "l40s-48gb",
}


def gpu_from_constraint(constraint: str) -> str | None:
    """The GPU a SLURM --constraint expression selects, when its features name exactly one model."""
    import re

    features = {f.lower() for f in re.split(r"[&|,*\[\]()!]+", constraint) if f}
    names = {CONSTRAINTS[f] for f in features if f in CONSTRAINTS}
    if len(names) == 1:
        return names.pop()
    if names == {"a100-40gb", "a100-80gb"}:
        return "a100-40gb"
    return None
