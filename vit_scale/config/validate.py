"""Checks on combinations of settings, run before any process starts.

Each failure is a ConfigError naming the settings involved and what to change.
"""

from __future__ import annotations

from vit_scale.config.loader import ConfigError
from vit_scale.config.schema import Config, TrainConfig


def resolve_batch(train: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro_batch_per_rank, grad_accum) such that micro × accum × world_size == global_batch."""
    g, micro, accum = train.global_batch, train.micro_batch_per_rank, train.grad_accum
    if g <= 0:
        raise ConfigError(f"train.global_batch must be positive, got {g}")
    if micro is not None and accum is not None:
        if micro * accum * world_size != g:
            raise ConfigError(
                f"train.global_batch={g} but train.micro_batch_per_rank={micro} × train.grad_accum={accum}"
                f" × world size {world_size} = {micro * accum * world_size}; change one of them"
            )
        return micro, accum
    if micro is not None:
        if g % (micro * world_size):
            raise ConfigError(
                f"train.global_batch={g} is not a multiple of train.micro_batch_per_rank={micro}"
                f" × world size {world_size}; change one of them"
            )
        return micro, g // (micro * world_size)
    accum = accum or 1
    if g % (accum * world_size):
        raise ConfigError(
            f"train.global_batch={g} is not divisible by train.grad_accum={accum} × world size {world_size};"
            " set train.micro_batch_per_rank or change the batch"
        )
    return g // (accum * world_size), accum


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Raise ConfigError on an impossible or unsafe combination of settings."""
    from vit_scale.models import VARIANTS, model_dims

    m = cfg.model
    if m.variant not in VARIANTS:
        raise ConfigError(
            f"model.variant={m.variant!r} is not a known variant; `vit-scale models` lists: {', '.join(VARIANTS)}"
        )
    dims = model_dims(m)
    patch = dims["patch"]
    if m.img_size < patch:
        raise ConfigError(
            f"model.img_size={m.img_size} is smaller than one {patch}-pixel patch; raise model.img_size"
        )
    if m.img_size % patch:
        raise ConfigError(
            f"model.img_size={m.img_size} is not divisible by the patch size {patch}; "
            f"use a multiple of {patch}, e.g. {m.img_size // patch * patch or patch}"
        )
    if dims["width"] % dims["heads"]:
        raise ConfigError(f"model width {dims['width']} is not divisible by {dims['heads']} heads")
    if cfg.eval.img_size is not None and cfg.eval.img_size % patch:
        raise ConfigError(f"eval.img_size={cfg.eval.img_size} is not a multiple of the patch size {patch}")
    p = cfg.parallel
    if p.offload_optimizer and p.zero_stage < 2:
        raise ConfigError(
            f"parallel.offload_optimizer needs ZeRO stage 2 or 3, but parallel.zero_stage={p.zero_stage}"
        )
    if p.offload_optimizer and cfg.optim.name != "adamw":
        raise ConfigError(
            f"parallel.offload_optimizer steps with DeepSpeed's CPU Adam only, but optim.name={cfg.optim.name}; "
            "use optim.name=adamw or set parallel.offload_optimizer=false"
        )
    if p.offload_params and p.zero_stage < 3:
        raise ConfigError(f"parallel.offload_params needs ZeRO stage 3, but parallel.zero_stage={p.zero_stage}")
    if p.checkpoint_every_k_blocks < 1:
        raise ConfigError("parallel.checkpoint_every_k_blocks must be at least 1")
    sources = [s for s in cfg.data.train.split("::") if s] if cfg.data.train else []
    if cfg.data.weights and len(cfg.data.weights) != len(sources):
        raise ConfigError(
            f"data.weights has {len(cfg.data.weights)} values but data.train names {len(sources)} "
            "`::`-separated sources; give one weight per source"
        )
    t = cfg.train
    lengths = [x for x in (t.steps, t.epochs, t.examples) if x is not None]
    if len(lengths) > 1:
        raise ConfigError("give only one of train.steps, train.epochs, train.examples")
    if world_size is not None:
        if p.world_size is not None and p.world_size != world_size:
            raise ConfigError(
                f"parallel.world_size={p.world_size} but {world_size} processes were launched; "
                "change the launch or the setting"
            )
        resolve_batch(t, world_size)
    if not 0 <= cfg.data.max_bad_fraction < 1:
        raise ConfigError("data.max_bad_fraction must be in [0, 1)")
