"""Position-embedding resampling to a new grid and a fresh zero-initialised head (the paper's transfer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vit_scale.models.vit import grid_size


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1, mode: str = "bilinear"
) -> torch.Tensor:
    """Interpolate (1, prefix + G*G, D) position embeddings to a new_grid × new_grid grid.

    Prefix (class-token) embeddings are kept as they are. Bilinear with half-pixel centres and no
    antialiasing, as jax.image.resize in the paper's code; "bicubic" is also accepted.
    """
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"position-embedding interpolation must be bilinear or bicubic, got {mode!r}")
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = grid_size(grid_tokens.shape[1])
    if old_grid == new_grid:
        return pos_embed
    dim = grid_tokens.shape[-1]
    compute = torch.promote_types(pos_embed.dtype, torch.float32)  # never interpolate in bf16/fp16
    grid = grid_tokens.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).to(compute)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def set_resolution(model: nn.Module, img_size: int, mode: str = "bilinear") -> None:
    """Change a timm ViT's input resolution in place, keeping the patch size and interpolating pos_embed."""
    patch = model.patch_embed.patch_size[0]
    if img_size % patch:
        raise ValueError(f"resolution {img_size} is not a multiple of the patch size {patch}")
    new = resample_pos_embed(model.pos_embed.data, img_size // patch, model.num_prefix_tokens, mode)
    model.pos_embed = nn.Parameter(new)
    model.patch_embed.img_size = (img_size, img_size)
    model.patch_embed.grid_size = (img_size // patch, img_size // patch)
    model.patch_embed.num_patches = (img_size // patch) ** 2


def reset_head(model: nn.Module, num_classes: int, drop_pre_logits: bool = True) -> None:
    """Replace the head by a zero-initialised width × num_classes linear layer (paper, Appendix B.1.1).

    The pre-logits layer is removed too, as on transfer in the paper.
    """
    if drop_pre_logits and not isinstance(getattr(model, "pre_logits", nn.Identity()), nn.Identity):
        model.pre_logits = nn.Identity()
        model.num_features = model.embed_dim
    head = nn.Linear(model.embed_dim if drop_pre_logits else model.num_features, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.head = head
    model.num_classes = num_classes
