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
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

# Tries at an inception crop before taking the whole image (tf.image.sample_distorted_bounding_box's default).
CROP_ATTEMPTS = 100
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "gif", "tif", "tiff")


def decode_rgb(data: bytes) -> torch.Tensor:
    """uint8 [3, H, W] from encoded bytes; raises ValueError when they are not a decodable image.

    JPEGs through libjpeg-turbo (simplejpeg, which is also the only wheel here that exposes libjpeg's DCT
    scaling; its full-size output is bit-identical to torchvision's), then torchvision (PNG and the rest,
    several times faster than PIL), then PIL for what those refuse, such as CMYK JPEGs that a shard builder
    did not convert.
    """
    if not data:
        raise ValueError("zero-byte image")
    img = _decode_jpeg(data, 1)
    if img is not None:
        return img
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 marks its decoders deprecated in favour of torchcodec; they remain the fastest
            # PNG path installed here, and PIL below covers their removal.
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


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's header without decoding it; None when the bytes are not a JPEG."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return height, width


def _decode_jpeg(data: bytes, scale: int) -> torch.Tensor | None:
    """uint8 [3, ceil(H/scale), ceil(W/scale)] (channels-last in memory) through libjpeg-turbo's DCT
    scaling, or None when libjpeg-turbo cannot decode these bytes to RGB (not a JPEG, CMYK, truncated)."""
    size = jpeg_size(data)
    if size is None:
        return None
    height, width = size
    try:
        arr = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=-(-height // scale), min_width=-(-width // scale)
        )
    except ValueError:
        return None
    return torch.from_numpy(arr).permute(2, 0, 1)


# libjpeg can decode at 1/2, 1/4 or 1/8 scale for a fraction of the work (the IDCT, upsampling and colour
# conversion shrink with the pixels; the Huffman decoding does not). A crop is decoded at 1/k when, at that
# scale, it still spans at least MIN_REDUCED_SPAN output pixels per output pixel, i.e. when the box is at least
# 2.5x the output for k = 2. At 1.0 (a box just 2x the output) the DCT scaling's own filter is nearly the
# whole antialiasing filter, and on the scikit-learn photos the result fell to 29.6 dB PSNR against a full
# decode with the same crop and resize; at 1.25 the lowest of 715 boxes was 36.9 dB.
MIN_REDUCED_SPAN = 1.25


def reduction(height: int, width: int, size: int) -> int:
    """The libjpeg scale denominator (1, 2, 4 or 8) for resizing a height x width region to about `size`."""
    k = 1
    while k < 8 and min(height, width) >= 2 * k * size * MIN_REDUCED_SPAN:
        k *= 2
    return k


