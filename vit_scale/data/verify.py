"""`vit-scale shards verify`'s check of one shard against its index entry."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from vit_scale.data.tar import tar_samples
from vit_scale.data.transforms import IMAGE_EXTS, decode_rgb


def verify_shard(path: Path, entry: dict) -> list[str]:
    """Problems with one shard: size, sha256, sample count, and every image decoding."""
    if not path.exists():
        return ["missing"]
    data = path.read_bytes()
    problems = []
    if len(data) != entry["bytes"]:
        problems.append(f"size {len(data)} != {entry['bytes']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        problems.append("sha256 mismatch")
    samples = []
    try:
        for sample in tar_samples(io.BytesIO(data)):
            samples.append(sample)
    except ValueError as e:
        problems.append(f"unreadable tar ({e})")
    if len(samples) != entry["samples"]:
        problems.append(f"{len(samples)} samples != {entry['samples']}")
    bad = 0
    for s in samples:
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        try:
            if ext is None or ("cls" not in s and "labels" not in s):
                raise ValueError
            decode_rgb(s[ext])
        except ValueError:
            bad += 1
    if bad:
        problems.append(f"{bad} samples do not decode")
    return problems
