"""What each DataLoader worker runs: a logical worker's raw samples decoded, augmented and batched.

Every sample's augmentation draws from a seed derived from (seed, logical worker, position), never from a
global RNG, so a resumed worker reproduces it. Corrupt samples are skipped and counted; too many in a
window stop the run with a message.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vit_scale.config.schema import DataConfig
from vit_scale.data.shards import parse_labels
from vit_scale.data.streams import BAD, EmptyStream, EpochStream, derive_seed
from vit_scale.data.transforms import (
    IMAGE_EXTS,
    center_transform,
    decode_rgb,
    eval_transform,
    make_randaugment,
    resize_transform,
    train_transform,
)


class WorkerStreams(IterableDataset):
    """Yields tagged batches `(images, labels, logical_worker, position, bad)` for one rank."""

    def __init__(
        self, sets, weights, cfg: DataConfig, *, train, img_size, batch_size, rank, world_size, seed
    ):
        self.sets, self.weights, self.cfg = sets, weights, cfg
        self.train, self.img_size, self.batch_size = train, img_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.workers = max(1, cfg.workers)
        self.num_classes = max(s.num_classes for s in sets)
        self.multi = cfg.labels == "multi"
        self.positions = [0] * self.workers
        self.bad = [0] * self.workers
        self.rotation = 0

    def _raw(self, logical: int, skip: int) -> Iterator[dict | None]:
        p = self.rank * self.workers + logical
        consumers = self.world_size * self.workers
        mode = self.cfg.mode if self.train else "eval"
        shuffle = self.cfg.shuffle_buffer if self.train else 0
        streams = [
            EpochStream(s, mode=mode, seed=self.seed, p=p, consumers=consumers, shuffle=shuffle)
            for s in self.sets
        ]
        if self.weights is None:
            return streams[0].stream(skip, endless=self.train)
        # Weighted mixture: which source gives each sample is itself a seeded draw, replayed on restore.
        choices = random.Random(derive_seed(self.seed, "mix", p))
        draws = [0] * len(streams)
        for _ in range(skip):
            draws[choices.choices(range(len(streams)), self.weights)[0]] += 1
        its = [s.stream(d, endless=True) for s, d in zip(streams, draws)]

        def mixed():
            while True:
                yield next(its[choices.choices(range(len(its)), self.weights)[0]])

        return mixed()

    def _label(self, sample: dict):
        if "labels" in sample:
            ids = parse_labels(sample["labels"])
        elif "cls" in sample:
            ids = [int(sample["cls"].decode().strip())]
        else:
            raise ValueError("no cls or labels member")
        if not self.multi:
            if len(ids) != 1:
                raise ValueError(f"{len(ids)} labels for data.labels=int")
            return ids[0]
        hot = torch.zeros(self.num_classes)
        hot[ids] = 1.0
        return hot

    def _decode(self, sample: dict | None, position: int, p: int, ra):
        if sample is BAD:
            raise ValueError("unreadable shard data")
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise ValueError("no image member")
        label = self._label(sample)
        img = decode_rgb(sample[ext])
        if not self.train:
            return eval_transform(img, self.img_size, self.cfg.eval_crop), label
        if self.cfg.augment == "inception":
            rng = random.Random(derive_seed(self.seed, "aug", p, position))
            img = train_transform(
                img, self.img_size, rng, area_min=self.cfg.crop_area_min, hflip=self.cfg.hflip, randaugment=ra
            )
        elif self.cfg.augment == "resize":
            img = resize_transform(img, self.img_size)
        else:
            img = center_transform(img, self.img_size)
        return img, label

    def _new_batch(self, in_worker: bool) -> torch.Tensor:
        images = torch.empty((self.batch_size, 3, self.img_size, self.img_size), dtype=torch.uint8)
        # Written in place in shared memory, a worker's batch crosses to the main process without a copy.
        return images.share_memory_() if in_worker else images

    def _labels(self, labels) -> torch.Tensor:
        return torch.stack(labels) if self.multi else torch.tensor(labels, dtype=torch.int64)

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        logical = (physical + self.rotation) % self.workers
        try:
            yield from self._batches(logical, in_worker=info is not None)
        except EmptyStream as e:
            # Errors travel as items: the main process raises them as one clean UserError.
            yield ("error", f"{e}; are some shards empty? rebuild them or check the source")

    def _batches(self, logical: int, in_worker: bool):
        p = self.rank * self.workers + logical
        position, bad = self.positions[logical], self.bad[logical]
        window: deque[bool] = deque(maxlen=max(1, self.cfg.bad_window))
        window_bad = 0
        limit = self.cfg.max_bad_fraction * window.maxlen
        ra = make_randaugment(self.cfg.randaugment, self.img_size) if self.train else None
        images, labels = self._new_batch(in_worker), []
        for sample in self._raw(logical, position):
            try:
                img, label = self._decode(sample, position, p, ra)
                ok = True
            except ValueError:
                ok = False
            position += 1
            if len(window) == window.maxlen:
                window_bad -= window[0]
            window.append(not ok)
            window_bad += not ok
            if not ok:
                bad += 1
                if window_bad > limit:
                    yield (
                        "error",
                        f"{window_bad} of the last {len(window)} samples from {self.sets[0].spec} are corrupt, "
                        f"more than data.max_bad_fraction={self.cfg.max_bad_fraction} of data.bad_window="
                        f"{window.maxlen}; run `vit-scale shards verify` on the shards or raise the limit",
                    )
                    return
                continue
            images[len(labels)].copy_(img)
            labels.append(label)
            if len(labels) == self.batch_size:
                yield images, self._labels(labels), logical, position, bad
                images, labels = self._new_batch(in_worker), []
        if labels:
            yield images[: len(labels)], self._labels(labels), logical, position, bad
