"""`vit-scale shards verify`'s check of one shard against its index entry."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from vit_scale.data.tar import tar_samples
from vit_scale.data.transforms import IMAGE_EXTS, decode_rgb


def label_problem(sample: dict, kind: str, num_classes: int | None) -> str:
    """Why a sample's label is wrong for a shard set of `kind` labels ("cls" or "labels") and
    `num_classes` classes, or '' when it is right. The pipeline would train on a wrong label silently."""
    other = "labels" if kind == "cls" else "cls"
    if kind not in sample:
        return f"a {other} label in a set of {kind} labels" if other in sample else "no label"
    try:
        text = sample[kind].decode("ascii").strip()
        ids = [int(x) for x in text.split(";")] if text else []
    except ValueError:
        return "an unparsable label"
    if kind == "cls" and len(ids) != 1:
        return "an unparsable label"
    if num_classes is not None and any(not 0 <= i < num_classes for i in ids):
        return f"a label outside [0, {num_classes})"
    return ""


def verify_shard(
    path: Path, entry: dict, *, labels: str = "cls", num_classes: int | None = None
) -> list[str]:
    """Problems with one shard: size, sha256, sample count, every image decoding, every label of the
    kind the index declares (`labels`) and within [0, num_classes), and no link, device or FIFO member."""
    if not path.exists():
        return ["missing"]
    data = path.read_bytes()
    problems = []
    if len(data) != entry["bytes"]:
        problems.append(f"size {len(data)} != {entry['bytes']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        problems.append("sha256 mismatch")
    samples, skipped = [], []
    try:
        for sample in tar_samples(io.BytesIO(data), skipped=skipped):
            samples.append(sample)
    except ValueError as e:
        problems.append(f"unreadable tar ({e})")
    if len(samples) != entry["samples"]:
        problems.append(f"{len(samples)} samples != {entry['samples']}")
    if skipped:
        problems.append(f"{len(skipped)} members skipped, not regular files: {', '.join(skipped[:3])}")
    bad = 0
    wrong: dict[str, list[str]] = {}
    for s in samples:
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        why = label_problem(s, labels, num_classes)
        if why:
            wrong.setdefault(why, []).append(s["__key__"])
        try:
            if ext is None:
                raise ValueError
            decode_rgb(s[ext])
        except ValueError:
            bad += 1
    if bad:
        problems.append(f"{bad} samples do not decode")
    for why, keys in wrong.items():
        problems.append(f"{len(keys)} samples with {why} (first: {keys[0]})")
    return problems