def snap_box(box: tuple[int, int, int, int], k: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The box with its edges rounded to the k-pixel grid of a 1/k decode, inside the image; the identity
    for k = 1.

    Each edge moves by at most k/2 pixels (k - 1 at the image's far border) on a box at least 2.5k output
    pixels wide, so the augmentation is unchanged in any way that matters, and the crop and resize then work
    on whole pixels of the reduced image (an exact fractional box would need PIL's resampler, about 4x slower
    than torch's uint8 kernel).
    """
    if k == 1:
        return box

    def near(v: int) -> int:
        return (v + k // 2) // k * k

    top, left, h, w = box
    bottom, right = min(near(top + h), height // k * k), min(near(left + w), width // k * k)
    return near(top), near(left), bottom - near(top), right - near(left)


def decode_crop(data: bytes, box: tuple[int, int, int, int], k: int) -> torch.Tensor:
    """The box (on the k-pixel grid, see snap_box) of the image decoded at 1/k scale where libjpeg-turbo
    can, else of the full decode; raises ValueError when the bytes are not a decodable image."""
    img = _decode_jpeg(data, k) if k > 1 else None
    if img is None:
        img, k = decode_rgb(data), 1
    top, left, h, w = (v // k for v in box)
    return img[:, top : top + h, left : left + w]


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


def train_crop(
    height: int,
    width: int,
    size: int,
    rng: random.Random,
    *,
    area_min: float = 0.05,
    hflip: bool = True,
    reduce: bool = True,
) -> tuple[tuple[int, int, int, int], int, bool]:
    """(box, k, flip) of the training crop of a height x width image: the inception crop box (on the grid of
    the 1/k decode it allows, see `reduction`; k = 1 without `reduce`) and whether to flip it.

    Every decode path draws these from `rng` in this order, so the GPU path and the reduced decode pick the
    same crop as a full decode followed by `train_transform`.
    """
    box = inception_crop_box(height, width, rng, area_min)
    k = reduction(box[2], box[3], size) if reduce else 1
    flip = hflip and rng.random() < 0.5
    return snap_box(box, k, height, width), k, flip


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
    (top, left, ch, cw), _, flip = train_crop(h, w, size, rng, area_min=area_min, hflip=hflip, reduce=False)
    return _finish(_resize(img[:, top : top + ch, left : left + cw], size, size), flip, rng, randaugment)


def train_decode(
    data: bytes,
    size: int,
    rng: random.Random,
    *,
    area_min: float = 0.05,
    hflip: bool = True,
    randaugment=None,
    reduce: bool = True,
) -> torch.Tensor:
    """`train_transform(decode_rgb(data), ...)`, with the crop chosen from the JPEG header before decoding,
    so that a large box is decoded at reduced scale (see `reduction`); raises ValueError for bad bytes."""
    size_hw = jpeg_size(data)
    if size_hw is None:
        return train_transform(
            decode_rgb(data), size, rng, area_min=area_min, hflip=hflip, randaugment=randaugment
        )
    box, k, flip = train_crop(*size_hw, size, rng, area_min=area_min, hflip=hflip, reduce=reduce)
    return _finish(_resize(decode_crop(data, box, k), size, size), flip, rng, randaugment)


def _finish(out: torch.Tensor, flip: bool, rng: random.Random, randaugment) -> torch.Tensor:
    if flip:
        out = out.flip(-1)
    if randaugment is not None:
        out = apply_randaugment(out, randaugment, rng)
    return out


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    # torch's antialiased uint8 kernel is vectorised for channels-last input: about 1.5x faster than CHW.
    # Called directly rather than through torchvision's resize (the same kernel, bit for bit), which adds
    # 0.04-0.06 ms of dispatch per image.
    batch = img.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.interpolate(batch, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


def resize_transform(img: torch.Tensor, size: int) -> torch.Tensor:
    """The whole image resized to size × size, aspect ratio not kept: the paper's evaluation input
    (`tf.image.resize(im, [crop_size, crop_size])` in vit_jax) and the VTAB protocol's only preprocessing."""
    return _resize(img, size, size)


def center_transform(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` and take the central size × size crop."""
    _, h, w = img.shape
    nh, nw = eval_size(h, w, size)
    out = _resize(img, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[:, top : top + size, left : left + size]


def eval_transform(img: torch.Tensor, size: int, crop: str = "none") -> torch.Tensor:
    """Evaluation input (`data.eval_crop`): "none" resizes the whole image, "center" crops the middle."""
    return center_transform(img, size) if crop == "center" else resize_transform(img, size)


def eval_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The size `center_transform` resizes a height x width image to before its central crop."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def eval_decode(data: bytes, size: int, crop: str = "none", *, reduce: bool = True) -> torch.Tensor:
    """`eval_transform(decode_rgb(data), size, crop)`; a JPEG at least 2.5x `size` on its shorter side is
    decoded at reduced scale (see `reduction`), its last < k rows and columns dropped to stay on the 1/k grid."""
    size_hw = jpeg_size(data)
    k = reduction(*size_hw, size) if size_hw is not None and reduce else 1
    if k == 1:
        return eval_transform(decode_rgb(data), size, crop)
    h, w = size_hw
    return eval_transform(decode_crop(data, (0, 0, h // k * k, w // k * k), k), size, crop)


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
