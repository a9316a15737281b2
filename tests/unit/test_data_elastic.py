"""Exact mode at sample granularity and elastic exactly-once resume, over real tar shards of real JPEGs.

Each sample's label is its own index in the corpus, so the labels a loader yields name exactly which samples
it read. A "layout" is (ranks, data.workers); every rank of a layout is a real `make_loader` in this process
(its DataLoader workers real processes), driven batch by batch as the trainer drives it.
"""

from __future__ import annotations

import io
import itertools
import random
from collections import Counter
from pathlib import Path

import pytest
from data_helpers import jpeg_bytes, write_corpus

from vit_scale.config.schema import DataConfig
from vit_scale.data.loader import make_loader, merge_states
from vit_scale.data.shards import ShardWriter
from vit_scale.data.shardset import resolve_shards
from vit_scale.data.streams import Basis, GlobalOrder, Plan, length, merge_intervals
from vit_scale.data.tar import tar_samples
from vit_scale.errors import UserError

IMG = 8
LAYOUTS = [(ranks, workers) for ranks in (1, 2, 4) for workers in (0, 1, 3)]


def rank_loaders(source, layout, micro: int, seed: int = 3, **cfg) -> list:
    ranks, workers = layout
    data = DataConfig(workers=workers, **{"shuffle_buffer": 5, **cfg})
    return [
        make_loader(
            str(source), data, train=True, img_size=IMG, batch_size=micro, rank=r, world_size=ranks, seed=seed
        )
        for r in range(ranks)
    ]


def take_labels(loader, batches: int) -> list[int]:
    out = []
    for _, labels in itertools.islice(iter(loader), batches):
        out += [int(x) for x in labels]
    return out


def sample_ids(source: Path, seed: int, spans) -> list[int]:
    """The corpus indices of global-order positions (the layout-free currency of a data state)."""
    shards = resolve_shards(str(source))
    order = GlobalOrder(shards, seed)
    offsets = [0, *itertools.accumulate(shards.counts)]
    return [offsets[i] + j for a, b in spans for i, lo, hi in order.pieces(a, b) for j in range(lo, hi)]


def consumed_positions(progress: dict, source: int = 0) -> list[tuple[int, int]]:
    """Every position consumed since the run began: below the frontier, except the holes."""
    basis = Basis.from_dict(progress["bases"][source])
    from vit_scale.data.streams import subtract_intervals

    return subtract_intervals([(0, basis.frontier)], basis.holes) if basis.frontier else []


# ---------------------------------------------------------------- the plan, as arithmetic


