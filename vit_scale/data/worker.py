"""What each DataLoader worker runs: a logical worker's raw samples decoded, augmented and batched.

Every sample's augmentation draws from a seed derived from (seed, plan, logical worker, position), never
from a global RNG, so a resumed worker reproduces it. Corrupt samples are skipped and counted; too many in
a window stop the run with a message. Each batch carries its worker's position, its draws from each source
of a mixture and its corrupt-sample counter and window, which the loader keeps for checkpoints.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vit_scale.config.schema import DataConfig
from vit_scale.data.gpudecode import EncodedBatch, encode_sample, pack
from vit_scale.data.shards import parse_labels
from vit_scale.data.streams import BAD, EmptyStream, EpochStream, plan_seed
from vit_scale.data.transforms import IMAGE_EXTS, eval_decode, make_randaugment, train_decode


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
        self.bases = None  # per source: where the plan starts (exact training); None: a fresh run's
        self.plan = None  # the plan id after a resume with another layout; None: a fresh run's streams
        self.positions = [0] * self.workers
        self.draws: list[list[int] | None] = [None] * self.workers
        self.windows = [BadWindow.empty() for _ in range(self.workers)]
        self.rotation = 0

    def stream_of(self, logical: int, source: int) -> EpochStream:
        """The raw-sample stream of one logical worker of this rank over one source."""
        mode = self.cfg.mode if self.train else "eval"
        return EpochStream(
            self.sets[source],
            mode=mode,
            seed=self.seed,
            p=self.rank * self.workers + logical,
            consumers=self.world_size * self.workers,
            shuffle=self.cfg.shuffle_buffer if self.train else 0,
            basis=self.bases[source] if self.bases is not None else None,
            plan=self.plan,
        )

    def _raw(self, logical: int, skip: int) -> tuple[Iterator[dict | None], list[int] | None]:
        """A logical worker's raw samples from position `skip` on, and (for a weighted mixture) the list of
        its draws from each source so far, which the iterator keeps up to date."""
        p = self.rank * self.workers + logical
        streams = [self.stream_of(logical, i) for i in range(len(self.sets))]
        if self.weights is None:
            return streams[0].stream(skip, endless=self.train), None
        # Weighted mixture: which source gives each sample is itself a seeded draw, replayed on restore.
        choices = random.Random(plan_seed(self.seed, self.plan, "mix", p))
        draws = [0] * len(streams)
        for _ in range(skip):
            draws[choices.choices(range(len(streams)), self.weights)[0]] += 1
        its = [s.stream(d, endless=True) for s, d in zip(streams, draws)]

        def mixed():
            while True:
                i = choices.choices(range(len(its)), self.weights)[0]
                draws[i] += 1
                yield next(its[i])

        return mixed(), draws

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
        crop = self.train and self.cfg.augment == "inception"
        rng = random.Random(plan_seed(self.seed, self.plan, "aug", p, position)) if crop else None
        # Without a random crop: the whole image resized, or its centre (data.augment / data.eval_crop).
        plain = ("center" if self.cfg.augment == "center" else "none") if self.train else self.cfg.eval_crop
        if self.cfg.decode == "gpu":
            area_min, hflip = self.cfg.crop_area_min, self.cfg.hflip
            return encode_sample(
                sample[ext], self.img_size, rng, area_min=area_min, hflip=hflip, crop=plain
            ), label
        if crop:
            img = train_decode(
                sample[ext],
                self.img_size,
                rng,
                area_min=self.cfg.crop_area_min,
                hflip=self.cfg.hflip,
                randaugment=ra,
            )
        else:
            img = eval_decode(sample[ext], self.img_size, plain)
        return img, label

    def _new_batch(self, in_worker: bool) -> torch.Tensor | list:
        if self.cfg.decode == "gpu":
            return []  # (bytes, plan) per sample, packed when the batch is full
        images = torch.empty((self.batch_size, 3, self.img_size, self.img_size), dtype=torch.uint8)
        # Written in place in shared memory, a worker's batch crosses to the main process without a copy.
        return images.share_memory_() if in_worker else images

    def _put(self, images: torch.Tensor | list, i: int, img) -> None:
        if isinstance(images, list):
            images.append(img)
        else:
            # The image is channels-last from the resize; numpy transposes it into the batch's CHW slot about
            # twice as fast as torch's copy_ (0.05 against 0.10 ms at 224 px).
            np.copyto(images[i].numpy(), img.numpy())

    def _full(self, images: torch.Tensor | list, n: int) -> torch.Tensor | EncodedBatch:
        if isinstance(images, list):
            return pack(images, self.img_size)
        return images if n == len(images) else images[:n]

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
        position = self.positions[logical]
        window = BadWindow(self.cfg.bad_window, self.windows[logical], position)
        limit = self.cfg.max_bad_fraction * window.size
        ra = make_randaugment(self.cfg.randaugment, self.img_size) if self.train else None
        images, labels = self._new_batch(in_worker), []
        raw, draws = self._raw(logical, position)
        for sample in raw:
            try:
                img, label = self._decode(sample, position, p, ra)
                ok = True
            except ValueError:
                ok = False
            position += 1
            window.add(ok, position)
            if not ok:
                if window.recent > limit:
                    yield (
                        "error",
                        f"{window.recent} of the last {window.length} samples from {self.sets[0].spec} are corrupt, "
                        f"more than data.max_bad_fraction={self.cfg.max_bad_fraction} of data.bad_window="
                        f"{window.size}; run `vit-scale shards verify` on the shards or raise the limit",
                    )
                    return
                continue
            self._put(images, len(labels), img)
            labels.append(label)
            if len(labels) == self.batch_size:
                full = self._full(images, len(labels))
                yield full, self._labels(labels), logical, position, _copy(draws), window.state(position)
                images, labels = self._new_batch(in_worker), []
        if labels:
            full = self._full(images, len(labels))
            yield full, self._labels(labels), logical, position, _copy(draws), window.state(position)


def _copy(draws: list[int] | None) -> list[int] | None:
    return None if draws is None else list(draws)


class BadWindow:
    """A logical worker's corrupt samples: the total, and which of its last `size` samples were corrupt
    (their positions), the window that data.max_bad_fraction is checked over. Its state, saved with the
    loader's, is `{"total", "length", "bad"}`: bad as distances back from the position, so it means the
    same wherever the worker's positions restart."""

    def __init__(self, size: int, state: dict, position: int):
        self.size = size
        self.total = int(state["total"])
        self.length = min(size, int(state["length"]))
        self.bad = deque(position - d for d in sorted(state["bad"], reverse=True) if d <= self.length)

    @staticmethod
    def empty() -> dict:
        return {"total": 0, "length": 0, "bad": []}

    @property
    def recent(self) -> int:
        return len(self.bad)

    def add(self, ok: bool, position: int) -> None:
        """One more sample, the one before `position`."""
        self.length = min(self.size, self.length + 1)
        if not ok:
            self.total += 1
            self.bad.append(position - 1)
        while self.bad and self.bad[0] < position - self.size:
            self.bad.popleft()

    def state(self, position: int) -> dict:
        return {"total": self.total, "length": self.length, "bad": [position - x for x in self.bad]}
