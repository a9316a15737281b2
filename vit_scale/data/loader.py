"""The streaming pipeline: tar shards → (rank, worker) streams → decode, augment, batch → uint8 tensors.

Exact resume is built on one property: the raw sample stream of each *logical* worker (one per rank and
DataLoader worker) is a pure function of (source, seed, rank, worker) — the shard order of each epoch, the
shuffle buffer's draws and every sample's augmentation all derive from those numbers. A loader's position is
then just how many raw samples each logical worker has consumed; restoring it re-reads the skipped samples'
bytes without decoding them (whole epochs are skipped by arithmetic when index.json gives the counts).

The DataLoader yields worker batches round-robin; after T batches, batch T comes from worker T mod W. A
restored loader starts its DataLoader at worker 0, so physical worker i plays logical worker (i + T) mod W and
the batch order continues exactly as an uninterrupted run.

The layers, one module each: `shardset` (which files, with their counts) → `tar` (a shard's samples) →
`streams` (a logical worker's seeded raw samples) → `worker` (decode, augment, batch in a DataLoader
worker) → `loader` (this module: the DataLoader, the rank's position, its state for checkpoints).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import signal
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vit_scale.config.schema import DataConfig
from vit_scale.data.gpudecode import EncodedBatch, decode_batch
from vit_scale.data.shardset import ShardSet, resolve_source
from vit_scale.data.streams import EpochStream, derive_seed
from vit_scale.data.worker import WorkerStreams
from vit_scale.dist import device as rank_device
from vit_scale.errors import UserError

STATE_VERSION = 1


def _fingerprint(sets: list[ShardSet]) -> str:
    """Names and counts of the shards, in order: a position means nothing over a different shard set."""
    text = repr([([Path(u).name for u in s.urls], s.counts) for s in sets])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _leave_preemption_to_the_rank(_worker_id: int) -> None:
    """SLURM signals every process of a job step. PyTorch's worker handler dies on SIGTERM, which takes
    the rank down before it can checkpoint; the workers ignore the preemption signals and the rank
    decides at its next step boundary. A worker still ends with its rank (DataLoader's parent watchdog).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """At the rank's exit. Python's multiprocessing ends daemonic children with SIGTERM, which these
    workers ignore, and then joins them: a rank leaving on an error with its workers alive would wait
    forever (their parent watchdog sees the rank still there). Runs before that, being registered later."""
    import multiprocessing

    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


@functools.cache
def _register_exit_hook() -> None:
    atexit.register(_kill_leftover_workers)


class ShardLoader:
    """Iterable of `(images uint8 [B,3,S,S], labels)` for one rank, with an exactly resumable position.

    Training loaders are endless; iterating again continues where the last iteration stopped. Evaluation
    loaders make one pass per iteration, each sample once across all ranks, the last batch possibly short.
    """

    def __init__(
        self,
        dataset: WorkerStreams,
        *,
        num_samples: int,
        num_batches: int,
        device: torch.device | None = None,
    ):
        self._ds = dataset
        self._device = device  # where data.decode=gpu decodes
        self.num_samples = num_samples
        self.num_classes = dataset.num_classes
        self.num_batches = num_batches  # evaluation loaders: batches this rank yields per pass; -1 unknown
        self.batches = 0
        self._restored = False

    @property
    def bad_samples(self) -> int:
        return sum(self._ds.bad)

    def _reset(self) -> None:
        ds = self._ds
        ds.positions = [0] * ds.workers
        ds.bad = [0] * ds.workers
        self.batches = 0

    def __iter__(self):
        ds = self._ds
        if not ds.train and not self._restored:
            self._reset()
        self._restored = False
        ds.rotation = self.batches % ds.workers if ds.train else 0
        if self._ds.cfg.workers > 0:
            _register_exit_hook()
            loader = DataLoader(
                ds,
                batch_size=None,
                num_workers=ds.cfg.workers,
                pin_memory=torch.cuda.is_available(),
                prefetch_factor=2,
                # The DataLoader draws its workers' base seed from this generator, not from the global
                # RNG, so starting an iteration leaves the trainer's RNG streams (and exact resume) alone.
                generator=torch.Generator().manual_seed(derive_seed(ds.seed, "loader", ds.rank) % 2**63),
                worker_init_fn=_leave_preemption_to_the_rank,
            )
        else:
            loader = ds
        for item in loader:
            if isinstance(item[0], str):
                raise UserError(item[1])
            images, labels, logical, position, bad = item
            ds.positions[logical] = position
            ds.bad[logical] = bad
            self.batches += 1
            if isinstance(images, EncodedBatch):
                images = decode_batch(images, self._device)
            yield images, labels

    def state_dict(self) -> dict:
        ds = self._ds
        return {
            "version": STATE_VERSION,
            "source": "::".join(s.spec for s in ds.sets),
            "shards": _fingerprint(ds.sets),
            "mode": ds.cfg.mode if ds.train else "eval",
            "seed": ds.seed,
            "world_size": ds.world_size,
            "rank": ds.rank,
            "workers": ds.workers,
            "batch_size": ds.batch_size,
            "batches": self.batches,
            "positions": list(ds.positions),
            "bad": list(ds.bad),
        }

    def load_state_dict(self, state: dict) -> None:
        ds = self._ds
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data loader state has version {state.get('version')}, expected {STATE_VERSION}")
        mine = self.state_dict()
        for key, setting in (
            ("world_size", "the world size"),
            ("workers", "data.workers"),
            ("batch_size", "the micro batch per rank"),
            ("seed", "train.seed"),
            ("mode", "data.mode"),
            ("rank", "the rank"),
            ("shards", "the shard set (its files and counts)"),
        ):
            if state.get(key) != mine[key]:
                raise UserError(
                    f"cannot resume the data position exactly: it was saved with {setting} = {state.get(key)}, "
                    f"now {mine[key]}; resume with the same setting"
                )
        ds.positions = [int(x) for x in state["positions"]]
        ds.bad = [int(x) for x in state["bad"]]
        self.batches = int(state["batches"])
        self._restored = True


def make_loader(
    source: str,
    data: DataConfig,
    *,
    train: bool,
    img_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device | None = None,
) -> ShardLoader:
    """A loader for one rank; refuses before any step what the shards make impossible (see module
    docstring). The settings in `data` have passed the validation pass (`vit_scale.config.validate`).
    With data.decode=gpu the batches are decoded on `device`, by default this rank's (`dist.device()`)."""
    if batch_size < 1:
        raise UserError(f"batch size must be positive, got {batch_size}")
    # Evaluation reads every source once, so a weighted mixture is evaluated as the concatenation.
    sets, weights = resolve_source(source, data.weights if train else [])
    workers = max(1, data.workers)
    consumers = world_size * workers
    if train and data.mode == "exact":
        for s in sets:
            if len(s.urls) < consumers:
                raise UserError(
                    f"{s.spec} has {len(s.urls)} shards but {world_size} ranks × {workers} workers = {consumers} "
                    "readers need at least one each in exact mode; build more, smaller shards "
                    "(--shard-size), lower data.workers, or use data.mode=resampled"
                )
    multi = data.labels == "multi"
    num_classes = max(s.num_classes for s in sets)
    if multi and num_classes <= 0:
        raise UserError(
            "data.labels=multi needs the number of classes: use a shard directory whose index.json gives it"
        )
    ds = WorkerStreams(
        sets,
        weights,
        data,
        train=train,
        img_size=img_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
    num_batches = -1
    if not train and sets[0].counts is not None:
        streams = [
            EpochStream(sets[0], mode="eval", seed=seed, p=rank * workers + w, consumers=consumers, shuffle=0)
            for w in range(workers)
        ]
        num_batches = sum(-(-s.epoch_length(0) // batch_size) for s in streams)
    total = sum(s.num_samples for s in sets) if all(s.counts is not None for s in sets) else -1
    if data.decode == "gpu" and device is None:
        device = rank_device()
    return ShardLoader(ds, num_samples=total, num_batches=num_batches, device=device)
