"""Small real-format corpora for the data tests: real JPEG bytes cut from the photos that ship with
scikit-learn, written as real tar shards through the real ShardWriter."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from vit_scale.data.shards import ShardWriter

PHOTO_DIR = Path(__import__("sklearn").__file__).parent / "datasets" / "images"


def photos() -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(PHOTO_DIR.glob("*.jpg"))]


def photo_crop(i: int, width: int, height: int) -> Image.Image:
    """A distinct width × height crop of a real photo for each i (deterministic)."""
    pics = photos()
    pic = pics[i % len(pics)]
    rng = np.random.default_rng(i)
    x = int(rng.integers(0, pic.width - width))
    y = int(rng.integers(0, pic.height - height))
    return pic.crop((x, y, x + width, y + height))


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg_bytes(i: int, width: int = 40, height: int = 30, quality: int = 85) -> bytes:
    return encode(photo_crop(i, width, height), "JPEG", quality=quality)


def write_corpus(
    out_dir: Path, n: int, *, shard_size: int, num_classes: int = 5, size=(40, 30), prefix: str = "shard"
) -> list[str]:
    """n real-JPEG samples with keys `s00000`... and labels i mod num_classes; returns the keys in order."""
    keys = []
    with ShardWriter(
        out_dir, shard_size=shard_size, classes=[f"c{k}" for k in range(num_classes)], prefix=prefix
    ) as w:
        for i in range(n):
            key = f"s{i:05d}"
            w.write(key, jpeg_bytes(i, *size), "jpg", i % num_classes, {"source": key})
            keys.append(key)
    return keys


def image_folder(root: Path, per_class: dict[str, int], size=(48, 36)) -> Path:
    """An ImageFolder tree of real JPEGs: root/class/img_000.jpg."""
    i = 0
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(count):
            (root / name / f"img_{j:03d}.jpg").write_bytes(jpeg_bytes(i, *size))
            i += 1
    return root
