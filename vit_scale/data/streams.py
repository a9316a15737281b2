"""Raw-sample streams: a shard's samples at the positions of its index, and the seeded stream of samples
one logical worker reads from one shard set, epoch after epoch.

Each stream is a pure function of (shard set, seed, logical worker): the shard order of each epoch, the
shuffle buffer's draws and the split between workers all derive from those numbers, so a position in the
stream is a count of samples and restoring it replays the same samples.

Splitting. In `exact` mode every epoch permutes the shards by (seed, epoch) and lays their samples end to end;
the P = world_size × workers logical workers each take one contiguous 1/P of that sequence, so each reads
about 1/P of the shards, every sample is read exactly once per epoch, and all ranks get the same count to
within one sample. Without known counts (a `pipe:` source with no index.json) workers take whole shards
round-robin instead, still exactly once. `resampled` mode draws shards with replacement, a fresh draw per
logical worker, for corpora too large for epochs.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterator

import torch
from webdataset import gopen

from vit_scale.data.shardset import ShardSet
from vit_scale.data.tar import tar_samples

BAD = None  # a sample position whose bytes could not be read (truncated shard): decodes as a bad sample


def derive_seed(*parts) -> int:
    """A 64-bit seed from a tuple of ints and strings; stable across processes and Python versions."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def read_shard(url: str, expected: int | None) -> Iterator[dict | None]:
    """Samples of one tar shard (a path, or any URL WebDataset's `gopen` opens), as `tar_samples` gives them.

    When the shard's count is known, exactly that many items come out: a shard that ends early (truncated,
    unreadable) is padded with BAD so positions in the stream stay those of the index.
    """
    produced = 0
    try:
        stream = gopen(url)
        try:
            for sample in tar_samples(stream):
                if expected is not None and produced >= expected:
                    return
                yield sample
                produced += 1
        finally:
            stream.close()
    except Exception:  # a broken shard must not end the run: its unread samples are counted bad
        if expected is None:
            expected = produced + 1  # how many were lost is unknown: count the break itself once
    if expected is not None:
        for _ in range(expected - produced):
            yield BAD


def shuffled(items: Iterator, bufsize: int, rng: random.Random) -> Iterator:
    """A shuffle buffer whose draws come from rng only, so the output order is reproducible."""
    if bufsize <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class EmptyStream(Exception):
    """A training stream whose shards hold no samples for one of its workers."""


class EpochStream:
    """The raw samples of one logical worker of one shard set, epoch after epoch."""

    def __init__(self, shards: ShardSet, *, mode: str, seed: int, p: int, consumers: int, shuffle: int):
        self.shards, self.mode, self.seed = shards, mode, seed
        self.p, self.consumers, self.shuffle = p, consumers, shuffle

    def _order(self, epoch: int) -> list[int]:
        n = len(self.shards.urls)
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch) % 2**63)
        return torch.randperm(n, generator=g).tolist()

    def _resampled_draws(self, epoch: int) -> list[int]:
        # Each logical worker's own draw with replacement; one "epoch" is about 1/P of the shards.
        n = len(self.shards.urls)
        rng = random.Random(derive_seed(self.seed, "resample", epoch, self.p))
        return [rng.randrange(n) for _ in range(max(1, -(-n // self.consumers)))]

    def _segments(self, epoch: int) -> list[tuple[int, int, int]]:
        """(shard, first sample, end sample) this worker reads in an epoch; end -1 means to the shard's end."""
        counts = self.shards.counts
        if self.mode == "resampled":
            return [(i, 0, counts[i] if counts else -1) for i in self._resampled_draws(epoch)]
        order = self._order(epoch) if self.mode == "exact" else list(range(len(self.shards.urls)))
        if counts is None:
            return [(i, 0, -1) for i in order[self.p :: self.consumers]]
        total = sum(counts)
        lo, hi = self.p * total // self.consumers, (self.p + 1) * total // self.consumers
        segments, start = [], 0
        for i in order:
            end = start + counts[i]
            a, b = max(lo, start), min(hi, end)
            if a < b:
                segments.append((i, a - start, b - start))
            start = end
        return segments

    def epoch_length(self, epoch: int) -> int | None:
        if self.shards.counts is None:
            return None
        return sum(b - a for _, a, b in self._segments(epoch))

    def epoch(self, epoch: int) -> Iterator[dict | None]:
        def raw():
            for i, a, b in self._segments(epoch):
                url = self.shards.urls[i]
                expected = self.shards.counts[i] if self.shards.counts is not None else None
                yield from itertools.islice(read_shard(url, expected), a, None if b < 0 else b)

        rng = random.Random(derive_seed(self.seed, "shuffle", epoch, self.p))
        return shuffled(raw(), self.shuffle, rng)

    def stream(self, skip: int, endless: bool) -> Iterator[dict | None]:
        """Raw samples from position `skip` on: whole epochs skipped by count, the rest read and dropped."""
        epoch = 0
        while True:
            length = self.epoch_length(epoch)
            if length is None or skip < length or not endless or length == 0:
                break
            skip -= length
            epoch += 1
        while True:
            items = self.epoch(epoch)
            if skip:
                for _ in itertools.islice(items, skip):
                    pass
                skip = 0
            produced = 0
            for item in items:
                produced += 1
                yield item
            if not endless:
                return
            if not produced:
                # An endless stream that yields nothing would hang this rank (and the others at the next
                # collective) instead of failing.
                raise EmptyStream(f"worker {self.p} read no samples from {self.shards.spec} in epoch {epoch}")
            epoch += 1
