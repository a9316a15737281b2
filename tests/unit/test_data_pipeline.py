"""The streaming pipeline over real tar shards of real JPEGs: splitting, exact resume, resampling, refusals.

Each sample's label is its own index, so the labels a loader yields name exactly which samples it read.
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import jpeg_bytes, write_corpus

from vit_scale.config.schema import DataConfig
from vit_scale.data.loader import make_loader
from vit_scale.data.shards import ShardWriter
from vit_scale.data.shardset import resolve_shards
from vit_scale.data.streams import EpochStream
from vit_scale.errors import UserError

N = 96  # samples; 12 shards of 8, so 4 ranks × 2 workers still get at least one shard each
BATCH = 4
IMG = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    write_corpus(d, N, shard_size=8, num_classes=N)
    return d


def take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def labels_of(batches) -> list[int]:
    return [int(x) for _, y in batches for x in y]


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 2])
def test_exact_epoch_covers_corpus_once_and_resume_is_exact(corpus, world, workers):
    cfg = DataConfig(workers=workers, shuffle_buffer=6)
    per_rank = N // world // BATCH  # batches per rank in one epoch
    epochs = [[], []]
    for rank in range(world):
        kw = dict(train=True, img_size=IMG, batch_size=BATCH, rank=rank, world_size=world, seed=3)
        # Two epochs and a bit, so the restore below also has to skip whole epochs.
        full = take(make_loader(str(corpus), cfg, **kw), 2 * per_rank + 3)
        assert len(full) == 2 * per_rank + 3
        epochs[0] += labels_of(full[:per_rank])
        epochs[1] += labels_of(full[per_rank : 2 * per_rank])
        for b, _ in full:
            assert b.dtype == torch.uint8 and b.shape == (BATCH, 3, IMG, IMG)

        cut = random.Random(world * 10 + workers + rank).randrange(1, len(full))
        first = make_loader(str(corpus), cfg, **kw)
        head = take(first, cut)
        state = first.state_dict()
        resumed = make_loader(str(corpus), cfg, **kw)
        resumed.load_state_dict(state)
        tail = take(resumed, len(full) - cut)
        for (xa, ya), (xb, yb) in zip(head + tail, full):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    streams = [
        EpochStream(
            resolve_shards(str(corpus)),
            mode="exact",
            seed=3,
            p=p,
            consumers=world * max(1, workers),
            shuffle=1,
        )
        for p in range(world * max(1, workers))
    ]
    assert {s.epoch_length(e) for s in streams for e in (0, 1)} == {N // (world * max(1, workers))}
    for seen in epochs:
        assert sorted(seen) == list(range(N)), "one epoch over all ranks is the corpus, each sample once"
    assert epochs[0] != epochs[1], "each epoch has its own order"


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_is_json_and_iterating_again_continues(corpus, workers):
    import json

    cfg = DataConfig(workers=workers, shuffle_buffer=4)
    loader = make_loader(str(corpus), cfg, train=True, img_size=IMG, batch_size=BATCH, seed=1)
    a = take(loader, 3)
    state = json.loads(json.dumps(loader.state_dict()))
    b = take(loader, 2)  # a second iteration picks up after the third batch
    ref = take(make_loader(str(corpus), cfg, train=True, img_size=IMG, batch_size=BATCH, seed=1), 5)
    assert labels_of(a + b) == labels_of(ref)
    assert state["batches"] == 3
    assert state["positions"] == ([3 * BATCH] if workers == 0 else [2 * BATCH, BATCH])


def test_resume_refuses_a_changed_world_size(corpus):
    cfg = DataConfig(workers=0)
    a = make_loader(str(corpus), cfg, train=True, img_size=IMG, batch_size=BATCH, world_size=2)
    take(a, 1)
    b = make_loader(str(corpus), cfg, train=True, img_size=IMG, batch_size=BATCH, world_size=1)
    with pytest.raises(UserError, match="world size"):
        b.load_state_dict(a.state_dict())


def test_eval_is_one_pass_each_sample_once_unaugmented(corpus):
    cfg = DataConfig(workers=2)
    seen, counts = [], []
    for rank in range(3):  # 3 ranks × 2 workers over 96 samples: ranges of 16
        loader = make_loader(
            str(corpus), cfg, train=False, img_size=IMG, batch_size=5, rank=rank, world_size=3
        )
        batches = list(loader)
        assert len(batches) == loader.num_batches
        counts.append(len(batches))
        seen += labels_of(batches)
        again = list(loader)  # a second pass yields the same again: evaluation is deterministic
        assert all(
            torch.equal(a[0], b[0])
            for a, b in zip(
                sorted(batches, key=lambda t: int(t[1][0])), sorted(again, key=lambda t: int(t[1][0]))
            )
        )
    assert sorted(seen) == list(range(N))
    assert len(set(counts)) == 1
    assert loader.num_samples == N and loader.num_classes == N


def test_brace_pattern_and_pipe_sources(corpus, tmp_path):
    from vit_scale.commands.shards import main as shards_main

    cfg = DataConfig(workers=0)
    brace = str(corpus / "shard-{000000..000011}.tar")
    got = labels_of(make_loader(brace, cfg, train=False, img_size=IMG, batch_size=7))
    assert sorted(got) == list(range(N))
    # A pipe: source has no index: counts are unknown and workers take whole shards, still each once.
    pipe = f"pipe:cat {corpus}/shard-{{000000..000011}}.tar"
    seen = []
    for rank in range(2):
        loader = make_loader(
            pipe, DataConfig(workers=2), train=False, img_size=IMG, batch_size=7, rank=rank, world_size=2
        )
        assert loader.num_samples == -1
        seen += labels_of(loader)
    assert sorted(seen) == list(range(N))
    # Training in exact mode needs the counts: refused with the way to get them, then trained on them.
    train_cfg = DataConfig(workers=0, shuffle_buffer=1)
    with pytest.raises(UserError, match="vit-scale shards count"):
        make_loader(pipe, train_cfg, train=True, img_size=IMG, batch_size=8)
    counted = tmp_path / "shards.json"
    assert shards_main(["count", pipe, "--out", str(counted)]) == 0
    train = make_loader(str(counted), train_cfg, train=True, img_size=IMG, batch_size=8)
    assert train.num_samples == N and train.num_classes == N
    assert sorted(labels_of(take(train, N // 8))) == list(range(N))


def test_resampled_draws_shards_uniformly_and_workers_differ(tmp_path):
    write_corpus(tmp_path, 10, shard_size=1, num_classes=10)
    shards = resolve_shards(str(tmp_path))
    counts = Counter()
    streams = []
    for p in range(2):
        s = EpochStream(shards, mode="resampled", seed=0, p=p, consumers=2, shuffle=1)
        keys = [x["__key__"] for x in _islice(s.stream(0, endless=True), 5000)]
        counts.update(keys)
        streams.append(keys)
    assert sum(counts.values()) == 10_000
    for key, n in counts.items():
        assert 800 <= n <= 1200, f"{key} drawn {n} times, expected 1000 ± 20%"
    assert streams[0] != streams[1]
    # Through the loader: two workers of one rank yield different batches.
    loader = make_loader(
        str(tmp_path),
        DataConfig(workers=2, mode="resampled", shuffle_buffer=1),
        train=True,
        img_size=IMG,
        batch_size=5,
    )
    w0, w1 = take(loader, 2)
    assert labels_of([w0]) != labels_of([w1])


def _islice(it, n):
    import itertools

    return itertools.islice(it, n)


def test_weighted_mixture_follows_weights_and_resumes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_corpus(a, 8, shard_size=2, num_classes=20)
    with ShardWriter(b, shard_size=2, classes=[str(i) for i in range(20)]) as w:
        for i in range(8):
            w.write(f"b{i}", jpeg_bytes(100 + i), "jpg", 10 + i, {})
    cfg = DataConfig(workers=0, weights=[3.0, 1.0], shuffle_buffer=1)
    kw = dict(train=True, img_size=IMG, batch_size=8, seed=5)
    loader = make_loader(f"{a}::{b}", cfg, **kw)
    full = take(loader, 50)
    from_a = sum(1 for x in labels_of(full) if x < 10)
    assert 0.65 < from_a / 400 < 0.85  # 3:1 mixture
    first = make_loader(f"{a}::{b}", cfg, **kw)
    head = take(first, 17)
    again = make_loader(f"{a}::{b}", cfg, **kw)
    again.load_state_dict(first.state_dict())
    assert labels_of(head + take(again, 33)) == labels_of(full)


def test_multi_hot_labels(tmp_path):
    with ShardWriter(tmp_path, shard_size=4, classes=[str(i) for i in range(6)]) as w:
        for i in range(6):
            w.write(f"m{i}", jpeg_bytes(i), "jpg", [i, (i + 2) % 6], {})
    loader = make_loader(
        str(tmp_path), DataConfig(workers=0, labels="multi"), train=False, img_size=IMG, batch_size=6
    )
    ((x, y),) = list(loader)
    assert y.dtype == torch.float32 and y.shape == (6, 6)
    expected = torch.zeros(6, 6)
    for i in range(6):
        expected[i, [i, (i + 2) % 6]] = 1
    assert torch.equal(y, expected)


def test_corrupt_samples_are_counted_then_stop_the_run(tmp_path):
    good = tmp_path / "good"
    with ShardWriter(good, shard_size=10, classes=["a"]) as w:
        for i in range(40):
            data = jpeg_bytes(i)[:200] if i % 10 == 3 else jpeg_bytes(i)  # 10% truncated JPEGs
            w.write(f"k{i}", data, "jpg", 0, {})
    cfg = DataConfig(workers=0, shuffle_buffer=1, max_bad_fraction=0.2, bad_window=20)
    loader = make_loader(str(good), cfg, train=False, img_size=IMG, batch_size=6)
    n = sum(len(y) for _, y in loader)
    assert n == 36 and loader.bad_samples == 4
    strict = DataConfig(workers=2, shuffle_buffer=1, max_bad_fraction=0.01, bad_window=20)
    with pytest.raises(UserError, match="corrupt"):
        take(make_loader(str(good), strict, train=True, img_size=IMG, batch_size=2), 100)


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_leaves_global_rngs_alone(corpus, workers):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    state, np_state = random.getstate(), np.random.get_state()
    cfg = DataConfig(workers=workers, randaugment="rand-m9-mstd0.5")
    take(make_loader(str(corpus), cfg, train=True, img_size=IMG, batch_size=BATCH), 2)
    assert torch.equal(torch.get_rng_state(), before) and random.getstate() == state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))


def test_refusals(tmp_path, corpus):
    cfg = DataConfig(workers=2)
    kw = dict(train=True, img_size=IMG, batch_size=2)
    with pytest.raises(UserError, match="gives no sample counts.*data.mode=resampled"):
        make_loader(f"pipe:cat {corpus}/shard-{{000000..000011}}.tar", cfg, **kw)
    with pytest.raises(UserError, match="does not exist"):
        make_loader(str(tmp_path / "nowhere"), cfg, **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no index.json"):
        make_loader(str(tmp_path / "empty"), cfg, **kw)
    broken = tmp_path / "broken"
    shutil.copytree(corpus, broken)
    with open(broken / "shard-000004.tar", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match="shard-000004.tar is 1000 bytes"):
        make_loader(str(broken), cfg, **kw)
    with pytest.raises(UserError, match="do not exist"):
        make_loader(str(corpus / "shard-{000000..000020}.tar"), cfg, **kw)


def test_randaugment_is_reproducible_and_resumable(corpus):
    cfg = DataConfig(workers=0, shuffle_buffer=1, randaugment="rand-m9-mstd0.5")
    kw = dict(train=True, img_size=IMG, batch_size=BATCH, seed=2)
    full = take(make_loader(str(corpus), cfg, **kw), 4)
    plain = take(make_loader(str(corpus), DataConfig(workers=0, shuffle_buffer=1), **kw), 4)
    assert labels_of(full) == labels_of(plain)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(full, plain)), "RandAugment changed nothing"
    first = make_loader(str(corpus), cfg, **kw)
    head = take(first, 1)
    resumed = make_loader(str(corpus), cfg, **kw)
    resumed.load_state_dict(first.state_dict())
    for (xa, _), (xb, _) in zip(head + take(resumed, 3), full):
        assert torch.equal(xa, xb)


def test_mixup_helper_mixes_a_batch_into_soft_targets(corpus):
    from vit_scale.data.transforms import make_mixup

    assert make_mixup(0.0, 0.0, 10) is None
    mix = make_mixup(0.8, 1.0, N)
    x, y = take(
        make_loader(str(corpus), DataConfig(workers=0), train=True, img_size=IMG, batch_size=BATCH), 1
    )[0]
    np.random.seed(0)  # timm draws lambda and the mixup/cutmix switch from numpy's global RNG
    mixed, target = mix(x.float(), y)
    assert target.shape == (BATCH, N) and torch.allclose(target.sum(1), torch.ones(BATCH))
    assert (target > 0).sum(1).max() == 2  # each row blends its own label with its partner's


def test_a_shard_truncated_after_startup_counts_as_bad_not_fatal(tmp_path, corpus):
    copy = tmp_path / "copy"
    shutil.copytree(corpus, copy)
    data = (copy / "shard-000003.tar").read_bytes()
    (copy / "shard-000003.tar").write_bytes(data[: len(data) // 2])
    cfg = DataConfig(workers=0, max_bad_fraction=0.5, bad_window=100)
    # Without an index the pipeline cannot know how many samples were lost: the break counts once.
    pipe = f"pipe:cat {copy}/shard-{{000000..000011}}.tar"
    loader = make_loader(pipe, cfg, train=False, img_size=IMG, batch_size=8)
    got = labels_of(loader)
    assert 88 < len(got) < N and loader.bad_samples == 1
    assert set(got) >= set(range(24)) | set(range(32, N))


def test_shards_without_samples_stop_training_with_a_message_not_a_hang(tmp_path):
    from vit_scale.data.shardset import count_shards
    from vit_scale.io import atomic_write_json

    for i in range(2):
        (tmp_path / f"empty-{i}.tar").write_bytes(bytes(1024))  # a valid tar with no members
    pattern = str(tmp_path / "empty-{0..1}.tar")
    loader = make_loader(
        pattern, DataConfig(workers=0, mode="resampled"), train=True, img_size=IMG, batch_size=2
    )
    with pytest.raises(UserError, match="read no samples"):
        take(loader, 1)
    # Exact mode knows the counts before the first step, and refuses.
    atomic_write_json(tmp_path / "empty.json", count_shards(pattern))
    with pytest.raises(UserError, match="holds no samples"):
        make_loader(str(tmp_path / "empty.json"), DataConfig(workers=0), train=True, img_size=IMG, batch_size=2)


def test_resume_refuses_a_different_shard_set(tmp_path, corpus):
    cfg = DataConfig(workers=0)
    a = make_loader(str(corpus), cfg, train=True, img_size=IMG, batch_size=BATCH)
    take(a, 1)
    fewer = make_loader(
        str(corpus / "shard-{000000..000010}.tar"), cfg, train=True, img_size=IMG, batch_size=BATCH
    )
    with pytest.raises(UserError, match="shard set"):
        fewer.load_state_dict(a.state_dict())
    moved = tmp_path / "moved"
    shutil.copytree(corpus, moved)  # the same shards elsewhere (a copy to node-local disk) resume fine
    make_loader(str(moved), cfg, train=True, img_size=IMG, batch_size=BATCH).load_state_dict(a.state_dict())


def test_http_source_through_a_local_server(corpus):
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(corpus))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/shard-{{000000..000011}}.tar"
        loader = make_loader(url, DataConfig(workers=0), train=False, img_size=IMG, batch_size=16)
        assert sorted(labels_of(loader)) == list(range(N))
        # The served index.json gives the counts exact-mode training needs, without a counting pass.
        index = f"http://127.0.0.1:{server.server_port}/index.json"
        train = make_loader(index, DataConfig(workers=0, shuffle_buffer=3), train=True, img_size=IMG, batch_size=8)
        assert train.num_samples == N
        assert sorted(labels_of(take(train, N // 8))) == list(range(N))
    finally:
        server.shutdown()
        server.server_close()
