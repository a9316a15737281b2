"""Bytes per rank of the model states and DeepSpeed's own buffers, and the bytes each ZeRO stage moves.

Each term restates what DeepSpeed allocates, from its source (version in docs/planning.md):
`runtime/zero/stage_1_and_2.py` (DeepSpeedZeroOptimizer, stages 1 and 2), `runtime/zero/stage3.py` and
`partition_parameters.py` (stage 3), `runtime/fp16/unfused_optimizer.py` (bf16/fp16 without ZeRO) and
`runtime/engine.py` (which optimizer wraps which case, stage-0 gradient all-reduce). The sizes come from the
DeepSpeed config our trainer generates (`vit_scale.train.engine.deepspeed_config`) read through DeepSpeed's
own `DeepSpeedZeroConfig`, so the defaults are the installed version's, not copies.

Three moments of a step are modelled exactly (and checked against the real engine on CPU, tests/dist):
  "backward"  after the last backward of a step, before the optimizer step
  "step"      inside the optimizer step of the first parameter group (its fp32 gradients exist)
  "idle"      between steps
What exists only in passing (buckets, flatten copies, ZeRO-3's gathered parameters) is in `transients`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from vit_scale.config import Config
from vit_scale.plan.layout import Layout, ceil_div, round_up

PHASES = ("backward", "step", "idle")
LOW_PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Term:
    key: str
    label: str
    bytes: int
    where: str  # "device" or "host"
    dtype: str  # "lp" (the model's dtype) or "fp32"


@dataclass(frozen=True)
class ZeroSettings:
    stage: int
    lp: int  # bytes per element of parameters and gradients
    world: int
    optimizer: str  # "adamw" or "sgd"
    offload_optimizer: bool
    offload_params: bool
    reduce_bucket: int  # elements
    allgather_bucket: int
    prefetch_bucket: int
    persistence_threshold: int
    model_persistence_threshold: int
    max_live: int
    max_reuse: int
    overlap_comm: bool
    contiguous_gradients: bool
    sub_group_size: int
    allreduce_bucket_stage0: int
    average: bool = False  # optim.ema_decay > 0: one more fp32 copy of the rank's master weights

    @property
    def states_per_element(self) -> int:
        """fp32 optimizer-state values per master weight: Adam's two moments, SGD's momentum."""
        return 2 if self.optimizer == "adamw" or self.offload_optimizer else 1

    @property
    def torch_step_counters(self) -> bool:
        """torch.optim.AdamW keeps a 4-byte `step` tensor per parameter it owns; DeepSpeedCPUAdam an int."""
        return self.optimizer == "adamw" and not self.offload_optimizer


def zero_settings(cfg: Config, world: int) -> ZeroSettings:
    """The ZeRO settings DeepSpeed will run with: our generated config, DeepSpeed's defaults for the rest."""
    from vit_scale.config import Batch, resolve_batch
    from vit_scale.train.engine import deepspeed_config

    batch = Batch(*resolve_batch(cfg.train, world), world_size=world)
    z = _settings(repr(deepspeed_config(cfg, batch)["zero_optimization"]), cfg.precision.dtype, cfg.optim.name,
                  cfg.parallel.offload_optimizer, cfg.parallel.offload_params, world)
    return dataclasses.replace(z, average=cfg.optim.ema_decay > 0)


