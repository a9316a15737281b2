"""The ViT builders (the variants table is vit_scale.config.variants), on timm's VisionTransformer.

Plain nn.Modules: no distributed code. Activation checkpointing and the engine are applied from
outside (vit_scale.train.engine).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vit_scale.config.schema import ModelConfig
from vit_scale.config.variants import VARIANTS, model_dims


class ViT(VisionTransformer):
    """timm's VisionTransformer plus the paper's optional pre-logits layer (Linear + tanh).

    Without a representation layer the parameters and their names are exactly timm's, so weights
    move between the two unchanged.
    """

    def __init__(self, *, representation_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if representation_size:
            width = self.embed_dim
            self.pre_logits = nn.Sequential(
                OrderedDict(fc=nn.Linear(width, representation_size), act=nn.Tanh())
            )
            self.num_features = representation_size
            self.head = nn.Linear(representation_size, self.num_classes) if self.num_classes else nn.Identity()
        else:
            self.pre_logits = nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)


def timm_kwargs(m: ModelConfig, num_classes: int | None = None) -> dict:
    """Keyword arguments of timm's VisionTransformer for this config (also written by `export`)."""
    d = model_dims(m)
    avg = m.pool == "avg"
    return dict(
        img_size=m.img_size,
        patch_size=d["patch"],
        num_classes=m.num_classes if num_classes is None else num_classes,
        global_pool="avg" if avg else "token",
        class_token=not avg,
        embed_dim=d["width"],
        depth=d["layers"],
        num_heads=d["heads"],
        mlp_ratio=d["mlp"] / d["width"],
        # Paper: dropout after every dense layer except qkv, and after adding position embeddings.
        pos_drop_rate=m.dropout,
        proj_drop_rate=m.dropout,
        drop_path_rate=m.drop_path,
    )


def build_model(m: ModelConfig, num_classes: int | None = None) -> ViT:
    return ViT(representation_size=m.representation_size, **timm_kwargs(m, num_classes))


def count_params(m: ModelConfig, with_head: bool = False) -> int:
    """Parameter count, built on the meta device so no memory is spent."""
    with torch.device("meta"):
        model = build_model(m, num_classes=m.num_classes if with_head else 0)
    return sum(p.numel() for p in model.parameters())


def forward_flops(dims: dict[str, int], img_size: int, num_classes: int = 0, class_token: bool = True) -> int:
    """Analytic forward FLOPs for one image: every matmul, attention included (2 FLOPs per MAC)."""
    patch, width, mlp, layers = dims["patch"], dims["width"], dims["mlp"], dims["layers"]
    grid = img_size // patch
    patches = grid * grid
    n = patches + int(class_token)
    embed = 2 * patches * (3 * patch * patch) * width
    per_layer = (
        2 * n * width * 3 * width  # qkv
        + 2 * 2 * n * n * width  # q·k and attention·v
        + 2 * n * width * width  # output projection
        + 2 * 2 * n * width * mlp  # two MLP layers
    )
    return embed + layers * per_layer + 2 * width * num_classes


def train_flops(dims: dict[str, int], img_size: int, num_classes: int = 0, class_token: bool = True) -> int:
    """Training FLOPs per image: forward plus backward, taken as 3 × forward."""
    return 3 * forward_flops(dims, img_size, num_classes, class_token)


def variants_table() -> list[dict]:
    """One row per variant: the paper's Table 1 columns, params without head, training GFLOPs at 224 px."""
    rows = []
    for name, row in VARIANTS.items():
        cfg = ModelConfig(variant=name, num_classes=0)
        rows.append(
            dict(
                name=name,
                layers=row["layers"],
                width=row["width"],
                mlp=row["mlp"],
                heads=row["heads"],
                patch=row["patch"],
                params=count_params(cfg),
                train_gflops_224=round(train_flops(row, 224) / 1e9, 1),
            )
        )
    return rows


def grid_size(num_tokens: int) -> int:
    g = math.isqrt(num_tokens)
    if g * g != num_tokens:
        raise ValueError(f"{num_tokens} position embeddings do not form a square grid")
    return g
