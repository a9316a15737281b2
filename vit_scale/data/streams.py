"""Raw-sample streams: the layout-free order of a shard set's samples, the plan that splits what is left of
it between logical workers, and the seeded stream each logical worker reads.

The global order (exact mode). Epoch e permutes the shards by (seed, e) and lays their samples end to end;
epochs follow each other, so position x of the global order is sample x mod T of epoch x // T for a shard
set of T samples. It depends on the seed and the shard set only, never on how many ranks and workers read
it: positions in it are the layout-free currency of a data position.

The basis and the plan. What a run has left to read is a basis: a frontier F (nothing from F on consumed)
and holes (positions before F not consumed yet). R, the sequence still to read, is the holes in order and
then the global order from F on. P = world_size × workers logical workers read R in passes; pass k ends at
the k-th epoch boundary of R, each worker takes an equal contiguous q_k = (E_k - s_k) // P of it, and the
fewer than P samples left over open the next pass. So every worker reads the same number of samples in
every pass, and every position of the global order is read once. A fresh run's basis is (0, no holes):
pass k is epoch k, each worker reading a contiguous 1/P of it. A resume with another layout merges what
every rank consumed into a new basis, and the new layout's first pass finishes the interrupted epoch.

Reading. A worker's share of a pass is a list of (shard, first, end) ranges in global order, read one shard
visit at a time: the shard is opened once, and the samples before and between the needed ones are passed
over, their bytes seeked over in a local file (one 512-byte header read per member) or read and dropped from
a pipe or download. Reading stays sequential within each shard; a shuffle buffer per worker and pass mixes
the samples. The cost of a range is therefore its own samples plus the headers (local) or bytes (streamed)
of the samples before it in its shard; a fresh run's ranges split a shard only where a worker's share ends.

Each stream is a pure function of (shard set, seed, basis, plan id, layout, logical worker), so a position in
it is a count of samples and restoring it replays the same samples; `consumed()` turns a count back into the
global-order intervals the worker has yielded, which is what a checkpoint keeps.

`resampled` mode draws shards with replacement, a fresh draw per logical worker, for corpora too large for
epochs. `eval` mode reads one pass: each worker a contiguous 1/P of the unshuffled corpus, or whole shards
round-robin when counts are unknown.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from webdataset import gopen

from vit_scale.data.shardset import ShardSet
from vit_scale.data.tar import tar_samples

BAD = None  # a sample position whose bytes could not be read (truncated shard): decodes as a bad sample

Intervals = list[tuple[int, int]]  # sorted, disjoint, non-empty [a, b) ranges of positions


def derive_seed(*parts) -> int:
    """A 64-bit seed from a tuple of ints and strings; stable across processes and Python versions."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def plan_seed(seed: int, plan: int | None, *parts) -> int:
    """A stream's seed: a fresh run's (plan None) is the one every earlier version drew, and each resume
    with another layout (a new plan id) gets streams of its own."""
    return derive_seed(seed, *parts) if plan is None else derive_seed(seed, "plan", plan, *parts)


# ---------------------------------------------------------------- intervals


def merge_intervals(spans) -> Intervals:
    """Sorted, disjoint, non-empty intervals covering the same positions as `spans`."""
    out: Intervals = []
    for a, b in sorted((int(a), int(b)) for a, b in spans if b > a):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def subtract_intervals(a: Intervals, b: Intervals) -> Intervals:
    """The positions of `a` that are not in `b` (both merged)."""
    out: Intervals = []
    j = 0
    for lo, hi in a:
        while j < len(b) and b[j][1] <= lo:
            j += 1
        k = j
        while lo < hi and k < len(b) and b[k][0] < hi:
            if b[k][0] > lo:
                out.append((lo, b[k][0]))
            lo = max(lo, b[k][1])
            k += 1
        if lo < hi:
            out.append((lo, hi))
    return out


def length(spans: Intervals) -> int:
    return sum(b - a for a, b in spans)


def _runs(marks: bytearray, offset: int) -> Intervals:
    """The runs of 1s in `marks`, as intervals shifted by `offset`."""
    out, i = [], marks.find(1)
    while i >= 0:
        j = marks.find(0, i)
        j = len(marks) if j < 0 else j
        out.append((offset + i, offset + j))
        i = marks.find(1, j)
    return out


# ---------------------------------------------------------------- the global order, the basis, the plan