@functools.lru_cache(maxsize=256)
def _settings(zero_json: str, dtype: str, optimizer: str, offload_optimizer: bool, offload_params: bool,
              world: int) -> ZeroSettings:
    import ast
    import contextlib
    import sys

    # DeepSpeed's logger writes to the stdout it finds when first imported; `vit-scale plan --json` owns
    # stdout, so its import-time notes (no accelerator on a login node) go to stderr instead.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    z = DeepSpeedZeroConfig(**ast.literal_eval(zero_json))
    return ZeroSettings(
        stage=int(z.stage),
        lp=LOW_PRECISION_BYTES[dtype],
        world=world,
        optimizer=optimizer,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        reduce_bucket=int(z.reduce_bucket_size),
        allgather_bucket=int(z.allgather_bucket_size),
        prefetch_bucket=int(z.prefetch_bucket_size),
        persistence_threshold=int(z.param_persistence_threshold),
        model_persistence_threshold=int(z.model_persistence_threshold),
        max_live=int(z.max_live_parameters),
        max_reuse=int(z.max_reuse_distance),
        overlap_comm=bool(z.overlap_comm),
        contiguous_gradients=bool(z.contiguous_gradients),
        sub_group_size=int(z.sub_group_size),
        allreduce_bucket_stage0=int(MEMORY_OPT_ALLREDUCE_SIZE),
    )


# ---------------------------------------------------------------- stages 1 and 2: flat groups


def flat_numel(numels: list[int], world: int) -> int:
    """A group's flat buffer: padded to a multiple of 2 × world (nccl_start_alignment_factor × dp size)."""
    return round_up(sum(numels), 2 * world)


def params_in_partition(numels: list[int], world: int, rank: int) -> int:
    """Elements of the parameters overlapping `rank`'s partition (`get_partition_info`): whole tensors,
    so a tensor straddling a boundary counts on both ranks. Their gradients are what the rank keeps."""
    size = flat_numel(numels, world) // world
    start, end = size * rank, size * (rank + 1)
    total, at = 0, 0
    for n in numels:
        if start <= at < end or at < start < at + n:
            total += n
        at += n
    return total


@functools.lru_cache(maxsize=256)
def worst_rank(lay: Layout, world: int) -> int:
    """The rank whose stage-1/2 gradient partition holds the most elements."""
    groups = [lay.group_numels(g) for g in range(len(lay.groups))]
    held = [sum(params_in_partition(g, world, r) for g in groups) for r in range(world)]
    return held.index(max(held))


# ---------------------------------------------------------------- stage 3: partitions


def persistent(lay: Layout, z: ZeroSettings) -> list[bool]:
    """Which parameters ZeRO-3 keeps whole on every rank (`mark_persistent_parameters`)."""
    out, total = [], 0
    for n in lay.numels:
        keep = n + total <= z.model_persistence_threshold and n <= z.persistence_threshold
        total += n if keep else 0
        out.append(keep)
    return out


def sub_groups(lay: Layout, z: ZeroSettings) -> list[int]:
    """Partition elements of each ZeRO-3 optimizer sub-group (`_create_fp16_sub_groups`)."""
    out = []
    for g in range(len(lay.groups)):
        parts = [ceil_div(n, z.world) for n in lay.group_numels(g)]
        if sum(parts) <= z.sub_group_size:
            out.append(sum(parts))
            continue
        local = 0
        for i, pn in enumerate(parts):
            local += pn
            if local >= z.sub_group_size or i == len(parts) - 1:
                out.append(local)
                local = 0
    return out


# ---------------------------------------------------------------- model states


