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
    out: Path,
    num_classes: int,
    per_class: int,
    size: int = 32,
    seed: int = 0,
    split: str = "",
    shard_size: int = 10_000,
    signal: bool = True,
) -> Path:
    """A real shard set (JPEG in tar, index.json) through the data engineer's ShardWriter.

    `signal=False` writes pure-noise images: labels then carry no information, so scores sit near
    chance and vary with every detail of the computation.
    """
    from vit_scale.data.shards import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(
        out, shard_size=shard_size, classes=[f"c{i}" for i in range(num_classes)], split=split
    ) as w:
        for label in range(num_classes):
            images = (
                class_images(label, per_class, size, rng)
                if signal
                else [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(per_class)]
            )
            for j, img in enumerate(images):
                w.write(f"s{label:03d}_{j:04d}", jpeg(img), "jpg", label, {"source": f"{label}/{j}"})
    return out


def write_cifar100_python(
    root: Path, train_per_class: int, test_per_class: int, used: int = 4, seed: int = 0
) -> Path:
    """A `cifar-100-python` folder in the official pickle layout (train, test, meta), with images of
    the first `used` of the 100 classes."""
    import pickle

    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        images, fine = [], []
        for label in range(used):
            images += class_images(label, n, 32, rng)
            fine += [label] * n
        data = np.stack(images).transpose(0, 3, 1, 2).reshape(len(images), 3072)
        batch = {
            b"data": data,
            b"fine_labels": fine,
            b"coarse_labels": [f // 5 for f in fine],
            b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(fine))],
            b"batch_label": f"{split} batch".encode(),
        }
        (d / split).write_bytes(pickle.dumps(batch))
    meta = {
        b"fine_label_names": [f"class_{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"super_{i}".encode() for i in range(20)],
    }
    (d / "meta").write_bytes(pickle.dumps(meta))
    return d


def write_vtab_task(root: Path, task: str, classes: int, seed: int = 0) -> Path:
    """A VTAB-1k task folder: JPEG files plus train800/val200/train800val200/test lists (tiny counts)."""
    rng = np.random.default_rng(seed)
    d = root / task
    (d / "images").mkdir(parents=True)
    counts = {"train800": 4, "val200": 1, "test": 3}
    lists: dict[str, list[str]] = {s: [] for s in (*counts, "train800val200")}
    for split, per_class in counts.items():
        for label in range(classes):
            for j, img in enumerate(class_images(label, per_class, 32, rng)):
                rel = f"images/{split}_{label}_{j}.jpg"
                (d / rel).write_bytes(jpeg(img))
                lists[split].append(f"{rel} {label}")
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (d / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return d


def write_cifar10_python(root: Path, per_class: int, seed: int = 0) -> tuple[Path, np.ndarray, list[int]]:
    """A `cifar-10-batches-py` folder in the official layout (data_batch_1, test_batch, batches.meta);
    returns it with the test images (N, 32, 32, 3) and labels."""
    import pickle

    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    out = {}
    for name in ("data_batch_1", "test_batch"):
        images, labels = [], []
        for label in range(10):
            images += class_images(label, per_class, 32, rng)
            labels += [label] * per_class
        stacked = np.stack(images)
        batch = {
            b"data": stacked.transpose(0, 3, 1, 2).reshape(len(images), 3072),
            b"labels": labels,
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))],
            b"batch_label": name.encode(),
        }
        (d / name).write_bytes(pickle.dumps(batch))
        out[name] = (stacked, labels)
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    (d / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": names, b"num_cases_per_batch": 10 * per_class})
    )
    return d, *out["test_batch"]
