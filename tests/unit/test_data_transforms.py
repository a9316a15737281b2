"""What each input setting does to an image: the paper's evaluation resize, the optional centre crop, the
training crops, and the VTAB protocol's plain resize, through the real shard pipeline."""

import random

import numpy as np
import pytest
import torch
from data_helpers import jpeg_bytes, write_corpus
from PIL import Image

from vit_scale.config.schema import DataConfig
from vit_scale.data.loader import make_loader
from vit_scale.data.shards import read_index
from vit_scale.data.tar import tar_samples
from vit_scale.data.transforms import (
    center_transform,
    decode_rgb,
    inception_crop_box,
    resize_transform,
    train_transform,
)

SIZE = 24


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """12 real JPEGs, 48 wide and 24 high: a centre crop drops half of each, a resize keeps all of it."""
    out = tmp_path_factory.mktemp("wide")
    write_corpus(out, 12, shard_size=6, num_classes=3, size=(48, 24))
    return out


def stored_images(shards) -> dict[str, torch.Tensor]:
    """key -> the decoded JPEG exactly as it is stored in the shards."""
    out = {}
    for entry in read_index(shards)["shards"]:
        with open(shards / entry["name"], "rb") as f:
            for sample in tar_samples(f):
                out[sample["__key__"]] = decode_rgb(sample["jpg"])
    return out


def loaded(shards, cfg: DataConfig, *, train: bool) -> list[torch.Tensor]:
    loader = make_loader(str(shards), cfg, train=train, img_size=SIZE, batch_size=4, seed=3)
    batches = [b for _, b in zip(range(3), loader)] if train else list(loader)
    return [img for images, _ in batches for img in images]


def as_set(images) -> set[bytes]:
    return {img.contiguous().numpy().tobytes() for img in images}


def test_evaluation_resizes_the_whole_image_by_default(wide):
    stored = stored_images(wide).values()
    got = loaded(wide, DataConfig(workers=0), train=False)
    assert as_set(got) == as_set(resize_transform(img, SIZE) for img in stored)
    # The whole picture is kept: its left and right quarters are in the resized image, not cut away.
    img = next(iter(stored))
    squashed = resize_transform(img, SIZE).float()
    reference = torch.from_numpy(
        np.array(Image.fromarray(img.permute(1, 2, 0).numpy()).resize((SIZE, SIZE), Image.BILINEAR))
    ).permute(2, 0, 1)
    # PIL's antialiased bilinear resize, another implementation, agrees to within rounding (measured: exactly).
    assert (squashed - reference.float()).abs().mean() < 0.5


def test_centre_crop_remains_an_option_and_differs_on_non_square_images(wide):
    stored = stored_images(wide).values()
    got = loaded(wide, DataConfig(workers=0, eval_crop="center"), train=False)
    assert as_set(got) == as_set(center_transform(img, SIZE) for img in stored)
    img = next(iter(stored))
    assert center_transform(img, SIZE).shape == resize_transform(img, SIZE).shape == (3, SIZE, SIZE)
    assert not torch.equal(center_transform(img, SIZE), resize_transform(img, SIZE))
    # A centre crop of a 48x24 image is its middle 24x24 pixels, here at the stored scale.
    assert torch.equal(center_transform(img, 24), img[:, :, 12:36])


def test_training_with_augment_resize_sees_exactly_the_resized_images(wide):
    stored = stored_images(wide).values()
    want = as_set(resize_transform(img, SIZE) for img in stored)
    got = loaded(wide, DataConfig(workers=0, augment="resize", shuffle_buffer=4), train=True)
    assert len(got) == 12 and as_set(got) == want
    crops = loaded(wide, DataConfig(workers=0, augment="inception", shuffle_buffer=4), train=True)
    assert not as_set(crops) & want  # the paper's fine-tuning crops are something else


def test_inception_crop_follows_the_papers_ranges():
    """Area 0.05..1 of the image and aspect 3/4..4/3 (vit_jax: sample_distorted_bounding_box with
    area_range=(0.05, 1.0) and its default aspect range); every draw comes from the generator given."""
    rng = random.Random(0)
    areas, aspects = [], []
    for _ in range(2000):
        top, left, h, w = inception_crop_box(300, 400, rng)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        areas.append(h * w / (300 * 400))
        aspects.append(w / h)
    assert 0.045 < min(areas) < 0.07 and max(areas) > 0.9
    assert 0.74 < min(aspects) < 0.8 and 1.25 < max(aspects) < 1.35
    assert inception_crop_box(300, 400, random.Random(5)) == inception_crop_box(300, 400, random.Random(5))


def test_inception_crop_takes_the_whole_image_when_no_crop_fits():
    """A 2x400 strip has no crop of aspect 3/4..4/3 with area >= 5%: after the attempts TensorFlow makes
    (100), the whole image, as sample_distorted_bounding_box returns, rather than a cut-down centre."""
    assert inception_crop_box(2, 400, random.Random(0)) == (0, 0, 2, 400)


def test_training_crop_is_resized_to_a_square_and_flipped_half_the_time():
    img = decode_rgb(jpeg_bytes(3, 60, 40))
    flips = 0
    for seed in range(40):
        plain = train_transform(img, SIZE, random.Random(seed), hflip=False)
        maybe = train_transform(img, SIZE, random.Random(seed), hflip=True)
        assert plain.shape == (3, SIZE, SIZE)
        if not torch.equal(plain, maybe):
            assert torch.equal(maybe, plain.flip(-1))
            flips += 1
    assert 10 <= flips <= 30
