"""An embedded transfer benchmark: scikit-learn's handwritten digits (UCI optdigits test set), as shards.

`sklearn.datasets.load_digits` ships 1,797 real 8x8 scans with 17 grey levels (0-16) inside the
package, so nothing is downloaded. Each image is scaled to 0-255, upsampled bilinearly to `size` px,
made RGB (three equal channels) and JPEG-encoded.

The split is fixed and stratified: for each digit, its images (in load_digits order) are permuted with
numpy's default_rng(SPLIT_SEED) and the first TEST_PER_CLASS go to test. That gives 500 test images
(50 per digit) and 1,297 train images (124-133 per digit), the same on every machine and every
scikit-learn version that ships the same data.

    vit-scale shards synth digits --size 32 --out data/digits      -> data/digits/{train,test}/
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from vit_scale.errors import UserError

SPLIT_SEED = 0
TEST_PER_CLASS = 50
CLASSES = [str(d) for d in range(10)]
JPEG_QUALITY = 95  # strokes are a few pixels wide: keep compression artefacts well below them


def load() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images [N, 8, 8] in 0..16 and labels [N]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(
            "digits: scikit-learn is needed for the embedded digits; install it with "
            "`.venv/bin/pip install scikit-learn` (or `pip install -e '.[dev]'`)"
        ) from None
    d = load_digits()
    return d.images, d.target.astype(np.int64)


def split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), each sorted: TEST_PER_CLASS random images of each digit go to test."""
    rng = np.random.default_rng(SPLIT_SEED)
    test = []
    for digit in range(len(CLASSES)):
        idx = np.flatnonzero(labels == digit)
        if len(idx) <= TEST_PER_CLASS:
            raise UserError(f"digits: only {len(idx)} images of digit {digit}; the split needs more")
        test.append(rng.permutation(idx)[:TEST_PER_CLASS])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def to_image(digit: np.ndarray, size: int) -> np.ndarray:
    """One 8x8 scan in 0..16 as an RGB uint8 image [size, size, 3]."""
    grey = Image.fromarray((digit * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
    return np.asarray(grey.resize((size, size), Image.BILINEAR).convert("RGB"))


def encode_jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_digits(out: str | os.PathLike, size: int = 32, shard_size: int = 500) -> Path:
    """Write `out/train` (1,297 images) and `out/test` (500) as shards with index.json each."""
    from vit_scale.data.shards import ShardWriter  # the data area's writer, shared by every producer

    if size < 8:
        raise UserError(f"digits: --size must be at least the native 8 px (got {size})")
    images, labels = load()
    out = Path(out)
    for name, idx in zip(("train", "test"), split(labels)):
        recipe = {
            "corpus": "sklearn.load_digits",
            "size": size,
            "split_seed": SPLIT_SEED,
            "test_per_class": TEST_PER_CLASS,
        }
        with ShardWriter(
            out / name, shard_size=shard_size, classes=CLASSES, split=name, extra={"generator": recipe}
        ) as writer:
            for i in idx:
                meta = {"source": "sklearn.load_digits", "index": int(i), "split": name}
                writer.write(
                    f"digits_{i:04d}", encode_jpeg(to_image(images[i], size)), "jpg", int(labels[i]), meta
                )
    return out
