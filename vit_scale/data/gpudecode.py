"""data.decode=gpu: the workers read and parse the tars and draw each sample's crop from its JPEG header; the
rank decodes the batch's JPEGs with nvJPEG (`torchvision.io.decode_jpeg` on its CUDA device, one batched call)
and crops, resizes and flips them there.

The crop and flip come from `transforms.train_crop`, the CPU path's function, with the same draws: a sample
gets the same box on either path (on the grid of the CPU path's reduced decode where that applies, although
nvJPEG decodes the full image). The functions here run on CPU tensors as well, which is how the tests compare
boxes, labels and order with the CPU path on a machine without a GPU.
"""

from __future__ import annotations

import random
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from vit_scale.data.transforms import (
    decode_rgb,
    eval_size,
    eval_transform,
    jpeg_size,
    train_crop,
    train_transform,
)
from vit_scale.errors import UserError

# The kind of each sample (last column of a plan row): a random crop, the centre crop, the whole image
# resized, or pixels finished on the CPU.
CROP, CENTER, RESIZE, FINISHED = 0, 1, 2, 3


class EncodedBatch(NamedTuple):
    """What a worker sends in data.decode=gpu: one tensor of bytes (so a batch crosses processes as one
    shared-memory block, not one per sample) and, per sample, where its bytes are and what to do with them."""

    blob: (
        torch.Tensor
    )  # uint8: the samples' JPEG bytes end to end (a FINISHED sample: its uint8 [3, S, S] pixels)
    offsets: torch.Tensor  # int64 [B + 1]: sample i is blob[offsets[i] : offsets[i + 1]]
    plans: torch.Tensor  # int64 [B, 6]: top, left, height, width, flip, kind
    size: int  # S, the output side


def encode_sample(
    data: bytes,
    size: int,
    rng: random.Random | None,
    *,
    area_min: float = 0.05,
    hflip: bool = True,
    crop: str = "none",
) -> tuple[torch.Tensor, list[int]]:
    """A worker's part for one sample: (bytes to send, plan row). `rng` draws the training crop; None means
    `eval_transform`'s geometry for `crop` ("none": the whole image resized, "center": the middle). What
    nvJPEG does not read (PNG and other formats) is finished here on the CPU; bytes that are no image at all
    raise ValueError, as on the CPU path."""
    size_hw = jpeg_size(data)
    if size_hw is None:
        img = decode_rgb(data)
        if rng is None:
            out = eval_transform(img, size, crop)
        else:
            out = train_transform(img, size, rng, area_min=area_min, hflip=hflip)
        return out.contiguous().flatten(), [0, 0, 0, 0, 0, FINISHED]
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if rng is None:
        return encoded, [0, 0, size_hw[0], size_hw[1], 0, CENTER if crop == "center" else RESIZE]
    (top, left, h, w), _, flip = train_crop(*size_hw, size, rng, area_min=area_min, hflip=hflip)
    return encoded, [top, left, h, w, int(flip), CROP]


def pack(samples: list[tuple[torch.Tensor, list[int]]], size: int) -> EncodedBatch:
    lengths = torch.tensor([0] + [len(t) for t, _ in samples], dtype=torch.int64)
    return EncodedBatch(
        blob=torch.cat([t for t, _ in samples]),
        offsets=lengths.cumsum(0),
        plans=torch.tensor([p for _, p in samples], dtype=torch.int64).reshape(-1, 6),
        size=size,
    )


def decode_batch(batch: EncodedBatch, device: torch.device) -> torch.Tensor:
    """uint8 [B, 3, S, S] on `device`: the batch's JPEGs decoded in one call, each cropped, resized and flipped."""
    size, plans = batch.size, batch.plans.tolist()
    bounds = batch.offsets.tolist()
    pieces = [batch.blob[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    out = torch.empty((len(plans), 3, size, size), dtype=torch.uint8, device=device)
    jpegs = [i for i, p in enumerate(plans) if p[5] != FINISHED]
    for i, p in enumerate(plans):
        if p[5] == FINISHED:
            out[i] = pieces[i].view(3, size, size).to(device, non_blocking=True)
    for i, img in zip(jpegs, _decode_jpegs([pieces[i] for i in jpegs], device)):
        out[i] = _finish(img, plans[i], size)
    return out


def _decode_jpegs(pieces: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if not pieces:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # see transforms.decode_rgb
        try:
            return decode_jpeg(pieces, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass  # one JPEG the batched decoder refuses fails the batch: find it and decode it on the CPU
        return [_decode_one(p, device) for p in pieces]


def _decode_one(piece: torch.Tensor, device: torch.device) -> torch.Tensor:
    try:
        return decode_jpeg(piece, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        return decode_rgb(piece.numpy().tobytes()).to(device)
    except ValueError as e:
        # The workers only read headers in this mode, so a corrupt body shows up here, where the batch is
        # already formed; data.decode=cpu skips and counts such samples instead.
        raise UserError(
            f"a JPEG in this batch is corrupt ({e}); run `vit-scale shards verify` on the shards or use "
            "data.decode=cpu, which skips corrupt samples"
        ) from None


def _finish(img: torch.Tensor, plan: list[int], size: int) -> torch.Tensor:
    top, left, h, w, flip, kind = plan
    if kind == RESIZE:
        return _resize(img, size, size)
    if kind == CENTER:
        nh, nw = eval_size(h, w, size)
        out = _resize(img, nh, nw)
        top, left = (nh - size) // 2, (nw - size) // 2
        return out[:, top : top + size, left : left + size]
    out = _resize(img[:, top : top + h, left : left + w], size, size)
    return out.flip(-1) if flip else out


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    # CUDA's antialiased bilinear kernel takes floating point only; the CPU path's uint8 kernel rounds the same
    # filter in fixed point, so the two differ by a level here and there.
    out = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)
