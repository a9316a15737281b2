from vit_scale.models.posemb import resample_pos_embed, reset_head, set_resolution
from vit_scale.models.vit import (
    VARIANTS,
    ViT,
    build_model,
    count_params,
    forward_flops,
    model_dims,
    timm_kwargs,
    train_flops,
    variants_table,
)

__all__ = [
    "VARIANTS",
    "ViT",
    "build_model",
    "count_params",
    "forward_flops",
    "model_dims",
    "resample_pos_embed",
    "reset_head",
    "set_resolution",
    "timm_kwargs",
    "train_flops",
    "variants_table",
]
