"""Shared pieces of the transfer tests: official-layout .npz files, a NumPy reference ViT, tiny shards.

The NumPy forward pass follows the flax model of google-research/vision_transformer directly from
its arrays (per-head attention kernels, (in, out) dense kernels, NHWC patches), so it checks the
.npz import against an implementation that shares no code with timm or with the importer.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.special import erf

TINY = dict(depth=2, width=32, heads=2, mlp=64, patch=8)


def official_npz_arrays(
    rng: np.random.Generator, *, depth=2, width=32, heads=2, mlp=64, patch=8, img=32, classes=5, rep=None
) -> dict[str, np.ndarray]:
    """Random weights in the key layout and shapes of the released ViT-*.npz checkpoints."""

    def r(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    hd = width // heads
    a = {
        "embedding/kernel": r(patch, patch, 3, width),
        "embedding/bias": r(width),
        "cls": r(1, 1, width),
        "Transformer/posembed_input/pos_embedding": r(1, 1 + (img // patch) ** 2, width),
        "Transformer/encoder_norm/scale": 1 + r(width),
        "Transformer/encoder_norm/bias": r(width),
    }
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            a[f"{b}{ln}/scale"] = 1 + r(width)
            a[f"{b}{ln}/bias"] = r(width)
        att = b + "MultiHeadDotProductAttention_1/"
        for n in ("query", "key", "value"):
            a[f"{att}{n}/kernel"] = r(width, heads, hd)
            a[f"{att}{n}/bias"] = r(heads, hd)
        a[f"{att}out/kernel"] = r(heads, hd, width)
        a[f"{att}out/bias"] = r(width)
        a[f"{b}MlpBlock_3/Dense_0/kernel"] = r(width, mlp)
        a[f"{b}MlpBlock_3/Dense_0/bias"] = r(mlp)
        a[f"{b}MlpBlock_3/Dense_1/kernel"] = r(mlp, width)
        a[f"{b}MlpBlock_3/Dense_1/bias"] = r(width)
    head_in = width
    if rep:
        a["pre_logits/kernel"] = r(width, rep)
        a["pre_logits/bias"] = r(rep)
        head_in = rep
    a["head/kernel"] = r(head_in, classes)
    a["head/bias"] = r(classes)
    return a


def _ln(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def numpy_vit_logits(a: dict[str, np.ndarray], images_nchw: np.ndarray) -> np.ndarray:
    """Logits of the flax ViT in `a` (float64), exact-erf GELU as timm uses for these weights."""
    a = {k: v.astype(np.float64) for k, v in a.items()}
    x = images_nchw.astype(np.float64).transpose(0, 2, 3, 1)  # NHWC, as flax
    b_, h, w, c = x.shape
    p = a["embedding/kernel"].shape[0]
    g = h // p
    patches = x.reshape(b_, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b_, g * g, p * p * c)
    tokens = patches @ a["embedding/kernel"].reshape(p * p * c, -1) + a["embedding/bias"]
    cls = np.broadcast_to(a["cls"], (b_, 1, tokens.shape[-1]))
    x = np.concatenate([cls, tokens], 1) + a["Transformer/posembed_input/pos_embedding"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in a:
        blk = f"Transformer/encoderblock_{i}/"
        att = blk + "MultiHeadDotProductAttention_1/"
        y = _ln(x, a[blk + "LayerNorm_0/scale"], a[blk + "LayerNorm_0/bias"])
        q, k, v = (
            np.einsum("bnd,dhk->bnhk", y, a[f"{att}{n}/kernel"]) + a[f"{att}{n}/bias"]
            for n in ("query", "key", "value")
        )
        logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        o = np.einsum("bhqs,bshk->bqhk", weights, v)
        x = x + np.einsum("bqhk,hkd->bqd", o, a[att + "out/kernel"]) + a[att + "out/bias"]
        y = _ln(x, a[blk + "LayerNorm_2/scale"], a[blk + "LayerNorm_2/bias"])
        y = y @ a[blk + "MlpBlock_3/Dense_0/kernel"] + a[blk + "MlpBlock_3/Dense_0/bias"]
        y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
        x = x + y @ a[blk + "MlpBlock_3/Dense_1/kernel"] + a[blk + "MlpBlock_3/Dense_1/bias"]
        i += 1
    x = _ln(x, a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"])[:, 0]
    if "pre_logits/kernel" in a:
        x = np.tanh(x @ a["pre_logits/kernel"] + a["pre_logits/bias"])
    return x @ a["head/kernel"] + a["head/bias"]


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def class_images(label: int, n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Images a small ViT tells apart quickly: a bright quadrant per class, plus noise."""
    out = []
    half = size // 2
    for _ in range(n):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        r, c = divmod(label % 4, 2)
        img[r * half : (r + 1) * half, c * half : (c + 1) * half, label % 3] = 230
        out.append(img)
    return out


def write_class_shards(
    out: Path, num_classes: int, per_class: int, size: int = 32, seed: int = 0, split: str = ""
) -> Path:
    """A real shard set (JPEG in tar, index.json) through the data engineer's ShardWriter."""
    from vit_scale.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(out, shard_size=10_000, classes=[f"c{i}" for i in range(num_classes)], split=split) as w:
        for label in range(num_classes):
            for j, img in enumerate(class_images(label, per_class, size, rng)):
                w.write(f"s{label:03d}_{j:04d}", jpeg(img), "jpg", label, {"source": f"{label}/{j}"})
    return out
