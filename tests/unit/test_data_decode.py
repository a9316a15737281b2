"""The decode paths: libjpeg-turbo's full decode is the one torchvision gives, a crop decoded at reduced
scale (DCT scaling) stays within 35 dB PSNR of a full decode with the same crop and resize on real photos,
the crop and flip draws are those of the plain transform, and the same bytes always decode the same."""

from __future__ import annotations

import io
import itertools
import math
import random
import warnings

import numpy as np
import pytest
import torch
from data_helpers import encode, photo_crop, photos
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from vit_scale.data.transforms import (
    _resize,
    decode_rgb,
    eval_decode,
    eval_transform,
    inception_crop_box,
    jpeg_size,
    reduction,
    snap_box,
    train_crop,
    train_decode,
    train_transform,
)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return 10 * math.log10(255**2 / mse) if mse else math.inf


def torchvision_decode(data: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def test_full_decode_is_bit_identical_to_torchvision():
    """The pipeline's decoder moved from torchvision to simplejpeg; pixels (and so the golden losses and
    every resumed run) must not move: both are libjpeg-turbo with the same IDCT and upsampling."""
    pic = photos()[0]
    cases = itertools.product([(40, 36), (33, 17), (500, 375)], [50, 90], [0, 2], [False, True], ["RGB", "L"])
    for size, quality, subsampling, progressive, mode in cases:
        data = encode(
            pic.resize(size, Image.BICUBIC).convert(mode),
            quality=quality,
            subsampling=subsampling,
            progressive=progressive,
        )
        assert torch.equal(decode_rgb(data), torchvision_decode(data)), (size, quality, subsampling, mode)
        assert jpeg_size(data) == (size[1], size[0])


def test_undecodable_bytes_still_raise_value_error():
    good = encode(photo_crop(0, 64, 48), quality=90)
    for bad in (b"not an image", good[: len(good) // 3], b"\xff\xd8\xff" + b"\x00" * 50):
        with pytest.raises(ValueError):
            train_decode(bad, 32, random.Random(0))
        with pytest.raises(ValueError):
            eval_decode(bad, 32)
    assert jpeg_size(b"not an image") is None


def test_small_boxes_decode_exactly_as_before():
    """Below 2.5x the output no reduced decode happens and train_decode is the old decode + transform, bit
    for bit: the golden-loss recipe (40x36 JPEGs, 32 px) is far below it, and so is any 500x375 at 224 px."""
    for (w, h), size in (((40, 36), 32), ((500, 375), 224), ((64, 48), 24)):
        data = encode(photo_crop(3, w, h), quality=90)
        for seed in range(20):
            box = inception_crop_box(h, w, random.Random(seed))
            assert reduction(box[2], box[3], size) == 1
            want = train_transform(decode_rgb(data), size, random.Random(seed), area_min=0.05)
            assert torch.equal(train_decode(data, size, random.Random(seed)), want)
        for crop in ("none", "center"):
            assert torch.equal(eval_decode(data, size, crop), eval_transform(decode_rgb(data), size, crop))


def edges(box):
    top, left, h, w = box
    return top, left, top + h, left + w


def test_snapped_boxes_stay_inside_the_image_on_the_reduced_grid():
    rng = random.Random(0)
    ks = set()
    for _ in range(3000):
        height, width, size = rng.randint(100, 3000), rng.randint(100, 3000), rng.choice([32, 64, 96])
        box = inception_crop_box(height, width, rng)
        k = reduction(box[2], box[3], size)
        ks.add(k)
        top, left, h, w = snap_box(box, k, height, width)
        assert all(v % k == 0 for v in (top, left, h, w))
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        assert min(h, w) >= 1.2 * k * size or k == 1  # the 1/k crop still spans more than the output
        assert all(abs(a - b) <= k - 1 for a, b in zip(edges((top, left, h, w)), edges(box)))
    assert ks == {1, 2, 4, 8}


# (name, photo size or None for the native 640x427, output sizes): real photos, with the most detail per
# pixel at 0.75x, where a reduced decode has the most to lose.
PSNR_CASES = [
    ("native", None, (48, 96, 160)),
    ("0.75x", (480, 320), (48, 96)),
    ("1024x768", (1024, 768), (96, 224)),
]


@pytest.mark.parametrize("name,size,outputs", PSNR_CASES, ids=[c[0] for c in PSNR_CASES])
def test_reduced_train_decode_matches_full_decode_with_the_same_crop(name, size, outputs):
    seen: dict[int, list[float]] = {}
    for pic, quality in itertools.product(photos(), (75, 95)):
        img = pic if size is None else pic.resize(size, Image.LANCZOS)
        data = encode(img, quality=quality)
        full = decode_rgb(data)
        for out, seed in itertools.product(outputs, range(8)):
            (top, left, h, w), k, flip = train_crop(img.height, img.width, out, random.Random(seed))
            drawn = inception_crop_box(img.height, img.width, random.Random(seed))
            assert all(abs(a - b) <= k - 1 for a, b in zip(edges((top, left, h, w)), edges(drawn)))
            got = train_decode(data, out, random.Random(seed))
            want = _resize(full[:, top : top + h, left : left + w], out, out)
            want = want.flip(-1) if flip else want
            seen.setdefault(k, []).append(psnr(got, want))
            if k == 1:
                assert torch.equal(got, want)
    reduced = [p for k, ps in seen.items() if k > 1 for p in ps]
    assert len(reduced) >= 10 and 2 in seen, f"too few reduced decodes to test: {sorted(seen)}"
    assert min(reduced) >= 35.0, {k: round(min(v), 1) for k, v in seen.items()}


def test_reduced_eval_decode_matches_full_decode():
    sizes = [(640, 427), (1024, 768)]
    for pic, (w, h), out, crop in itertools.product(photos(), sizes, (64, 128), ("none", "center")):
        data = encode(pic.resize((w, h), Image.LANCZOS), quality=90)
        k = reduction(h, w, out)
        assert k > 1
        ref = eval_transform(decode_rgb(data)[:, : h // k * k, : w // k * k], out, crop)
        assert psnr(eval_decode(data, out, crop), ref) >= 35.0


def test_the_same_bytes_decode_to_the_same_pixels():
    """Exact resume replays a sample's decode: the reduced path must be deterministic too."""
    data = encode(photos()[1].resize((1024, 768), Image.BICUBIC), quality=90)
    first = [train_decode(data, 96, random.Random(s)) for s in range(8)]
    again = [train_decode(io.BytesIO(data).getvalue(), 96, random.Random(s)) for s in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len({hash(np.asarray(a).tobytes()) for a in first}) == 8
