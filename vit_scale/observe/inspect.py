"""`vit-scale inspect WEIGHTS [--images IMG ...]`: the paper's Figure 7-style pictures of a ViT.

- posemb_similarity.png: cosine similarity of each patch's position embedding with every other one,
  one small map per patch position laid out on the patch grid (Figure 7, centre);
- attention_distance.png: mean attention distance of every head against depth (Figure 7, right),
  averaged over the given images (or over random noise images when none are given);
- attention_rollout.png: attention rollout (Abnar & Zuidema, 2020) from the class token to the patches,
  over the given images (Figure 6).

WEIGHTS is anything `vit_scale.checkpoint.weights.load_pretrained` reads: a run or checkpoint directory,
an export folder, .safetensors, a torch state dict or an official .npz.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vit_scale.errors import UserError
from vit_scale.io import atomic_write_bytes

# ------------------------------------------------------------------ the numbers


def posemb_similarity(model: nn.Module) -> torch.Tensor:
    """[G, G, G, G]: cosine similarity between the position embedding of patch (i, j) and of patch (k, l)."""
    grid = model.patch_embed.grid_size
    if grid[0] != grid[1]:
        raise UserError(f"position-embedding pictures need a square patch grid, got {grid[0]}x{grid[1]}")
    g = grid[0]
    pos = model.pos_embed.detach()[0, model.num_prefix_tokens :].float()
    pos = torch.nn.functional.normalize(pos, dim=-1)
    return (pos @ pos.T).reshape(g, g, g, g)


@torch.no_grad()
def attention_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The softmax attention weights [B, heads, N, N] of every block for input `x` (model input scale).

    timm computes attention with fused kernels that never materialise the weights, so each block's
    input is captured and the weights recomputed from the block's own q/k projections.
    """
    inputs: list[torch.Tensor] = []
    hooks = [b.attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for b in model.blocks]
    try:
        model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for block, h in zip(model.blocks, inputs):
        attn = block.attn
        b, n, _ = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        maps.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
    return maps


def mean_attention_distance(maps: list[torch.Tensor], grid: int, patch: int, prefix: int = 1) -> torch.Tensor:
    """[depth, heads]: the pixel distance between a query patch and the patches it attends to, weighted by
    attention (renormalised over patches, class token left out), averaged over queries and images."""
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=-1).float() * patch
    dist = torch.cdist(coords, coords)  # [P, P] in pixels
    out = []
    for a in maps:
        p = a[:, :, prefix:, prefix:]
        p = p / p.sum(dim=-1, keepdim=True)
        out.append((p * dist).sum(dim=-1).mean(dim=(0, 2)))
    return torch.stack(out)


def attention_rollout(maps: list[torch.Tensor], prefix: int = 1) -> torch.Tensor:
    """[B, P]: rolled-out attention of the class token to every patch.

    Heads averaged, the residual path added as the identity, rows renormalised, then multiplied
    through the depth (Abnar & Zuidema, 2020), as the paper's Figure 6.
    """
    n = maps[0].shape[-1]
    eye = torch.eye(n)
    rollout = eye.expand(maps[0].shape[0], n, n)
    for a in maps:
        a = a.mean(dim=1) + eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a @ rollout
    return rollout[:, 0, prefix:]


