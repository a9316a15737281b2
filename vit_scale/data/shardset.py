"""Shard sets: which tar files a source names, in a fixed order, with their sample counts when known.

A source is a shard directory with index.json, a path or brace pattern, a `pipe:`/http(s) URL, or an
`A::B` mixture of those. Counts come from index.json, checked against the files, so the streams can split
an epoch at sample granularity and skip whole epochs by arithmetic on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from vit_scale.data.shards import INDEX_NAME, read_index
from vit_scale.errors import UserError


@dataclass
class ShardSet:
    """One shard source: URLs in a fixed order, with sample counts when an index.json gives them."""

    spec: str
    urls: list[str]
    counts: list[int] | None
    num_classes: int
    labels: str  # "cls" or "labels" as written; "" when unknown

    @property
    def num_samples(self) -> int:
        return sum(self.counts) if self.counts is not None else -1


def _is_remote(url: str) -> bool:
    return url.startswith(("pipe:", "http://", "https://", "gs://", "s3://", "ais://"))


def _check_against_index(directory: Path, index: dict, names: list[str]) -> list[int]:
    """Per-shard counts for `names` from the index, refusing shards the index does not describe."""
    by_name = {s["name"]: s for s in index["shards"]}
    counts = []
    for name in names:
        shard = by_name.get(name)
        if shard is None:
            raise UserError(f"{directory / INDEX_NAME} does not list shard {name}; rebuild the index")
        path = directory / name
        if not path.exists():
            raise UserError(
                f"{directory / INDEX_NAME} lists {name} but the file is missing; "
                "copy the complete shard set or rebuild it"
            )
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise UserError(
                f"{path} is {size} bytes but {INDEX_NAME} says {shard['bytes']}: the shard and its index do "
                "not match (truncated copy?); run `vit-scale shards verify` and rebuild or re-copy it"
            )
        counts.append(int(shard["samples"]))
    return counts


def resolve_shards(spec: str) -> ShardSet:
    """A shard set from a directory with index.json, a path or brace pattern, or a pipe:/http(s) URL."""
    spec = spec.strip()
    if not spec:
        raise UserError("no shard source given; set data.train / data.val to a shard directory or pattern")
    path = Path(spec)
    if not _is_remote(spec) and "{" not in spec and not path.exists():
        raise UserError(f"shard source {spec} does not exist; build it with `vit-scale shards build`")
    if not _is_remote(spec) and "{" not in spec and path.is_dir():
        index = read_index(path)
        names = [s["name"] for s in index["shards"]]
        if not names:
            raise UserError(f"{path} holds no shards (index.json lists none); build it with samples in it")
        counts = _check_against_index(path, index, names)
        return ShardSet(
            spec,
            [str(path / n) for n in names],
            counts,
            int(index.get("num_classes", 0)),
            index.get("labels", ""),
        )
    urls = expand_urls(spec)
    if not urls:
        raise UserError(f"shard pattern {spec!r} names no shards")
    if _is_remote(spec):
        return ShardSet(spec, urls, None, 0, "")
    missing = [u for u in urls if not Path(u).exists()]
    if missing:
        raise UserError(f"{len(missing)} of {len(urls)} shards in {spec!r} do not exist, e.g. {missing[0]}")
    # Shards named by pattern still get counts from their directory's index.json when it lists them all.
    dirs = {Path(u).parent for u in urls}
    if len(dirs) == 1:
        directory = dirs.pop()
        if (directory / INDEX_NAME).exists():
            index = read_index(directory)
            counts = _check_against_index(directory, index, [Path(u).name for u in urls])
            return ShardSet(spec, urls, counts, int(index.get("num_classes", 0)), index.get("labels", ""))
    return ShardSet(spec, urls, None, 0, "")


def resolve_source(source: str, weights: list[float]) -> tuple[list[ShardSet], list[float] | None]:
    """Shard sets of an `A::B` source and their mixing weights (None: concatenate them into one set)."""
    parts = [p for p in source.split("::") if p.strip()]
    if not parts:
        raise UserError("no shard source given; set data.train / data.val to a shard directory or pattern")
    sets = [resolve_shards(p) for p in parts]
    if not weights:
        if len(sets) == 1:
            return sets, None
        counts = None if any(s.counts is None for s in sets) else [c for s in sets for c in s.counts]
        merged = ShardSet(
            source,
            [u for s in sets for u in s.urls],
            counts,
            max(s.num_classes for s in sets),
            sets[0].labels,
        )
        return [merged], None
    # One weight per source, non-negative with a positive sum: checked by the validation pass.
    return sets, [float(w) for w in weights]