def model_states(lay: Layout, z: ZeroSettings, rank: int, phase: str, grad_accum: int = 1,
                 device: str = "cuda") -> list[Term]:
    """Every model-state tensor a rank holds at `phase`, with where it lives. `device` is the accelerator:
    on "cpu" (the tests) moving an offloaded tensor to the device is no copy."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}")
    lp, N = z.lp, z.world
    P = lay.total
    dev_opt = "host" if z.offload_optimizer else "device"
    terms: list[Term] = []

    def add(key, label, nbytes, where="device", dtype="lp"):
        if nbytes:
            terms.append(Term(key, label, int(nbytes), where, dtype))

    if z.stage == 0:
        plain = lp == 4  # fp32 without ZeRO: DeepSpeed hands our torch optimizer the parameters as they are
        add("params", "parameters", lp * P)
        if not plain:
            add("master", "fp32 master weights", 4 * P, dtype="fp32")
        if z.average:
            add("average", "parameter average (optim.ema_decay)", 4 * P, dtype="fp32")
        counters = 4 * len(lay.numels) if z.torch_step_counters else 0
        add("optim", "optimizer states", 4 * z.states_per_element * P + counters, dtype="fp32")
        if phase != "idle":
            add("grads", "gradients", lp * P)
        if phase == "step" and not plain:
            add("grads_fp32", "fp32 gradients (in the step)", 4 * P, dtype="fp32")
        return terms

    if z.stage in (1, 2):
        groups = [lay.group_numels(g) for g in range(len(lay.groups))]
        parts = [flat_numel(g, N) // N for g in groups]
        add("params", "parameters", lp * sum(flat_numel(g, N) for g in groups))
        add("master", "fp32 master weights (partition)", 4 * sum(parts), dev_opt, "fp32")
        if z.average:  # vit_scale.train.average: the same slices as the master partition, padding excepted
            add("average", "parameter average (optim.ema_decay, partition)", 4 * sum(parts), dev_opt, "fp32")
        counters = 4 * len(groups) if z.torch_step_counters else 0
        add("optim", "optimizer states (partition)", 4 * z.states_per_element * sum(parts) + counters, dev_opt, "fp32")
        if z.offload_optimizer:
            # The fp32 gradient partition stays allocated on the host; the device keeps no gradients.
            add("grads_fp32", "fp32 gradients (partition)", 4 * sum(parts), "host", "fp32")
            add("offload_buffers", "offload staging (16-bit partition copy)", lp * sum(parts), "host")
            add("offload_buffers_host", "offload staging (largest gradient, host)", lp * lay.largest, "host")
            add("offload_buffers_dev", "offload staging (largest gradient, device)", lp * lay.largest)
            if grad_accum > 1:
                # async_accumulate_grad_in_cpu_via_gpu: a host copy of each of the rank's whole gradients.
                add("offload_accumulation", "offload gradient accumulation (host)",
                    lp * sum(params_in_partition(g, N, rank) for g in groups), "host")
            return terms
        if phase != "idle":
            add("grads", "gradients (partition)", lp * sum(params_in_partition(g, N, rank) for g in groups))
        if phase == "step":
            add("grads_fp32", "fp32 gradients (first group, in the step)", 4 * parts[0], dtype="fp32")
        return terms

    # stage 3
    keep = persistent(lay, z)
    subs = sub_groups(lay, z)
    part_total = sum(ceil_div(n, N) for n in lay.numels)
    add("params", "parameters (partition)", lp * part_total, "host" if z.offload_params else "device")
    if phase != "step" and _gathered_is_a_copy(z, device):
        # The step re-partitions the persistent ones and gathers them after it.
        add("params_persistent", "parameters kept whole (persistence threshold)",
            lp * sum(n for n, k in zip(lay.numels, keep) if k))
    add("grads", "gradients (partition)", lp * part_total, dev_opt)
    add("master", "fp32 master weights (partition)", 4 * sum(subs), dev_opt, "fp32")
    if z.average:
        add("average", "parameter average (optim.ema_decay, partition)", 4 * sum(subs), dev_opt, "fp32")
    counters = 4 * len(subs) if z.torch_step_counters else 0
    add("optim", "optimizer states (partition)", 4 * z.states_per_element * sum(subs) + counters, dev_opt, "fp32")
    if z.offload_optimizer:
        add("grads_fp32", "fp32 gradients (partition)", 4 * sum(subs), "host", "fp32")
    elif phase == "step":
        add("grads_fp32", "fp32 gradients (first sub-group, in the step)", 4 * subs[0], dtype="fp32")
    if z.contiguous_gradients:
        # Allocated once in `_setup_for_real_optimizer` and kept: reduce_bucket_size elements.
        add("reduce_bucket", "reduce bucket (reduce_bucket_size)", lp * z.reduce_bucket)
    return terms


# ---------------------------------------------------------------- transients


def _gathered_is_a_copy(z: ZeroSettings, device: str) -> bool:
    """Whether a gathered ZeRO-3 parameter takes memory of its own. On one rank it is its partition moved
    to the device (`_no_gather_coalesced`, `NoGatherHandle`): a view unless the partition is offloaded."""
    return z.world > 1 or (z.offload_params and device != "cpu")


@dataclass(frozen=True)
class Zero3Trace:
    peak_gathered: int  # elements of non-persistent parameters gathered whole at once, at most
    regathered: int  # elements (padded) gathered a second time in backward, per micro batch


@functools.lru_cache(maxsize=256)
def zero3_trace(lay: Layout, z: ZeroSettings) -> Zero3Trace:
    """Replay of `PartitionedParameterCoordinator` over one forward and backward once its trace is recorded
    (every step after the first).

    Modules run in forward order, then in reverse for backward; a checkpointed block runs its forward again
    just before its backward. The root module (class token, position embedding) is fetched first in both
    passes and released at the end of each. A module's parameters are gathered when it starts, the next
    ones in trace order are prefetched up to stage3_prefetch_bucket_size elements (within
    stage3_max_live_parameters), and on release a parameter stays gathered if the trace uses it again
    within stage3_max_reuse_distance elements (`__params_to_release`).
    """
    keep = persistent(lay, z)
    numel = lay.numels
    root = [m for m in lay.modules if m.name == ""]
    leaves = [m for m in lay.modules if m.name != ""]
    backward = []
    for m in reversed(leaves):
        if m.block in lay.checkpointed and (not backward or backward[-1][1] != m.block):
            backward += [(r, m.block) for r in leaves if r.block == m.block]  # the recomputed forward
        backward.append((m, m.block))
    order = root + leaves + root + [m for m, _ in backward]
    # (step index at which each fetch happens, step index after which it is released)
    n_fwd = len(root) + len(leaves)
    release_at = []
    for s, m in enumerate(order):
        is_root = m.name == ""
        release_at.append((n_fwd - 1 if s == 0 else len(order) - 1) if is_root else s)
    params = [m.params for m in order]

    def reused_within(p: int, after: int) -> bool:
        dist = 0
        for t in range(after + 1, len(params)):
            if dist >= z.max_reuse:
                return False
            if p in params[t]:
                return True
            dist += sum(numel[q] for q in params[t])
        return False

    available: set[int] = set()
    gathered_once: set[int] = set()
    queue = [(p, s) for s, ps in enumerate(params) for p in ps]
    qi = live = peak = regathered = 0
    pending: dict[int, list[int]] = {}
    for s, ps in enumerate(params):
        for p in ps:
            if p not in available and not keep[p]:
                available.add(p)
                live += numel[p]
                regathered += ceil_div(numel[p], z.world) * z.world if p in gathered_once else 0
                gathered_once.add(p)
        while qi < len(queue) and queue[qi][1] <= s:
            qi += 1
        taken, budget = 0, min(z.max_live - live, z.prefetch_bucket)
        while qi < len(queue) and taken < budget:
            p, _ = queue[qi]
            qi += 1
            if p not in available and not keep[p]:
                available.add(p)
                live += numel[p]
                taken += numel[p]
                regathered += ceil_div(numel[p], z.world) * z.world if p in gathered_once else 0
                gathered_once.add(p)
        peak = max(peak, live)
        pending.setdefault(release_at[s], []).extend(ps)
        for p in pending.pop(s, []):
            if p in available and not reused_within(p, s):
                available.discard(p)
                live -= numel[p]
    return Zero3Trace(peak, regathered)


def transients(lay: Layout, z: ZeroSettings, phase: str, device: str = "cuda") -> list[Term]:
    """Device buffers that exist only during backward ("backward") or the optimizer step ("step")."""
    lp, N, P = z.lp, z.world, lay.total
    out: list[Term] = []

    def add(key, label, nbytes):
        if nbytes:
            out.append(Term(key, label, int(nbytes), "device", "lp"))

    if phase == "step":
        if z.stage in (1, 2) and not z.offload_optimizer:
            # step(): the 16-bit gradient partition is flattened, then cast to fp32; both exist briefly.
            add("flatten_copy", "16-bit gradient flatten copy", lp * flat_numel(lay.group_numels(0), N) // N)
        return out
    if z.stage == 0:
        if N > 1:
            # engine.buffered_allreduce_fallback flattens up to MEMORY_OPT_ALLREDUCE_SIZE elements to reduce.
            add("reduce_copy", "all-reduce flatten copy", lp * min(P, z.allreduce_bucket_stage0))
        return out
    if z.stage in (1, 2):
        if z.contiguous_gradients:
            # setup_buckets(): reduce_bucket_size elements (two buffers with overlap_comm), until the epilogue.
            add("reduce_bucket", "reduce bucket (reduce_bucket_size)", lp * z.reduce_bucket * (2 if z.overlap_comm else 1))
        # allreduce_bucket() flattens the bucket before the all-reduce (use_multi_rank_bucket_allreduce).
        add("reduce_copy", "reduce flatten copy", lp * min(P, z.reduce_bucket))
        return out
    # reduce_scatter_coalesced() interleaves the bucket's padded partitions into one new tensor.
    add("reduce_copy", "reduce-scatter flatten copy", lp * min(sum(ceil_div(n, N) * N for n in lay.numels), z.reduce_bucket))
    if _gathered_is_a_copy(z, device):
        add("gathered", "gathered parameters (ZeRO-3 working set)", lp * zero3_trace(lay, z).peak_gathered)
    return out


def gradients_in_flight(lay: Layout, z: ZeroSettings) -> int:
    """Bytes of full-size gradients a backward accumulates before they are reduced (stages 0 and 1 reduce
    at the end of backward; stage 2 copies each into the pre-allocated bucket, stage 3 likewise)."""
    if z.stage <= 1 and not (z.stage == 1 and z.offload_optimizer):
        return z.lp * lay.total
    return 0


# ---------------------------------------------------------------- communication


@dataclass(frozen=True)
class Collective:
    kind: str  # "all_reduce", "all_gather", "reduce_scatter"
    label: str
    bytes: int  # the full tensor per call summed over the step: all-gather output, reduce-scatter input
    overlapped: bool  # DeepSpeed runs it beside compute (separate stream) under our generated config


def communication(lay: Layout, z: ZeroSettings, grad_accum: int) -> list[Collective]:
    """What one optimizer step (grad_accum micro batches) sends through collectives, per rank."""
    lp, N = z.lp, z.world
    if N == 1:
        return []
    groups = [lay.group_numels(g) for g in range(len(lay.groups))]
    out = []
    if z.stage == 0:
        # Gradients all-reduced once per step at the accumulation boundary, after backward.
        out.append(Collective("all_reduce", "gradient all-reduce", lp * lay.total, False))
    elif z.stage in (1, 2):
        reductions = 1 if z.stage == 1 else grad_accum  # stage 2 reduces every micro batch
        # average_tensor with use_multi_rank_bucket_allreduce: the bucket is all-reduced, each rank keeps its part.
        out.append(Collective("all_reduce", "gradient all-reduce", reductions * lp * lay.total, z.overlap_comm))
        out.append(Collective("all_gather", "updated-parameter all-gather",
                              lp * sum(flat_numel(g, N) for g in groups), False))
    else:
        keep = persistent(lay, z)
        full = [ceil_div(n, N) * N for n in lay.numels]
        per_forward = sum(f for f, k in zip(full, keep) if not k) + zero3_trace(lay, z).regathered
        out.append(Collective("all_gather", "parameter all-gather (forward and backward)",
                              grad_accum * lp * per_forward, True))
        out.append(Collective("reduce_scatter", "gradient reduce-scatter", grad_accum * lp * sum(full), True))
        out.append(Collective("all_gather", "persistent-parameter all-gather after the step",
                              lp * sum(f for f, k in zip(full, keep) if k), False))
    return out