class GlobalOrder:
    """Position → (shard, sample) in the layout-free order of one shard set with known counts."""

    def __init__(self, shards: ShardSet, seed: int):
        self.counts, self.seed = shards.counts, seed
        self.total = sum(self.counts)
        self._epochs: dict[int, tuple[list[int], list[int]]] = {}

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch) % 2**63)
        return torch.randperm(len(self.counts), generator=g).tolist()

    def _epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        if epoch not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.clear()
            order = self.order(epoch)
            self._epochs[epoch] = (order, [0, *itertools.accumulate(self.counts[i] for i in order)])
        return self._epochs[epoch]

    def pieces(self, a: int, b: int) -> list[tuple[int, int, int]]:
        """(shard, first, end) sample ranges that make up positions [a, b), in order."""
        out = []
        while a < b:
            epoch, at = divmod(a, self.total)
            order, starts = self._epoch(epoch)
            i = bisect.bisect_right(starts, at) - 1
            shard, first = order[i], at - starts[i]
            n = min(self.counts[shard] - first, b - a)
            out.append((shard, first, first + n))
            a += n
        return out


@dataclass
class Basis:
    """Where a plan starts, in global-order positions: everything before `frontier` except the `holes`
    was consumed before it (see the module docstring)."""

    frontier: int = 0
    holes: Intervals = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"frontier": self.frontier, "holes": [list(h) for h in self.holes]}

    @classmethod
    def from_dict(cls, d: dict) -> Basis:
        return cls(int(d["frontier"]), [(int(a), int(b)) for a, b in d["holes"]])


