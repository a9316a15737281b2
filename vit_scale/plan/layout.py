"""The parameter layout DeepSpeed sees: every tensor's size, the optimizer's groups, and the modules in
the order forward calls them. Built from the real model on the meta device, so it costs no memory and
cannot drift from `vit_scale.models`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from vit_scale.config import Config


@dataclass(frozen=True)
class Module:
    name: str
    params: tuple[int, ...]  # indices into Layout.numels of the module's own (non-recursive) parameters
    block: int | None  # transformer block index, for activation checkpointing's recomputation


@dataclass(frozen=True)
class Layout:
    numels: tuple[int, ...]  # every parameter, in named_parameters() order
    groups: tuple[tuple[int, ...], ...]  # the optimizer's param groups as DeepSpeed receives them
    modules: tuple[Module, ...]  # modules with parameters, in forward order
    depth: int
    checkpointed: frozenset[int]  # blocks whose activations are recomputed in backward

    @property
    def total(self) -> int:
        return sum(self.numels)

    def group_numels(self, g: int) -> list[int]:
        return [self.numels[i] for i in self.groups[g]]

    @property
    def largest(self) -> int:
        return max(self.numels)


@functools.lru_cache(maxsize=64)
def _layout(key: tuple) -> Layout:
    import torch

    from vit_scale.config import from_dict
    from vit_scale.models import build_model
    from vit_scale.train.engine import apply_activation_checkpointing, param_groups

    cfg = from_dict({"model": dict(key[0]), "optim": {"weight_decay": key[1]}})
    with torch.device("meta"):
        model = build_model(cfg.model)
    # Ask the trainer's own wrapper which blocks it recomputes, rather than restating its rule here.
    if key[2]:
        apply_activation_checkpointing(model, key[2])
    checkpointed = frozenset(i for i, b in enumerate(model.blocks) if isinstance(b.forward, functools.partial))
    named = list(model.named_parameters())
    index = {id(p): i for i, (_, p) in enumerate(named)}
    groups = tuple(
        tuple(index[id(p)] for p in g["params"]) for g in param_groups(model, cfg.optim.weight_decay) if g["params"]
    )
    modules = []
    for name, module in model.named_modules():
        own = tuple(index[id(p)] for p in module.parameters(recurse=False))
        if own:
            parts = name.split(".")
            block = int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 else None
            modules.append(Module(name, own, block))
    return Layout(tuple(p.numel() for _, p in named), groups, tuple(modules), len(model.blocks), checkpointed)


def layout(cfg: Config) -> Layout:
    import dataclasses

    p = cfg.parallel
    every_k = p.checkpoint_every_k_blocks if p.activation_checkpointing else 0
    return _layout((tuple(sorted(dataclasses.asdict(cfg.model).items())), cfg.optim.weight_decay, every_k))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return math.ceil(a / b) * b
