"""`vit-scale shards stats`: samples per class, image sizes and bytes of a shard directory."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

from PIL import Image

from vit_scale.data.shards import parse_labels, read_index
from vit_scale.data.tar import tar_samples
from vit_scale.data.transforms import IMAGE_EXTS


def shard_stats(directory: Path) -> dict:
    """Samples per class, image sizes (from the metadata the builder wrote, else the image) and bytes.

    A shard that cannot be read to its end counts with the samples before the break and is listed under
    `unreadable`; `verify` says what is wrong with it.
    """
    index = read_index(directory)
    per_class: Counter = Counter()
    sizes: list[tuple[int, int]] = []
    image_bytes = 0
    unreadable = []
    for entry in index["shards"]:
        for s in _readable_samples(directory, entry["name"], unreadable):
            if "cls" in s:
                per_class[int(s["cls"])] += 1
            elif "labels" in s:
                per_class.update(parse_labels(s["labels"]))
            ext = next((e for e in IMAGE_EXTS if e in s), None)
            if ext is None:
                continue
            image_bytes += len(s[ext])
            meta = json.loads(s["json"]) if "json" in s else {}
            if "width" in meta and "resized" not in meta:
                sizes.append((meta["width"], meta["height"]))
                continue
            try:
                with Image.open(io.BytesIO(s[ext])) as im:
                    sizes.append(im.size)
            except Exception:  # a broken image has no size; `verify` reports it
                pass
    return {
        "index": index,
        "per_class": per_class,
        "sizes": sizes,
        "image_bytes": image_bytes,
        "unreadable": unreadable,
    }


def _readable_samples(directory: Path, name: str, unreadable: list[str]):
    """The samples of a shard up to where it breaks; a broken or missing shard's name goes to `unreadable`."""
    try:
        with open(directory / name, "rb") as f:
            yield from tar_samples(f)
    except (ValueError, OSError):
        unreadable.append(name)