class Plan:
    """The passes in which `consumers` logical workers read R, what is left after a basis."""

    def __init__(self, order: GlobalOrder, basis: Basis, consumers: int):
        self.order, self.basis, self.consumers = order, basis, consumers
        self.hole_starts = [0, *itertools.accumulate(b - a for a, b in basis.holes)]
        held, total, frontier = self.hole_starts[-1], order.total, basis.frontier
        # The first epoch boundary of R after its start: after the holes, the end of the frontier's epoch
        # (a frontier on a boundary with no holes before it starts a whole epoch).
        self.first_end = held + -(-frontier // total) * total - frontier if total else 0
        if self.first_end == 0:
            self.first_end = total

    def passes(self) -> Iterator[tuple[int, int, int]]:
        """(pass k, its start s_k in R, each worker's share q_k), endlessly."""
        start, end, k = 0, self.first_end, 0
        while True:
            share = (end - start) // self.consumers
            yield k, start, share
            start += share * self.consumers
            end += self.order.total
            k += 1

    def to_global(self, a: int, b: int) -> Intervals:
        """The global-order intervals of R's positions [a, b), in R's order."""
        out = []
        held = self.hole_starts[-1]
        if a < held:
            i = bisect.bisect_right(self.hole_starts, a) - 1
            while a < min(b, held):
                lo, hi = self.basis.holes[i]
                off = a - self.hole_starts[i]
                n = min(hi - lo - off, b - a)
                out.append((lo + off, lo + off + n))
                a += n
                i += 1
        if a < b:
            out.append((self.basis.frontier + a - held, self.basis.frontier + b - held))
        return out


def yielded_offsets(share: int, n: int, bufsize: int, rng: random.Random) -> Intervals:
    """Which offsets of a pass's share the first n samples out of the shuffle buffer came from."""
    if bufsize <= 1:
        return [(0, n)] if n else []
    marks = bytearray(share)
    for x in itertools.islice(shuffled(iter(range(share)), bufsize, rng), n):
        marks[x] = 1
    return _runs(marks, 0)


# ---------------------------------------------------------------- reading shards


def read_shard(url: str, expected: int | None, spans: Sequence[tuple[int, int]] | None = None):
    """Samples of one tar shard (a path, or any URL WebDataset's `gopen` opens), as `tar_samples` gives them,
    all of them or only the samples numbered in `spans` (sorted disjoint (first, end) pairs).

    When the count is known, exactly that many items come out (the shard's, or the spans'): a shard that ends
    early (truncated, unreadable) is padded with BAD so positions in the stream stay those of the index.
    """
    want = expected if spans is None else sum(b - a for a, b in spans)
    produced = 0
    broken = False
    try:
        stream = gopen(url)
    except Exception:  # a broken shard must not end the run: its unread samples are counted bad
        stream, broken = None, True
    if stream is not None:
        try:
            for sample in tar_samples(stream, spans):
                if want is not None and produced >= want:
                    break
                yield sample
                produced += 1
            else:
                stream.close()  # a pipe's command reports its failure here
        except Exception:
            broken = True
        finally:
            try:
                stream.close()  # a pipe closed before its end sees its command die of SIGPIPE: not a fault
            except Exception:  # noqa: BLE001
                pass
    if broken and want is None:
        want = produced + 1  # how many were lost is unknown: count the break itself once
    if want is not None:
        for _ in range(want - produced):
            yield BAD


def _visits(pieces: list[tuple[int, int, int]]) -> Iterator[tuple[int, Intervals]]:
    """Consecutive ranges of one shard, in ascending order, become one visit: the shard is opened once."""
    shard, spans = None, []
    for i, first, end in pieces:
        if i == shard and first >= spans[-1][1]:
            if first == spans[-1][1]:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((first, end))
            continue
        if shard is not None:
            yield shard, spans
        shard, spans = i, [(first, end)]
    if shard is not None:
        yield shard, spans


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
    """The raw samples of one logical worker of one shard set, epoch (or pass) after epoch."""

    def __init__(
        self,
        shards: ShardSet,
        *,
        mode: str,
        seed: int,
        p: int,
        consumers: int,
        shuffle: int,
        basis: Basis | None = None,
        plan: int | None = None,
    ):
        self.shards, self.mode, self.seed = shards, mode, seed
        self.p, self.consumers, self.shuffle, self.plan_id = p, consumers, shuffle, plan
        self.plan = None
        if mode == "exact":
            order = GlobalOrder(shards, seed)
            self.plan = Plan(order, basis or Basis(), consumers)

    def _resampled_draws(self, epoch: int) -> list[int]:
        # Each logical worker's own draw with replacement; one "epoch" is about 1/P of the shards.
        n = len(self.shards.urls)
        rng = random.Random(plan_seed(self.seed, self.plan_id, "resample", epoch, self.p))
        return [rng.randrange(n) for _ in range(max(1, -(-n // self.consumers)))]

    def _segments(self, epoch: int) -> list[tuple[int, int, int]]:
        """(shard, first sample, end sample) this worker reads in a resampled "epoch" or in the one eval
        pass; end -1 means to the shard's end."""
        counts = self.shards.counts
        if self.mode == "resampled":
            return [(i, 0, counts[i] if counts else -1) for i in self._resampled_draws(epoch)]
        order = list(range(len(self.shards.urls)))
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

    def _seed_of_pass(self, k: int) -> int:
        return plan_seed(self.seed, self.plan_id, "shuffle", k, self.p)

    def _pass(self, k: int, start: int, share: int) -> Iterator[dict | None]:
        """This worker's share of pass k of the plan, read in global order through the shuffle buffer."""
        a = start + self.p * share
        pieces = [piece for u, v in self.plan.to_global(a, a + share) for piece in self.plan.order.pieces(u, v)]
        urls, counts = self.shards.urls, self.shards.counts

        def raw():
            for i, spans in _visits(pieces):
                whole = spans == [(0, counts[i])]  # the common case: no sample to pass over
                yield from read_shard(urls[i], counts[i], None if whole else spans)

        return shuffled(raw(), self.shuffle, random.Random(self._seed_of_pass(k)))

    def _nth_pass(self, k: int) -> tuple[int, int, int]:
        return next(itertools.islice(self.plan.passes(), k, None))

    def epoch_length(self, epoch: int) -> int | None:
        """Samples this worker reads in an epoch (exact mode: in pass `epoch` of its plan)."""
        if self.plan is not None:
            return self._nth_pass(epoch)[2]
        if self.shards.counts is None:
            return None
        return sum(b - a for _, a, b in self._segments(epoch))

    def epoch(self, epoch: int) -> Iterator[dict | None]:
        if self.plan is not None:
            return self._pass(*self._nth_pass(epoch))
        urls, counts = self.shards.urls, self.shards.counts

        def raw():
            for i, a, b in self._segments(epoch):
                expected = counts[i] if counts is not None else None
                yield from itertools.islice(read_shard(urls[i], expected), a, None if b < 0 else b)

        return shuffled(raw(), self.shuffle, random.Random(self._seed_of_pass(epoch)))

    def consumed(self, n: int) -> Intervals:
        """The global-order positions of the first n samples this worker yields (exact mode)."""
        spans: Intervals = []
        for k, start, share in self.plan.passes():
            if n <= 0:
                break
            a = start + self.p * share
            if n >= share:
                spans.append((a, a + share))
                n -= share
                continue
            rng = random.Random(self._seed_of_pass(k))
            spans += [(a + x, a + y) for x, y in yielded_offsets(share, n, self.shuffle, rng)]
            break
        return merge_intervals(g for a, b in spans for g in self.plan.to_global(a, b))

    def stream(self, skip: int, endless: bool) -> Iterator[dict | None]:
        """Raw samples from position `skip` on: whole epochs skipped by count, the rest read and dropped."""
        if self.plan is not None:
            yield from self._planned(skip)
            return
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

    def _planned(self, skip: int) -> Iterator[dict | None]:
        """Exact mode: the plan's passes, endlessly. A pass too short to give every worker a sample (q_k = 0)
        hands its samples on to the next one."""
        if self.plan.order.total == 0:
            raise EmptyStream(f"{self.shards.spec} holds no samples")
        for k, start, share in self.plan.passes():
            if skip >= share:
                skip -= share
                continue
            items = self._pass(k, start, share)
            for _ in itertools.islice(items, skip):
                pass
            skip = 0
            yield from items
