"""A plan for one configuration on one cluster: memory per GPU, the micro batch that fits, step time,
images/s, scaling against one node, the run's wall time and GPU-hours; and the search for the fastest
configuration that fits (`fit`).

Time is compute at an assumed MFU plus the communication DeepSpeed does not hide. Compute counts the
model's FLOPs (`vit_scale.models.train_flops`, 3 × forward) plus the forward of checkpointed blocks again,
all at the same efficiency. Communication is the bytes of `zero.communication` over ring collectives at the
table's bus bandwidth (NVLink within one node, the per-GPU network across nodes). Under the DeepSpeed config
we generate, stages 0-2 run their collectives after backward and after the optimizer step (overlap_comm is
false), so they add to the step; stage 3 gathers and reduce-scatters on side streams while the GPU computes,
so only what outlasts the compute adds. Offload adds its PCIe copies and the host optimizer, not overlapped.
The data pipeline is assumed to keep up.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field

from vit_scale.config import Config, ConfigError, validate
from vit_scale.errors import UserError
from vit_scale.models import forward_flops, model_dims, train_flops
from vit_scale.plan import activations as act
from vit_scale.plan import hardware, zero
from vit_scale.plan.layout import layout

GIB = 2**30


@dataclass(frozen=True)
class Cluster:
    gpu: hardware.GPU
    nodes: int
    gpus_per_node: int
    inter_node_gbps: float  # network per GPU
    mfu: float
    mfu_source: str
    fragmentation: float = hardware.DEFAULT_FRAGMENTATION

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def bus_gbs(self) -> float:
        """The ring bandwidth a collective over all GPUs gets: NVLink in one node, else the network."""
        if self.nodes == 1:
            return self.gpu.intra_node_gbs
        return min(self.gpu.intra_node_gbs, self.inter_node_gbps / 8)


def cluster(gpu: hardware.GPU, nodes: int, gpus_per_node: int, inter_node_gbps: float | None = None,
            mfu: float | None = None) -> Cluster:
    if nodes < 1:
        raise UserError(f"--nodes must be at least 1, got {nodes}")
    if gpus_per_node < 1:
        raise UserError(f"--gpus-per-node must be at least 1, got {gpus_per_node}")
    if inter_node_gbps is not None and inter_node_gbps <= 0:
        raise UserError(f"--interconnect-gbps must be positive, got {inter_node_gbps}")
    value, source = hardware.mfu_for(gpu, mfu)
    return Cluster(gpu, nodes, gpus_per_node, inter_node_gbps or gpu.inter_node_gbps, value, source)


@dataclass
class Row:
    key: str
    label: str
    gib: float
    where: str = "device"
    counted: bool = True  # False: shown, but not added (it does not coexist with the larger alternative)


@dataclass
class Plan:
    config: dict
    memory: list[Row]
    device_gib: float  # allocated peak, the figure torch.cuda.max_memory_allocated reports
    allowance_gib: float
    total_gib: float
    capacity_gib: float
    fits: bool
    peak_phase: str  # "backward" or "step"
    offending: str  # label of the largest term when it does not fit
    host_gib_per_node: float
    activations: dict  # saved bytes per micro batch with the configured checkpointing, without, and every block
    largest_micro_batch: int  # memory only
    largest_valid_micro_batch: int | None  # that also divides the global batch
    time: dict
    cost: dict
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- memory


def memory_rows(cfg: Config, world: int, micro: int, device: str = "cuda") -> tuple[list[Row], str, int]:
    """(rows at the peak, which phase peaks, allocated peak bytes) for the worst rank of `world`."""
    lay = layout(cfg)
    z = zero.zero_settings(cfg, world)

    worst = zero.worst_rank(lay, world) if z.stage in (1, 2) else 0
    accum = cfg.train.global_batch // (micro * world)

    def states(phase: str) -> list[zero.Term]:
        return zero.model_states(lay, z, worst, phase, accum, device)

    saved = act.saved_bytes(cfg, lay, micro, device)
    working = act.backward_working_bytes(cfg, lay, micro, device)
    activations = sum(saved.values()) + working
    in_flight = zero.gradients_in_flight(lay, z)

    bwd_states = states("backward")
    rows = [Row(t.key, t.label, t.bytes / GIB, t.where) for t in bwd_states]
    if z.stage == 0:  # its "gradients" are the full ones in flight, counted against the activations below
        rows = [r for r in rows if r.key != "grads"]
    rows += [Row(t.key, t.label, t.bytes / GIB) for t in zero.transients(lay, z, "backward", device)]
    act_row = Row("activations", f"activations saved for backward (micro batch {micro})", sum(saved.values()) / GIB)
    work_row = Row("backward_working", "backward working memory (estimate)", working / GIB)
    if in_flight:
        flight_row = Row("grads_in_flight", "gradients before their reduction", in_flight / GIB)
        larger_is_act = activations >= in_flight
        act_row.counted = work_row.counted = larger_is_act
        flight_row.counted = not larger_is_act
        rows += [act_row, work_row, flight_row]
    else:
        rows += [act_row, work_row]
    backward_peak = sum(r.gib for r in rows if r.where == "device" and r.counted) * GIB

    step_terms = states("step") + zero.transients(lay, z, "step", device)
    step_peak = sum(t.bytes for t in step_terms if t.where == "device")
    if step_peak > backward_peak:
        return [Row(t.key, t.label, t.bytes / GIB, t.where) for t in step_terms], "step", step_peak
    return rows, "backward", backward_peak


def peak_bytes(cfg: Config, world: int, micro: int, cl: Cluster) -> tuple[float, float]:
    """(allocated peak, with the allowance) in bytes."""
    _, _, allocated = memory_rows(_with_batch(cfg, world, micro), world, micro)
    return allocated, allocated * (1 + cl.fragmentation) + cl.gpu.reserve_gib * GIB


def _with_batch(cfg: Config, world: int, micro: int) -> Config:
    """cfg with micro batch `micro` per rank and the accumulation that keeps the global batch; when `micro`
    does not divide it, one micro batch per step (only offload's host buffers depend on the accumulation)."""
    c = copy.deepcopy(cfg)
    c.train.micro_batch_per_rank = micro
    c.train.grad_accum = None
    if c.train.global_batch % (micro * world):
        c.train.global_batch = micro * world
    return c


def largest_micro_batch(cfg: Config, cl: Cluster) -> tuple[int, int | None]:
    """(largest micro batch that fits in memory, the largest that also divides the global batch)."""
    capacity = cl.gpu.memory_gib * GIB
    world = cl.world

    def fits(m: int) -> bool:
        return peak_bytes(cfg, world, m, cl)[1] <= capacity

    if not fits(1):
        return 0, None
    lo, hi = 1, 2
    while fits(hi) and hi < 1 << 20:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    per_rank = cfg.train.global_batch // world if cfg.train.global_batch % world == 0 else 0
    valid = [d for d in _divisors(per_rank) if d <= lo]
    return lo, (max(valid) if valid else None)


def _divisors(n: int) -> list[int]:
    if n <= 0:
        return []
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


# ---------------------------------------------------------------- time


def step_time(cfg: Config, world: int, micro: int, accum: int, cl: Cluster) -> dict:
    """Seconds per optimizer step and where they go, for `world` ranks of `cl`'s GPU."""
    lay = layout(cfg)
    z = zero.zero_settings(_with_batch(cfg, world, micro), world)
    dims = model_dims(cfg.model)
    m = cfg.model
    class_token = m.pool != "avg"
    flops = train_flops(dims, m.img_size, m.num_classes, class_token)
    per_layer = forward_flops({**dims, "layers": 1}, m.img_size, 0, class_token) - forward_flops(
        {**dims, "layers": 0}, m.img_size, 0, class_token
    )
    recompute = per_layer * len(lay.checkpointed)
    images = micro * accum
    compute_s = images * (flops + recompute) / (cl.gpu.peak_tflops * 1e12 * cl.mfu)

    collectives = []
    hidden_budget = compute_s
    exposed = 0.0
    bus = cl.bus_gbs * 1e9 if world > 1 else math.inf
    for c in zero.communication(lay, z, accum):
        factor = 2 * (world - 1) / world if c.kind == "all_reduce" else (world - 1) / world
        seconds = c.bytes * factor / bus
        if c.overlapped:
            hidden = min(seconds, hidden_budget)
            hidden_budget -= hidden
            shown = seconds - hidden
        else:
            shown = seconds
        exposed += shown
        collectives.append(dict(label=c.label, kind=c.kind, bytes=c.bytes, seconds=seconds, exposed_s=shown,
                                overlapped=c.overlapped))

    updated = sum(zero.sub_groups(lay, z)) if z.stage == 3 else (
        lay.total if z.stage == 0 else sum(zero.flat_numel(lay.group_numels(g), world) // world
                                          for g in range(len(lay.groups))))
    optimizer_s = 0.0 if z.offload_optimizer else (
        updated * hardware.OPTIMIZER_BYTES_PER_ELEMENT / (cl.gpu.hbm_tbs * 1e12 * hardware.HBM_EFFICIENCY))
    offload_s = 0.0
    if z.offload_optimizer or z.offload_params:
        part = sum(math.ceil(n / world) for n in lay.numels)
        pcie = cl.gpu.pcie_gbs * 1e9
        if z.offload_optimizer:
            # gradients down every micro batch, updated 16-bit partition up once, Adam on the host
            offload_s += (accum * z.lp * part + z.lp * part) / pcie + part / hardware.CPU_ADAM_PARAMS_PER_S
        if z.offload_params:
            trace = zero.zero3_trace(lay, z)
            offload_s += accum * z.lp * (part + trace.regathered / world) / pcie
    step_s = compute_s + exposed + optimizer_s + offload_s
    per_gpu = images / step_s
    return dict(
        flops_per_image=flops,
        recompute_flops_per_image=recompute,
        compute_s=compute_s,
        collectives=collectives,
        exposed_comm_s=exposed,
        optimizer_s=optimizer_s,
        offload_s=offload_s,
        step_s=step_s,
        images_per_s_per_gpu=per_gpu,
        images_per_s=per_gpu * world,
        bus_gbs=cl.bus_gbs if world > 1 else None,
    )


# ---------------------------------------------------------------- cost


def run_steps(cfg: Config, epoch_size: int | None) -> tuple[int | None, str]:
    """(optimizer steps of the recipe, how they were found); None when epochs need an unknown epoch size."""
    from vit_scale.train.loop import total_steps

    t = cfg.train
    if t.steps is None and t.examples is None and t.epochs is not None:
        samples = epoch_size if epoch_size is not None else _samples_in(cfg.data.train)
        if samples is None:
            return None, f"train.epochs={t.epochs}: give --epoch-size (images per epoch) to cost it"
        try:
            return total_steps(cfg, samples), f"{t.epochs} epochs of {samples:,} images"
        except ConfigError as e:
            raise UserError(str(e)) from None
    try:
        steps = total_steps(cfg, 0)
    except ConfigError:
        return None, "no run length (train.steps, train.epochs or train.examples)"
    return steps, "train.steps" if t.steps is not None else f"train.examples={t.examples:,}"


def _samples_in(source: str) -> int | None:
    """Images in the shard directories of `source` when they exist here (their index.json), else None."""
    from pathlib import Path

    from vit_scale.data.shards import INDEX_NAME, read_index

    if not source:
        return None
    total = 0
    for part in source.split("::"):
        if not (Path(part) / INDEX_NAME).is_file():
            return None
        total += read_index(part)["num_samples"]
    return total


# ---------------------------------------------------------------- the plan


ASSUMPTIONS = (
    "MFU {mfu:.0%} ({mfu_source}); recomputed forwards run at the same efficiency",
    "collectives: ring algorithms at {bus} bus bandwidth; stage 0-2 collectives are not overlapped "
    "(overlap_comm=false in the generated DeepSpeed config), stage 3's gathers and reduce-scatters hide "
    "behind compute up to its length",
    "allocator allowance: {reserve} GiB for the CUDA context and workspaces plus {frag:.0%} of the allocated "
    "peak for fragmentation",
    "the data pipeline keeps up; micro-batch size does not change MFU",
)


def make_plan(cfg: Config, cl: Cluster, epoch_size: int | None = None, device: str = "cuda") -> Plan:
    world = cl.world
    try:
        batch = validate(cfg, world)
    except ConfigError as e:
        raise UserError(str(e)) from None
    micro, accum = batch.micro_batch_per_rank, batch.grad_accum
    lay = layout(cfg)
    rows, phase, allocated = memory_rows(cfg, world, micro, device)
    allowance = allocated * cl.fragmentation + cl.gpu.reserve_gib * GIB
    total = allocated + allowance
    capacity = cl.gpu.memory_gib * GIB
    fits = total <= capacity
    counted = [r for r in rows if r.where == "device" and r.counted]
    offending = max(counted, key=lambda r: r.gib).label if not fits else ""
    host = sum(r.gib for r in rows if r.where == "host") * cl.gpus_per_node

    saved = act.saved_bytes(cfg, lay, micro, device)
    plain = copy.deepcopy(cfg)
    plain.parallel.activation_checkpointing = False
    every = copy.deepcopy(cfg)
    every.parallel.activation_checkpointing = True
    every.parallel.checkpoint_every_k_blocks = 1
    activations = dict(
        configured_gib=sum(saved.values()) / GIB,
        without_checkpointing_gib=sum(act.saved_bytes(plain, layout(plain), micro, device).values()) / GIB,
        every_block_gib=sum(act.saved_bytes(every, layout(every), micro, device).values()) / GIB,
        parts_gib={k: v / GIB for k, v in saved.items()},
    )
    largest, largest_valid = largest_micro_batch(cfg, cl)

    t = step_time(cfg, world, micro, accum, cl)
    if cl.nodes > 1:
        one = dataclasses.replace(cl, nodes=1)
        base = step_time(cfg, cl.gpus_per_node, micro, accum * cl.nodes, one)
        t["scaling_efficiency_vs_one_node"] = t["images_per_s_per_gpu"] / base["images_per_s_per_gpu"]
    else:
        t["scaling_efficiency_vs_one_node"] = 1.0
    steps, how = run_steps(cfg, epoch_size)
    cost = dict(steps=steps, steps_from=how)
    if steps is not None:
        hours = steps * t["step_s"] / 3600
        cost.update(wall_hours=hours, gpu_hours=hours * world, images=steps * cfg.train.global_batch)
    p = cfg.parallel
    config = dict(
        variant=cfg.model.variant,
        img_size=cfg.model.img_size,
        dtype=cfg.precision.dtype,
        optimizer=cfg.optim.name,
        zero_stage=p.zero_stage,
        offload_optimizer=p.offload_optimizer,
        offload_params=p.offload_params,
        activation_checkpointing=p.activation_checkpointing,
        checkpoint_every_k_blocks=p.checkpoint_every_k_blocks if p.activation_checkpointing else None,
        checkpointed_blocks=len(lay.checkpointed),
        depth=lay.depth,
        params=lay.total,
        global_batch=cfg.train.global_batch,
        micro_batch_per_rank=micro,
        grad_accum=accum,
        gpu=cl.gpu.name,
        nodes=cl.nodes,
        gpus_per_node=cl.gpus_per_node,
        world_size=world,
        inter_node_gbps=cl.inter_node_gbps,
        mfu=cl.mfu,
        mfu_source=cl.mfu_source,
    )
    bus = f"{cl.bus_gbs:g} GB/s" if world > 1 else "no"
    assumptions = [
        a.format(mfu=cl.mfu, mfu_source=cl.mfu_source, bus=bus, reserve=cl.gpu.reserve_gib, frag=cl.fragmentation)
        for a in ASSUMPTIONS
    ]
    return Plan(
        config=config,
        memory=rows,
        device_gib=allocated / GIB,
        allowance_gib=allowance / GIB,
        total_gib=total / GIB,
        capacity_gib=cl.gpu.memory_gib,
        fits=fits,
        peak_phase=phase,
        offending=offending,
        host_gib_per_node=host,
        activations=activations,
        largest_micro_batch=largest,
        largest_valid_micro_batch=largest_valid,
        time=t,
        cost=cost,
        assumptions=assumptions,
    )


# ---------------------------------------------------------------- fit


CHECKPOINT_EVERY = (1, 2, 3, 4, 6, 8)


def candidates(cfg: Config):
    """(overrides, config) for every ZeRO stage × offload × activation checkpointing the trainer accepts."""
    depth = layout(cfg).depth
    every = [k for k in CHECKPOINT_EVERY if k <= depth]
    for stage in (1, 2, 3):  # without ZeRO (stage 0) every GPU holds every state: it never fits where these don't
        offloads = [(False, False)]
        if cfg.optim.name == "adamw":  # ZeRO-Offload steps with DeepSpeedCPUAdam only
            offloads += [(True, False)] if stage == 2 else [(True, False), (True, True)] if stage == 3 else []
        for opt, par in offloads:
            for k in [0, *every]:
                c = copy.deepcopy(cfg)
                c.parallel.zero_stage = stage
                c.parallel.offload_optimizer = opt
                c.parallel.offload_params = par
                c.parallel.activation_checkpointing = k > 0
                c.parallel.checkpoint_every_k_blocks = max(k, 1)
                yield c


def overrides_for(cfg: Config, micro: int, accum: int) -> list[str]:
    p = cfg.parallel
    out = [
        f"parallel.zero_stage={p.zero_stage}",
        f"parallel.offload_optimizer={str(p.offload_optimizer).lower()}",
        f"parallel.offload_params={str(p.offload_params).lower()}",
        f"parallel.activation_checkpointing={str(p.activation_checkpointing).lower()}",
    ]
    if p.activation_checkpointing:
        out.append(f"parallel.checkpoint_every_k_blocks={p.checkpoint_every_k_blocks}")
    return out + [f"train.micro_batch_per_rank={micro}", f"train.grad_accum={accum}"]


# Within this fraction of the fastest prediction, the simpler configuration wins: what the model does not
# see (ZeRO-3's per-module hooks and gathers, imperfect overlap, offload's host contention) grows with the
# stage, the offload and the recomputation, so a prediction that close is not worth their risk.
NEAR_FASTEST = 0.02


def fit(cfg: Config, cl: Cluster) -> tuple[Config, list[str], dict] | None:
    """The fastest predicted configuration that fits: (config, overrides that select it, its time), or None.

    For every ZeRO stage x offload x checkpointing the largest micro batch that fits and divides the global
    batch is taken (larger is never slower here); among the results within NEAR_FASTEST of the fastest,
    the lowest stage, then no offload, then the least recomputation wins.
    """
    world = cl.world
    if cfg.train.global_batch % world:
        raise UserError(
            f"train.global_batch={cfg.train.global_batch} is not divisible by the {world} GPUs; change one of them"
        )
    per_rank = cfg.train.global_batch // world
    capacity = cl.gpu.memory_gib * GIB
    sizes = _divisors(per_rank)
    found = []
    for c in candidates(cfg):
        lo, hi = 0, len(sizes)
        while lo < hi:  # the largest micro batch that fits: memory grows with it
            mid = (lo + hi) // 2
            if peak_bytes(c, world, sizes[mid], cl)[1] <= capacity:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            continue
        micro = sizes[lo - 1]
        accum = per_rank // micro
        t = step_time(c, world, micro, accum, cl)
        p = c.parallel
        recompute = len(layout(c).checkpointed)
        simplicity = (p.zero_stage, p.offload_optimizer + p.offload_params, recompute)
        found.append((t["images_per_s"], simplicity, c, micro, accum, t))
    if not found:
        return None
    fastest = max(f[0] for f in found)
    near = [f for f in found if f[0] >= (1 - NEAR_FASTEST) * fastest]
    _, _, c, micro, accum, t = min(near, key=lambda f: (f[1], -f[0]))
    chosen = copy.deepcopy(c)
    chosen.train.micro_batch_per_rank, chosen.train.grad_accum = micro, accum
    return chosen, overrides_for(c, micro, accum), t