@pytest.mark.parametrize("total", [1, 7, 64, 101])
@pytest.mark.parametrize("consumers", [1, 3, 8, 12])
def test_every_pass_gives_every_worker_the_same_share_and_every_position_once(total, consumers):
    shards = type("S", (), {"counts": [total]})()
    plan = Plan(GlobalOrder(shards, 0), Basis(), consumers)
    read = []
    for k, start, share in itertools.islice(plan.passes(), 40):
        read += [(start + p * share, start + (p + 1) * share) for p in range(consumers)]
        end = start + share * consumers
        # A pass never reaches into the next epoch, and leaves fewer than P samples of its own to the next.
        assert end <= (k + 1) * total and (k + 1) * total - end < consumers
    spans = merge_intervals(read)
    assert length(spans) == sum(b - a for a, b in read), "no position is read twice"
    assert spans == [(0, end)], "and none is skipped"
    if total % consumers == 0:  # a fresh run's pass k is epoch k, each worker a contiguous 1/P of it
        assert all(share == total // consumers for _, _, share in itertools.islice(plan.passes(), 5))


def test_a_basis_with_holes_is_read_first_and_its_epoch_finished_in_the_first_pass():
    shards = type("S", (), {"counts": [30, 20]})()
    basis = Basis(frontier=70, holes=[(3, 5), (52, 60)])  # epoch 1 is [50, 100): 30 left after 70
    plan = Plan(GlobalOrder(shards, 0), basis, 4)
    k, start, share = next(plan.passes())
    assert (k, start, share) == (0, 0, (2 + 8 + 30) // 4)
    assert plan.to_global(0, 12) == [(3, 5), (52, 60), (70, 72)]
    assert plan.to_global(9, 11) == [(59, 60), (70, 71)]
    # More holes than the frontier's epoch has consumed: still the holes, then the rest of that epoch.
    late = Plan(GlobalOrder(shards, 0), Basis(frontier=103, holes=[(40, 50), (60, 70), (80, 90)]), 4)
    assert next(late.passes()) == (0, 0, (30 + 47) // 4)
    # A frontier on an epoch boundary: the holes alone make the first pass, or a whole epoch without holes.
    assert next(Plan(GlobalOrder(shards, 0), Basis(frontier=100, holes=[(90, 98)]), 4).passes())[2] == 2
    assert next(Plan(GlobalOrder(shards, 0), Basis(frontier=100), 4).passes())[2] == 50 // 4


# ---------------------------------------------------------------- reading ranges of one shard


class CountingReader(io.BufferedReader):
    """A file that counts the bytes it is asked for: what reading a range of a shard costs."""

    requested = 0

    def read(self, n=-1):
        data = super().read(n)
        CountingReader.requested += len(data)
        return data


def test_a_range_of_a_local_shard_reads_its_own_samples_and_only_the_headers_before_it(tmp_path):
    write_corpus(tmp_path, 40, shard_size=40, num_classes=40, size=(400, 300))
    path = tmp_path / "shard-000000.tar"
    with open(path, "rb") as raw:
        everything = [s["__key__"] for s in tar_samples(raw)]
    CountingReader.requested = 0
    with CountingReader(open(path, "rb", buffering=0)) as f:  # noqa: SIM115
        got = list(tar_samples(f, [(30, 33), (36, 38)]))
    assert [s["__key__"] for s in got] == everything[30:33] + everything[36:38]
    wanted = sum(len(v) for s in got for k, v in s.items() if k != "__key__")
    members = 3 * 40  # jpg, cls, json per sample
    # The wanted members' bytes, plus a 512-byte header per member up to the last one (nothing else read).
    assert wanted < CountingReader.requested <= wanted + 512 * members + 3 * 512 * 5
    assert CountingReader.requested < path.stat().st_size / 4


def test_one_shard_serves_two_ranks_of_four_workers_each_sample_once(tmp_path):
    """The VTAB-1k case: a train set of one shard, fine-tuned with the default 4 workers on 2 ranks."""
    write_corpus(tmp_path, 64, shard_size=1000, num_classes=64)
    assert len(resolve_shards(str(tmp_path)).urls) == 1
    loaders = rank_loaders(tmp_path, (2, 4), micro=4)
    seen = [take_labels(loader, 8) for loader in loaders]  # one epoch: 64 / (2 ranks × 4)
    assert [len(s) for s in seen] == [32, 32]
    assert sorted(seen[0] + seen[1]) == list(range(64))


# ---------------------------------------------------------------- elastic resume, every pair of layouts

T = 144  # three shards of 50, 50 and 44: the shares of many layouts cut through shards
GLOBAL = 12  # samples per step on every layout (the global micro batch), as train.global_batch fixes it
SAVED_AFTER = 3  # batches per rank before the checkpoint: mid-epoch under every layout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("elastic")
    write_corpus(d, T, shard_size=50, num_classes=T)
    return d


@pytest.fixture(scope="module")
def saved(corpus) -> dict:
    """Per layout: the labels its ranks yielded before the checkpoint and every rank's data state."""
    out = {}
    for layout in LAYOUTS:
        loaders = rank_loaders(corpus, layout, micro=GLOBAL // layout[0])
        seen = [take_labels(loader, SAVED_AFTER) for loader in loaders]
        out[layout] = ([x for s in seen for x in s], [loader.state_dict() for loader in loaders])
    return out


@pytest.mark.parametrize("before", LAYOUTS, ids=lambda lay: f"{lay[0]}x{lay[1]}")
def test_a_resume_under_every_other_layout_finishes_the_epoch_each_sample_once(corpus, saved, before):
    head, states = saved[before]
    assert len(head) == SAVED_AFTER * GLOBAL and len(set(head)) == len(head)
    progress = merge_states(states)
    assert sorted(sample_ids(corpus, 3, consumed_positions(progress))) == sorted(head)
    left = (T - len(head)) // GLOBAL  # steps to the end of the epoch, whatever the layout
    for after in LAYOUTS:
        if after == before:
            continue
        loaders = rank_loaders(corpus, after, micro=GLOBAL // after[0])
        for loader in loaders:
            loader.continue_from(progress)
        tails = [take_labels(loader, left) for loader in loaders]
        assert len({len(t) for t in tails}) == 1, f"{before} -> {after}: ranks got different counts"
        union = head + [x for t in tails for x in t]
        assert sorted(union) == list(range(T)), f"{before} -> {after}: not the corpus, each sample once"
        # The next epoch follows on every rank, and its own first samples are distinct.
        nxt = [x for loader in loaders for x in take_labels(loader, 1)]
        assert len(nxt) == GLOBAL and len(set(nxt)) == GLOBAL


def test_chained_resumes_over_uneven_numbers_read_each_position_once(tmp_path):
    """101 samples in shards of 17, micro batches that divide nothing, three layouts in a row with saves at
    random points: the yielded samples are exactly those of the consumed positions, each position once."""
    write_corpus(tmp_path, 101, shard_size=17, num_classes=101)
    rng = random.Random(7)
    chain = [((2, 3), 5), ((1, 0), 7), ((4, 1), 2), ((2, 0), 3)]
    yielded, progress = [], None
    for layout, micro in chain:
        loaders = rank_loaders(tmp_path, layout, micro=micro, seed=11, shuffle_buffer=9)
        for loader in loaders:
            if progress is not None:
                loader.continue_from(progress)
        steps = rng.randrange(5, 40)
        for loader in loaders:
            yielded += take_labels(loader, steps)
        progress = merge_states([loader.state_dict() for loader in loaders])
        positions = consumed_positions(progress)
        assert length(positions) == len(yielded)
        assert Counter(sample_ids(tmp_path, 11, positions)) == Counter(yielded)
    assert len(yielded) > 2 * 101  # the chain crossed epochs


def test_a_same_layout_resume_through_merge_states_continues_the_epoch_too(corpus):
    """Changing only the micro batch (or the shuffle buffer) is another layout as well."""
    loaders = rank_loaders(corpus, (2, 1), micro=6)
    head = [x for loader in loaders for x in take_labels(loader, 4)]
    states = [loader.state_dict() for loader in loaders]
    resumed = rank_loaders(corpus, (2, 1), micro=3, shuffle_buffer=2)
    assert not resumed[0].same_layout(states[0])
    with pytest.raises(UserError, match="micro batch per rank"):
        resumed[0].load_state_dict(states[0])
    for loader in resumed:
        loader.continue_from(merge_states(states))
    tail = [x for loader in resumed for x in take_labels(loader, (T - len(head)) // 6)]
    assert sorted(head + tail) == list(range(T))


def test_a_weighted_mixture_resumes_elsewhere_each_source_exactly_once_per_draw(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_corpus(a, 30, shard_size=7, num_classes=60)
    with ShardWriter(b, shard_size=4, classes=[str(i) for i in range(60)]) as w:
        for i in range(20):
            w.write(f"b{i}", jpeg_bytes(100 + i), "jpg", 30 + i, {})
    source = f"{a}::{b}"
    yielded = []
    loaders = rank_loaders(source, (2, 1), micro=4, weights=[2.0, 1.0])
    for loader in loaders:
        yielded += take_labels(loader, 9)
    progress = merge_states([loader.state_dict() for loader in loaders])
    resumed = rank_loaders(source, (1, 2), micro=8, weights=[2.0, 1.0])
    resumed[0].continue_from(progress)
    yielded += take_labels(resumed[0], 11)
    final = merge_states([resumed[0].state_dict()])
    from_a = Counter(sample_ids(a, 3, consumed_positions(final, 0)))
    from_b = Counter(30 + i for i in sample_ids(b, 3, consumed_positions(final, 1)))
    assert from_a + from_b == Counter(yielded)
    assert set(from_a) and set(from_b)


def test_merge_states_refuses_incomplete_or_mixed_checkpoints(corpus):
    states = [loader.state_dict() for loader in rank_loaders(corpus, (2, 0), micro=6)]
    with pytest.raises(UserError, match="not of all 2"):
        merge_states(states[:1])
    other = rank_loaders(corpus, (2, 0), micro=6, seed=4)[1].state_dict()
    with pytest.raises(UserError, match="disagree on seed"):
        merge_states([states[0], other])
    with pytest.raises(UserError, match="train.seed"):
        rank_loaders(corpus, (1, 0), micro=12, seed=5)[0].continue_from(merge_states(states))
    with pytest.raises(UserError, match="version 1"):
        merge_states([{**s, "version": 1} for s in states])


# ---------------------------------------------------------------- the corrupt-sample window


def corrupt_corpus(directory: Path) -> None:
    """One shard of 60 samples, 7 of them (20, 22, ..., 32) truncated JPEGs."""
    with ShardWriter(directory, shard_size=60, classes=["a"]) as w:
        for i in range(60):
            data = jpeg_bytes(i)[:200] if i in range(20, 33, 2) else jpeg_bytes(i)
            w.write(f"k{i}", data, "jpg", 0, {})


def test_the_corrupt_sample_window_and_counters_survive_a_resume(tmp_path):
    corrupt_corpus(tmp_path)
    cfg = dict(shuffle_buffer=1, max_bad_fraction=0.2, bad_window=30)  # more than 6 bad in 30 stops it

    def run(layout, micro, steps, state=None, progress=None):
        loaders = rank_loaders(tmp_path, layout, micro=micro, **cfg)
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
            if progress is not None:
                loader.continue_from(progress)
        got = 0
        try:
            for _ in itertools.islice(zip(*loaders), steps):  # every rank steps together
                got += 1
        except UserError as e:
            assert "corrupt" in str(e)
        return got, loaders

    # One uninterrupted worker meets its 7th bad sample in 30 (sample 32) after 26 good ones, 13 batches;
    # a resume after 12 batches must stop there too, which it can only do if the window came through the
    # checkpoint (a fresh one would see 3 bad samples and run on).
    stops_at, _ = run((1, 0), 2, 1000)
    assert stops_at == 13
    _, first = run((1, 0), 2, stops_at - 1)
    state = first[0].state_dict()
    assert first[0].bad_samples == sum(w["total"] for w in state["windows"]) > 0
    more, resumed = run((1, 0), 2, 1000, state=state)
    assert stops_at - 1 + more == stops_at
    assert resumed[0].bad_samples > first[0].bad_samples

    # Across layouts the totals add up: 2 ranks' counters land on the one rank that continues.
    _, two = run((2, 1), 2, 3)
    totals = sum(loader.bad_samples for loader in two)
    assert totals > 0
    _, one = run((1, 0), 4, 0, progress=merge_states([loader.state_dict() for loader in two]))
    assert one[0].bad_samples == totals


# ---------------------------------------------------------------- sources without an index


def test_a_counted_pipe_source_gives_two_ranks_equal_batches_and_resumes_elsewhere(tmp_path):
    """`pipe:cat` streams cannot seek: a range is reached by reading the bytes before it. Counted once with
    `vit-scale shards count`, such a source splits like a directory: 2 ranks × 2 workers, equal batches,
    one epoch the corpus; and a resume on one rank finishes the epoch through the same pipes."""
    from vit_scale.commands.shards import main as shards_main

    shards = tmp_path / "shards"
    write_corpus(shards, 96, shard_size=40, num_classes=96)  # 40 + 40 + 16
    pipe = f"pipe:cat {shards}/shard-{{000000..000002}}.tar"
    with pytest.raises(UserError, match="vit-scale shards count"):
        rank_loaders(pipe, (2, 2), micro=3)
    listed = tmp_path / "train.json"
    assert shards_main(["count", pipe, "--out", str(listed), "--threads", "2"]) == 0
    loaders = rank_loaders(listed, (2, 2), micro=3)
    assert loaders[0].num_samples == 96 and loaders[0].num_classes == 96
    head = [take_labels(loader, 4) for loader in loaders]
    assert [len(h) for h in head] == [12, 12]
    states = [loader.state_dict() for loader in loaders]
    (one,) = rank_loaders(listed, (1, 0), micro=6)
    one.continue_from(merge_states(states))
    tail = take_labels(one, (96 - 24) // 6)
    assert sorted(head[0] + head[1] + tail) == list(range(96))
    # The whole epoch on 2 ranks: the same number of batches each, every sample once.
    loaders = rank_loaders(listed, (2, 2), micro=3)
    epoch = [take_labels(loader, 16) for loader in loaders]
    assert sorted(epoch[0] + epoch[1]) == list(range(96))
