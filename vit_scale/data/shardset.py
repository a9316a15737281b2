"""Shard sets: which tar files a source names, in a fixed order, with their sample counts when known.

A source is a shard directory with index.json, a path or brace pattern, a `pipe:`/http(s) URL, a shard
list (a `.json` file: an index.json, or what `vit-scale shards count` writes for sources without one), an
index.json served over http(s) (its shards beside it), or an `A::B` mixture of those. Counts come from the index, checked against local files, so the streams can
split an epoch at sample granularity and skip whole epochs by arithmetic on resume. Exact-mode training
needs them; `count_shards` reads a source once to write them down.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from webdataset import gopen
from webdataset.shardlists import expand_urls

from vit_scale.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    parse_index,
    parse_labels,
    read_index,
    read_index_file,
)
from vit_scale.data.tar import split_key, tar_members
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


def _from_shard_list(path: Path) -> ShardSet:
    """A `.json` shard list: shards by `name` (beside the file, checked like a directory's) or by `url`."""
    index = read_index_file(path)
    shards = index["shards"]
    if not shards:
        raise UserError(f"{path} lists no shards")
    if all("name" in s for s in shards):
        names = [s["name"] for s in shards]
        counts = _check_against_index(path.parent, index, names)
        urls = [str(path.parent / n) for n in names]
    else:
        urls = [str(s["url"]) for s in shards]
        counts = [int(s["samples"]) for s in shards]
        missing = [u for u in urls if not _is_remote(u) and not Path(u).exists()]
        if missing:
            raise UserError(f"{path} lists {missing[0]}, which does not exist; count the shards again")
    return ShardSet(str(path), urls, counts, int(index.get("num_classes", 0)), index.get("labels", ""))


def _from_remote_index(url: str) -> ShardSet:
    """An index.json served over http(s) (or any URL `gopen` reads): its shards by name, beside it."""
    try:
        stream = gopen(url)
        try:
            text = stream.read().decode()
        finally:
            stream.close()
    except Exception as e:  # noqa: BLE001 - any failure to fetch it is one message
        raise UserError(f"cannot read the shard index {url}: {e}") from None
    index = parse_index(text, url)
    base = url.rsplit("/", 1)[0]
    shards = index["shards"]
    if not shards or not all("name" in s for s in shards):
        raise UserError(f"{url} lists no shards by name; serve the index.json `vit-scale shards build` wrote")
    urls = [f"{base}/{s['name']}" for s in shards]
    counts = [int(s["samples"]) for s in shards]
    return ShardSet(url, urls, counts, int(index.get("num_classes", 0)), index.get("labels", ""))


def resolve_shards(spec: str) -> ShardSet:
    """A shard set from a directory with index.json, a `.json` shard list, a path or brace pattern, or a
    pipe:/http(s) URL."""
    spec = spec.strip()
    if not spec:
        raise UserError("no shard source given; set data.train / data.val to a shard directory or pattern")
    path = Path(spec)
    if not _is_remote(spec) and "{" not in spec and not path.exists():
        raise UserError(f"shard source {spec} does not exist; build it with `vit-scale shards build`")
    if not _is_remote(spec) and path.is_file() and path.suffix == ".json":
        return _from_shard_list(path)
    if _is_remote(spec) and not spec.startswith("pipe:") and spec.endswith(".json"):
        return _from_remote_index(spec)
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


def _count_one(url: str) -> tuple[int, set[int], str]:
    """(samples, label ids, label kind) of one shard: the label members are read, the rest passed over."""
    samples, classes, kind, key_now = 0, set(), "", None

    def want(name: str) -> bool:
        ext = split_key(name)[1]
        return ext is not None and ext.lower() in ("cls", "labels")

    stream = gopen(url)
    try:
        for name, data in tar_members(stream, want=want):
            key, ext = split_key(name)
            if key is None:
                continue
            if key != key_now:
                samples, key_now = samples + 1, key
            if data is not None:
                kind = ext.lower()
                classes.update(parse_labels(data) if kind == "labels" else [int(data.decode().strip())])
    finally:
        stream.close()
    return samples, classes, kind


def count_shards(spec: str, threads: int = 8) -> dict:
    """A shard list for `spec` (a pattern or URL without index.json): every shard read once, its samples
    counted. Reads the label members and passes over the rest (seeking in local files, reading streams).
    The class count is the largest label seen plus one."""
    urls = expand_urls(spec.strip())
    if not urls:
        raise UserError(f"shard pattern {spec!r} names no shards")

    def count(url: str):
        try:
            return _count_one(url)
        except Exception as e:  # noqa: BLE001 - any failure names the shard
            raise UserError(f"cannot count {url}: {e}; repair or re-copy that shard, or leave it out") from None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(count, urls))
    classes = set().union(*(c for _, c, _ in results))
    kinds = {k for _, _, k in results if k}
    if len(kinds) > 1:
        raise UserError(f"{spec} mixes single labels (.cls) and multi-labels (.labels); count them apart")
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": spec,
        "labels": kinds.pop() if kinds else "",
        "num_classes": max(classes) + 1 if classes else 0,
        "num_samples": sum(n for n, _, _ in results),
        "num_shards": len(urls),
        "shards": [{"url": u, "samples": n} for u, (n, _, _) in zip(urls, results)],
    }
