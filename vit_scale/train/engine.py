"""The DeepSpeed engine, built from our config tree: optimizer, schedule, ZeRO, precision, activation checkpointing.

The DeepSpeed JSON is generated here from the config on every start, never kept by hand, so it cannot
drift from the config the run saved. The model stays a plain nn.Module; everything distributed is
applied from outside, in this one place.
"""

from __future__ import annotations

import functools
import math
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit_scale.config import Batch, Config, ConfigError
from vit_scale.dist import device, free_port, is_multi_rank
from vit_scale.train import ops


def backend_name(cfg: Config) -> str:
    # What the machine has is known only here, on the rank: validate() also runs where the job is planned
    # (`vit-scale slurm --dry-run` on a login node without GPUs), so it cannot refuse nccl.
    if cfg.parallel.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs GPUs and this process sees none; use gloo or auto on CPU")
    if cfg.parallel.backend != "auto":
        return cfg.parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: Config) -> None:
    """Join the process group described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (launch/ sets them)."""
    import os

    import deepspeed

    if dist.is_initialized():
        return
    ops.prepare(cfg.parallel.offload_optimizer)  # DeepSpeed builds or loads its ops in init_distributed
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    timeout = timedelta(minutes=cfg.parallel.timeout_minutes)
    # DeepSpeed builds its own groups (a clone of the world group for ZeRO's collectives) with
    # `new_group(ranks)` and no timeout, which gets torch's default of 30 minutes (10 for nccl) instead of
    # ours: a frozen rank would then hold the others that long. New groups take the default from here.
    c10d = torch.distributed.distributed_c10d
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), timedelta):
        c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend_name(cfg), auto_mpi_discovery=False, timeout=timeout)


def uses_plain_optimizer(cfg: Config) -> bool:
    """ZeRO stage 0 in fp32 hands our optimizer to DeepSpeed unwrapped: no overflow check of its own."""
    return cfg.parallel.zero_stage == 0 and cfg.precision.dtype == "fp32"


def deepspeed_config(cfg: Config, batch: Batch) -> dict:
    """DeepSpeed's JSON for `cfg`, with the batch split that the validation pass resolved."""
    p = cfg.parallel
    zero: dict = {"stage": p.zero_stage}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if p.zero_stage == 3:
        # Export consolidates from the fp32 partitions; gathering 16-bit weights at every save is wasted time.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ds = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": batch.micro_batch_per_rank,
        "gradient_accumulation_steps": batch.grad_accum,
        # On the plain-optimizer path NonFiniteGuard clips, so it can see the norm before clipping.
        "gradient_clipping": 0.0 if uses_plain_optimizer(cfg) else cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,  # our loop logs; DeepSpeed's own prints would interleave with it
        "wall_clock_breakdown": False,
    }
    dtype = cfg.precision.dtype
    if dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": cfg.precision.initial_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return ds


# ---------------------------------------------------------------- optimizer and schedule


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norms, position embeddings and the class token keep their scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in ("pos_embed", "cls_token", "reg_token") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    if cfg.parallel.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload refuses other optimizers

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
    # AdamW: weight decay decoupled from the gradient moments (Loshchilov & Hutter), as in Table 3.
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, decay: str, end_ratio: float) -> float:
    """Multiplier of the base learning rate before optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return end_ratio + (1.0 - end_ratio) * shape


def build_schedule(cfg: Config, optimizer: torch.optim.Optimizer, total_steps: int):
    s = cfg.schedule
    warmup = min(s.warmup_steps, total_steps)
    end_ratio = s.end_lr / cfg.optim.lr if cfg.optim.lr else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            lr_multiplier, total_steps=total_steps, warmup_steps=warmup, decay=s.decay, end_ratio=end_ratio
        ),
    )


class NonFiniteGuard:
    """Gives a plain optimizer what DeepSpeed's ZeRO optimizers already have: skip the step on
    non-finite gradients and report it through `.overflow`, which the engine reads to count skips and
    hold the schedule. Gradients are already all-reduced here, so every rank takes the same decision.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, clip: float):
        self.optimizer = optimizer
        self.clip = clip
        self.overflow = False
        self._global_grad_norm = None
        self._step = optimizer.step
        optimizer.step = self.step
        optimizer.overflow = False

    def step(self, closure=None):
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]).float()
        flag = torch.tensor([0.0 if torch.isfinite(norm) else 1.0], device=norm.device)
        if is_multi_rank():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.overflow = self.optimizer.overflow = bool(flag.item())
        self._global_grad_norm = self.optimizer._global_grad_norm = norm.item()
        if self.overflow:
            return None
        if self.clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.clip, norm)
        return self._step(closure)


# ---------------------------------------------------------------- activation checkpointing


def apply_activation_checkpointing(model: nn.Module, every_k: int = 1) -> int:
    """Recompute every k-th transformer block in backward instead of storing its activations.

    Wraps the block's forward in place, so parameter names stay timm's. Non-reentrant checkpointing
    saves and restores the RNG state, so dropout and drop path draw the same masks in recomputation
    and the losses match a run without checkpointing. Returns the number of blocks wrapped.
    """
    wrapped = 0
    for i, block in enumerate(model.blocks):
        if i % every_k:
            continue
        inner = block.forward
        block.forward = functools.partial(checkpoint, inner, use_reentrant=False, preserve_rng_state=True)
        wrapped += 1
    return wrapped


# ---------------------------------------------------------------- the engine


def build_engine(cfg: Config, model: nn.Module, batch: Batch, total_steps: int):
    """(engine, optimizer, scheduler): DeepSpeed around `model`, ready for `train_step`."""
    import deepspeed

    if cfg.precision.dtype == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision.dtype=fp16 needs a GPU; use precision.dtype=bf16 or fp32 on CPU")
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model, cfg.parallel.checkpoint_every_k_blocks)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_schedule(cfg, optimizer, total_steps)
    # After the schedule: it rebinds `optimizer.step` as a method of the optimizer, which the guard is not.
    guard = NonFiniteGuard(optimizer, cfg.optim.grad_clip) if uses_plain_optimizer(cfg) else None
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, batch),
        dist_init_required=False,
    )
    if guard is None and not hasattr(engine.optimizer, "overflow"):
        NonFiniteGuard(engine.optimizer, 0.0)  # DeepSpeed clips on this path; the guard only skips
    if cfg.parallel.compile:
        engine.compile()
    return engine, ds_optimizer, scheduler
