"""data.decode=gpu, run on CPU tensors (the same functions, device "cpu"): the workers send bytes and crop
plans, the rank decodes; labels, order, crop boxes and flips must be those of the CPU path."""

from __future__ import annotations

import math
import random

import pytest
import torch
from data_helpers import encode, jpeg_bytes, photo_crop, photos

from vit_scale.config.schema import DataConfig
from vit_scale.data.gpudecode import CENTER, CROP, FINISHED, RESIZE, decode_batch, encode_sample, pack
from vit_scale.data.loader import make_loader
from vit_scale.data.shards import ShardWriter
from vit_scale.data.transforms import decode_rgb, eval_decode, jpeg_size, train_crop, train_decode
from vit_scale.errors import UserError

CPU = torch.device("cpu")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return 10 * math.log10(255**2 / mse) if mse else math.inf


def corpus(out, sizes: list[tuple[int, int]], png_every: int = 0):
    """Real photo crops of the given sizes, one per sample, labels i mod 5; every png_every-th one a PNG."""
    with ShardWriter(out, shard_size=8, classes=[f"c{k}" for k in range(5)]) as w:
        for i, (width, height) in enumerate(sizes):
            img = photo_crop(i, width, height) if width <= 600 else photos()[i % 2].resize((width, height))
            if png_every and i % png_every == png_every - 1:
                w.write(f"s{i:05d}", encode(img, "PNG"), "png", i % 5, {})
            else:
                w.write(f"s{i:05d}", encode(img, quality=90), "jpg", i % 5, {})
    return out


def batches(source, decode, *, train=True, augment="inception", size=32, n=3, workers=2):
    cfg = DataConfig(workers=workers, shuffle_buffer=16, decode=decode, augment=augment)
    loader = make_loader(str(source), cfg, train=train, img_size=size, batch_size=8, seed=3, device=CPU)
    out = []
    for images, labels in loader:
        out.append((images, labels))
        if len(out) == n:
            break
    return out


def test_small_images_match_the_cpu_path_sample_for_sample(tmp_path):
    """Without a reduced decode on the CPU path the two differ only by the resize's rounding (fixed-point
    uint8 kernel vs float): same labels in the same order, and every image within a level or two, which a
    different box or flip would be far from. PNG samples are finished by the worker, bit for bit."""
    source = corpus(tmp_path / "s", [(64, 48), (48, 64), (40, 36), (56, 56)] * 12, png_every=5)
    for train, augment in ((True, "inception"), (False, "inception"), (True, "center")):
        cpu = batches(source, "cpu", train=train, augment=augment)
        gpu = batches(source, "gpu", train=train, augment=augment)
        assert len(cpu) == len(gpu) == 3
        for (ci, cl), (gi, gl) in zip(cpu, gpu):
            assert torch.equal(cl, gl)
            assert gi.dtype == torch.uint8 and gi.shape == ci.shape == (8, 3, 32, 32)
            diff = (gi.int() - ci.int()).abs()
            assert diff.max().item() <= 2 and diff.float().mean().item() < 0.25, (train, augment)


def test_large_images_match_the_reduced_cpu_path(tmp_path):
    """Where the CPU path decodes at reduced scale, the GPU path (full decode, same box) is within 35 dB."""
    source = corpus(tmp_path / "s", [(1024, 768), (640, 427)] * 12)
    for (ci, cl), (gi, gl) in zip(batches(source, "cpu", size=64), batches(source, "gpu", size=64)):
        assert torch.equal(cl, gl)
        assert min(psnr(g, c) for g, c in zip(gi, ci)) >= 35.0


def test_plans_are_the_cpu_paths_crop_and_flip():
    data = encode(photos()[0].resize((1024, 768)), quality=90)
    ks = set()
    for seed in range(30):
        encoded, plan = encode_sample(data, 96, random.Random(seed))
        box, k, flip = train_crop(768, 1024, 96, random.Random(seed))
        assert plan == [*box, int(flip), CROP]
        assert bytes(encoded.numpy()) == data
        ks.add(k)
    assert ks == {1, 2, 4}  # boxes the CPU path decodes at full and at reduced scales
    assert encode_sample(data, 96, None)[1] == [0, 0, 768, 1024, 0, RESIZE]
    assert encode_sample(data, 96, None, crop="center")[1] == [0, 0, 768, 1024, 0, CENTER]


def test_batch_decode_equals_the_cpu_functions():
    samples = [jpeg_bytes(i, 80, 60) for i in range(5)] + [encode(photo_crop(9, 50, 70), "PNG")]
    rngs = [random.Random(s) for s in range(6)]
    parts = [encode_sample(d, 32, r) for d, r in zip(samples, rngs)]
    assert [p[1][5] for p in parts] == [CROP] * 5 + [FINISHED]
    out = decode_batch(pack(parts, 32), CPU)
    for img, data, seed in zip(out, samples, range(6)):
        want = train_decode(data, 32, random.Random(seed))
        assert (img.int() - want.int()).abs().max().item() <= 2
    assert torch.equal(out[5], train_decode(samples[5], 32, random.Random(5)))
    for crop in ("none", "center"):
        evals = decode_batch(pack([encode_sample(d, 32, None, crop=crop) for d in samples], 32), CPU)
        for img, data in zip(evals, samples):
            assert (img.int() - eval_decode(data, 32, crop).int()).abs().max().item() <= 2


def test_a_corrupt_jpeg_body_stops_with_one_line():
    good = jpeg_bytes(0, 80, 60)
    broken = good[: good.index(b"\xff\xda") + 40]  # headers intact, the image data cut short
    assert jpeg_size(broken) == (60, 80)
    with pytest.raises(ValueError):
        decode_rgb(broken)
    batch = pack([encode_sample(good, 32, random.Random(0)), encode_sample(broken, 32, random.Random(1))], 32)
    with pytest.raises(UserError, match="corrupt .* use data.decode=cpu, which skips corrupt samples"):
        decode_batch(batch, CPU)


def test_non_images_are_bad_samples_in_the_worker():
    with pytest.raises(ValueError):
        encode_sample(b"not an image", 32, random.Random(0))
