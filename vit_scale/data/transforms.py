"""Decoding and augmentation of one sample, on uint8 tensors, with randomness drawn from a given generator.

Every random choice comes from the `random.Random` the caller passes, seeded per sample, never from the
global RNGs: the pipeline can then reproduce any sample's augmentation after a resume, and a loader running
in the main process (workers=0) does not disturb the trainer's own RNG streams.
"""

from __future__ import annotations

import io
import math
import random
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

# Tries at an inception crop before taking the whole image (tf.image.sample_distorted_bounding_box's default).
CROP_ATTEMPTS = 100
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "gif", "tif", "tiff")


def decode_rgb(data: bytes) -> torch.Tensor:
    """uint8 [3, H, W] from encoded bytes; raises ValueError when they are not a decodable image.

    libjpeg-turbo / libpng through torchvision first (several times faster than PIL on ImageNet-sized
    JPEGs); PIL for what those decoders refuse, such as CMYK JPEGs that a shard builder did not convert.
    """
    if not data:
        raise ValueError("zero-byte image")
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 marks its decoders deprecated in favour of torchcodec; they remain the fastest
            # JPEG path installed here, and PIL below covers their removal.
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if img.shape[0] == 3:
            return img
    except (RuntimeError, ValueError):
        pass
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types for broken files: all mean "not an image"
        raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def inception_crop_box(
    height: int, width: int, rng: random.Random, area_min: float = 0.05, area_max: float = 1.0
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering area_min..area_max of the image with aspect 3/4..4/3.

    The paper's fine-tuning pipeline (vit_jax `input_pipeline.py`, big_vision `inception_crop`) takes
    TensorFlow's `sample_distorted_bounding_box` with area 0.05..1 and its aspect range 3/4..4/3: up to 100
    tries, the whole image when none fits. The draws are torchvision's (RandomResizedCrop.get_params: area
    uniform, aspect log-uniform), taken from `rng`.
    """
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(area_min, area_max)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    return 0, 0, height, width


def train_transform(
    img: torch.Tensor,
    size: int,
    rng: random.Random,
    *,
    area_min: float = 0.05,
    hflip: bool = True,
    randaugment=None,
) -> torch.Tensor:
    """Inception crop resized to size × size, optional horizontal flip and RandAugment; uint8 in, uint8 out.

    The result may be channels-last in memory; the pipeline copies it into its batch tensor anyway.
    """
    _, h, w = img.shape
    top, left, ch, cw = inception_crop_box(h, w, rng, area_min)
    out = _resize(img[:, top : top + ch, left : left + cw], size, size)
    if hflip and rng.random() < 0.5:
        out = out.flip(-1)
    if randaugment is not None:
        out = apply_randaugment(out, randaugment, rng)
    return out


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    # torch's antialiased uint8 kernel is vectorised for channels-last input: about 1.5x faster than CHW.
    batch = img.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return TF.resize(batch, [h, w], antialias=True)[0]


def resize_transform(img: torch.Tensor, size: int) -> torch.Tensor:
    """The whole image resized to size × size, aspect ratio not kept: the paper's evaluation input
    (`tf.image.resize(im, [crop_size, crop_size])` in vit_jax) and the VTAB protocol's only preprocessing."""
    return _resize(img, size, size)


def center_transform(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` and take the central size × size crop."""
    _, h, w = img.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = _resize(img, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[:, top : top + size, left : left + size]


def eval_transform(img: torch.Tensor, size: int, crop: str = "none") -> torch.Tensor:
    """Evaluation input (`data.eval_crop`): "none" resizes the whole image, "center" crops the middle."""
    return center_transform(img, size) if crop == "center" else resize_transform(img, size)


def make_randaugment(spec: str, img_size: int):
    """timm's RandAugment from a spec such as `rand-m9-mstd0.5`, or None for an empty spec."""
    if not spec:
        return None
    from timm.data import rand_augment_transform

    return rand_augment_transform(
        spec, {"translate_const": int(img_size * 0.45), "img_mean": (124, 116, 104)}
    )


def apply_randaugment(img: torch.Tensor, ra, rng: random.Random) -> torch.Tensor:
    """Run timm's RandAugment (which draws from the global `random` module) under a seed taken from rng."""
    saved = random.getstate()
    np_saved = np.random.get_state()
    try:
        random.seed(rng.getrandbits(64))
        np.random.seed(rng.getrandbits(32))
        pil = Image.fromarray(img.permute(1, 2, 0).numpy())
        out = np.asarray(ra(pil).convert("RGB"))
    finally:
        random.setstate(saved)
        np.random.set_state(np_saved)
    return torch.from_numpy(out.copy()).permute(2, 0, 1)


def make_mixup(mixup: float, cutmix: float, num_classes: int, label_smoothing: float = 0.0):
    """timm's batch Mixup/CutMix for the trainer to apply on the device after normalisation; None when off.

    It runs on float images, so it belongs after the loader (which yields uint8) rather than inside it.
    """
    if mixup <= 0 and cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes
    )


def to_model_input(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] pixels -> [-1, 1] (mean = std = 0.5, as the paper's code), computed in fp32.

    Training and every evaluation use this one function, so their inputs cannot drift apart.
    """
    return (images.float() / 127.5 - 1.0).to(dtype)