# ------------------------------------------------------------------ pictures


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def draw_posemb(sim: torch.Tensor) -> bytes:
    """One G×G tile per patch position, tiled on the G×G grid with a one-pixel gap (a single image, fast)."""
    g = sim.shape[0]
    tile = g + 1
    canvas = np.full((g * tile - 1, g * tile - 1), np.nan)
    for i in range(g):
        for j in range(g):
            canvas[i * tile : i * tile + g, j * tile : j * tile + g] = sim[i, j].numpy()
    fig = _figure(6.4, 5.6)
    ax = fig.add_subplot()
    im = ax.imshow(canvas, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    centres = np.arange(g) * tile + (g - 1) / 2
    ax.set_xticks(centres, [str(j + 1) for j in range(g)], fontsize=7)
    ax.set_yticks(centres, [str(i + 1) for i in range(g)], fontsize=7)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title("position embedding similarity")
    fig.colorbar(im, ax=ax, label="cosine similarity", shrink=0.8)
    fig.tight_layout()
    return _png(fig)


def draw_distance(dist: torch.Tensor, img_size: int) -> bytes:
    depth, heads = dist.shape
    fig = _figure(6.0, 4.4)
    ax = fig.add_subplot()
    for h in range(heads):
        ax.scatter(np.arange(1, depth + 1), dist[:, h].numpy(), s=14, label=f"head {h + 1}")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_ylim(0, img_size * 0.75)
    ax.set_xticks(np.arange(1, depth + 1))
    ax.set_title("attention distance per head")
    ax.grid(True, alpha=0.3)
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def draw_rollout(images: torch.Tensor, rollout: torch.Tensor, names: list[str]) -> bytes:
    """Each image beside itself with the rollout map (bilinearly upsampled) as a heat map over it."""
    b, _, size, _ = images.shape
    g = int(round(rollout.shape[1] ** 0.5))
    maps = rollout.reshape(b, 1, g, g)
    maps = torch.nn.functional.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)[
        :, 0
    ]
    fig = _figure(4.4, 2.1 * b)
    for i in range(b):
        img = images[i].permute(1, 2, 0).numpy()
        ax = fig.add_subplot(b, 2, 2 * i + 1)
        ax.imshow(img)
        ax.set_title(names[i], fontsize=8, parse_math=False)  # file names, drawn as written
        ax.axis("off")
        ax = fig.add_subplot(b, 2, 2 * i + 2)
        ax.imshow(img)
        ax.imshow(maps[i].numpy(), cmap="inferno", alpha=0.6)
        ax.set_title("attention rollout (class token)", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------ command


def load_images(paths: list[str], size: int) -> torch.Tensor:
    """uint8 [B, 3, size, size]: each whole image resized to size × size, as at evaluation."""
    from vit_scale.data.transforms import decode_rgb, eval_transform

    out = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read image {p}: {e.strerror}") from None
        try:
            out.append(eval_transform(decode_rgb(data), size))
        except ValueError as e:
            raise UserError(f"{p} is not an image ({e})") from None
    return torch.stack(out)


def inspect(weights: str, out: str | Path, image_paths: list[str] = (), noise_images: int = 4, seed: int = 0):
    """Write the pictures into `out`; the written paths by name, and the numbers behind them."""
    from vit_scale.checkpoint.weights import build_pretrained, load_pretrained
    from vit_scale.data.transforms import to_model_input

    model = build_pretrained(load_pretrained(weights)).eval()
    out = Path(out)
    size = model.patch_embed.img_size[0]
    patch = model.patch_embed.patch_size[0]
    grid = model.patch_embed.grid_size[0]
    prefix = model.num_prefix_tokens
    written, numbers = {}, {}

    sim = posemb_similarity(model)
    numbers["posemb_similarity"] = sim
    written["posemb"] = out / "posemb_similarity.png"
    atomic_write_bytes(written["posemb"], draw_posemb(sim))

    if image_paths:
        images = load_images(list(image_paths), size)
    else:  # the distances still describe the heads; rollout needs real pictures
        gen = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (noise_images, 3, size, size), generator=gen, dtype=torch.uint8)
    maps = attention_maps(model, to_model_input(images))
    dist = mean_attention_distance(maps, grid, patch, prefix)
    numbers["attention_distance"] = dist
    written["distance"] = out / "attention_distance.png"
    atomic_write_bytes(written["distance"], draw_distance(dist, size))

    if image_paths:
        rollout = attention_rollout(maps, prefix)
        numbers["rollout"] = rollout
        written["rollout"] = out / "attention_rollout.png"
        names = [Path(p).name for p in image_paths]
        atomic_write_bytes(written["rollout"], draw_rollout(images, rollout, names))
    return written, numbers
