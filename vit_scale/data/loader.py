"""The streaming pipeline: tar shards → (rank, worker) streams → decode, augment, batch → uint8 tensors.

Exact resume is built on one property: the raw sample stream of each *logical* worker (one per rank and
DataLoader worker) is a pure function of (source, seed, plan, rank, worker) — the ranges of each pass, the
shuffle buffer's draws and every sample's augmentation all derive from those numbers. A loader's position is
then just how many raw samples each logical worker has consumed; restoring it under the same layout re-reads
the skipped samples' bytes without decoding them (whole passes are skipped by arithmetic).

The DataLoader yields worker batches round-robin; after T batches, batch T comes from worker T mod W. A
restored loader starts its DataLoader at worker 0, so physical worker i plays logical worker (i + T) mod W and
the batch order continues exactly as an uninterrupted run.

A resume with another layout (world size, data.workers, micro batch, shuffle buffer) cannot replay positions.
Each rank's state therefore also says, without reference to any layout, which positions of the global order
(`streams.GlobalOrder`) its workers consumed since the plan began. `merge_states` joins every rank's into
progress (a new basis per source: frontier and holes), and `ShardLoader.continue_from` starts the new
layout's plan from it: the interrupted epoch is finished first, no sample lost and none read twice. The
corrupt-sample counters and windows move along (old logical worker p to new worker p mod P).

The layers, one module each: `shardset` (which files, with their counts) → `tar` (a shard's samples) →
`streams` (the global order, the plan, a logical worker's seeded raw samples) → `worker` (decode, augment,
batch in a DataLoader worker) → `loader` (this module: the DataLoader, the rank's position, its state for
checkpoints).
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
from vit_scale.data.streams import (
    Basis,
    EpochStream,
    derive_seed,
    length,
    merge_intervals,
    subtract_intervals,
)
from vit_scale.data.worker import BadWindow, WorkerStreams
from vit_scale.dist import device as rank_device
from vit_scale.errors import UserError

STATE_VERSION = 2
# Settings whose change a resume can only follow through the layout-free progress (`merge_states`).
LAYOUT = (
    ("world_size", "the world size"),
    ("workers", "data.workers"),
    ("batch_size", "the micro batch per rank"),
    ("shuffle_buffer", "data.shuffle_buffer"),
    ("rank", "the rank"),
)
# Settings no resume can change: the data order itself depends on them.
IDENTITY = (
    ("seed", "train.seed"),
    ("mode", "data.mode"),
    ("shards", "the shard set (its files and counts)"),
)


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
        return sum(w["total"] for w in self._ds.windows)

    def _reset(self) -> None:
        ds = self._ds
        ds.positions = [0] * ds.workers
        ds.draws = [None] * ds.workers
        ds.windows = [BadWindow.empty() for _ in range(ds.workers)]
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
            images, labels, logical, position, draws, window = item
            ds.positions[logical] = position
            ds.draws[logical] = draws
            ds.windows[logical] = window
            self.batches += 1
            if isinstance(images, EncodedBatch):
                images = decode_batch(images, self._device)
            yield images, labels

    def _settings(self) -> dict:
        ds = self._ds
        return {
            "source": "::".join(s.spec for s in ds.sets),
            "shards": _fingerprint(ds.sets),
            "mode": ds.cfg.mode if ds.train else "eval",
            "seed": ds.seed,
            "world_size": ds.world_size,
            "rank": ds.rank,
            "workers": ds.workers,
            "batch_size": ds.batch_size,
            "shuffle_buffer": ds.cfg.shuffle_buffer,
        }

    def consumed(self) -> list[list[tuple[int, int]]] | None:
        """Per source, the global-order positions this rank's workers have yielded since the plan began
        (exact training only; None otherwise): the layout-free half of the state."""
        ds = self._ds
        if not (ds.train and ds.cfg.mode == "exact"):
            return None
        out = []
        for i in range(len(ds.sets)):
            spans = []
            for w in range(ds.workers):
                n = ds.positions[w] if ds.draws[w] is None else ds.draws[w][i]
                spans += ds.stream_of(w, i).consumed(n)
            out.append(merge_intervals(spans))
        return out

    def state_dict(self) -> dict:
        ds = self._ds
        consumed = self.consumed()
        bases = ds.bases if ds.bases is not None else [Basis() for _ in ds.sets]
        return {
            "version": STATE_VERSION,
            **self._settings(),
            "batches": self.batches,
            "plan": ds.plan,
            "bases": [b.to_dict() for b in bases] if consumed is not None else None,
            "consumed": [[list(c) for c in spans] for spans in consumed] if consumed is not None else None,
            "positions": list(ds.positions),
            "draws": [None if d is None else list(d) for d in ds.draws],
            "windows": [dict(w) for w in ds.windows],
        }

    def _check(self, state: dict, keys) -> None:
        _check_version(state)
        mine = self._settings()
        for key, setting in keys:
            if state.get(key) != mine[key]:
                raise UserError(
                    f"cannot resume the data position exactly: it was saved with {setting} = {state.get(key)}, "
                    f"now {mine[key]}; resume with the same setting"
                )

    def same_layout(self, state: dict) -> bool:
        """Whether `state` (one rank's) continues exactly here; otherwise resume from every rank's states
        through `merge_states` and `continue_from`."""
        return all(state.get(key) == self._settings()[key] for key, _ in LAYOUT)

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where this rank's `state` stopped, under the same layout."""
        self._check(state, IDENTITY)
        for key, setting in LAYOUT:
            if state.get(key) != self._settings()[key]:
                raise UserError(
                    f"cannot resume the data position exactly: it was saved with {setting} = {state.get(key)}, "
                    f"now {self._settings()[key]}; a resume with another layout continues from every rank's "
                    "state (`merge_states`, then `continue_from`)"
                )
        ds = self._ds
        ds.plan = state["plan"]
        ds.bases = [Basis.from_dict(b) for b in state["bases"]] if state["bases"] is not None else None
        ds.positions = [int(x) for x in state["positions"]]
        ds.draws = [None if d is None else [int(x) for x in d] for d in state["draws"]]
        ds.windows = [dict(w) for w in state["windows"]]
        self.batches = int(state["batches"])
        self._restored = True

    def continue_from(self, progress: dict) -> None:
        """Continue the interrupted epoch from `progress` (what `merge_states` made of every rank's states,
        whatever their layout): this rank's workers read their part of what is left, each sample once."""
        self._check(progress, IDENTITY)
        ds = self._ds
        ds.plan = progress["plan"]
        ds.bases = [Basis.from_dict(b) for b in progress["bases"]] if progress["bases"] is not None else None
        consumers = ds.world_size * ds.workers
        old = progress["windows"]
        ds.windows = [
            _merge_windows(old[ds.rank * ds.workers + w :: consumers], ds.cfg.bad_window)
            for w in range(ds.workers)
        ]
        ds.positions = [0] * ds.workers
        ds.draws = [None] * ds.workers
        self.batches = 0
        self._restored = True


def _check_version(state: dict) -> None:
    if state.get("version") != STATE_VERSION:
        raise UserError(
            f"data loader state has version {state.get('version')}, expected {STATE_VERSION}: the checkpoint "
            "was written by an older vit-scale; finish that run with the version that started it"
        )


def _merge_windows(windows: list[dict], size: int) -> dict:
    """Several old workers' corrupt-sample windows as one: their totals added, their windows laid end to
    end in worker order and cut to the last `size` samples."""
    total, length, bad = 0, 0, []
    for w in reversed(windows):  # the last window is the most recent end of the merged one
        total += int(w["total"])
        bad += [length + int(d) for d in w["bad"] if int(d) <= int(w["length"])]
        length += int(w["length"])
    length = min(size, length)
    return {"total": total, "length": length, "bad": sorted(d for d in bad if d <= length)}


def merge_states(states: list[dict]) -> dict:
    """Every rank's data state from one checkpoint, merged into layout-free progress for `continue_from`.

    Per source, the consumed positions of all ranks join the old basis into a new one: the frontier moves
    to the furthest position read, and the holes are what was left unread below it. The result names no
    rank, worker or batch size.
    """
    if not states:
        raise UserError("no data states to resume from")
    for state in states:
        _check_version(state)
    first = states[0]
    for state in states[1:]:
        for key in ("seed", "mode", "shards", "world_size", "workers", "plan", "bases"):
            if state.get(key) != first.get(key):
                raise UserError(
                    f"the ranks' data states disagree on {key}: the checkpoint mixes runs; resume from another one"
                )
    world = first["world_size"]
    if sorted(s["rank"] for s in states) != list(range(world)):
        raise UserError(
            f"the checkpoint holds data states of ranks {sorted(s['rank'] for s in states)}, "
            f"not of all {world}; resume from a complete checkpoint"
        )
    states = sorted(states, key=lambda s: s["rank"])
    samples = sum(sum(s["positions"]) for s in states)
    bases = None
    if first["bases"] is not None:
        bases = []
        for i, old in enumerate(Basis.from_dict(b) for b in first["bases"]):
            parts = [merge_intervals(map(tuple, s["consumed"][i])) for s in states]
            consumed = merge_intervals(c for part in parts for c in part)
            if length(consumed) != sum(length(part) for part in parts):
                raise UserError(
                    "the ranks' data states claim the same samples twice; resume from another checkpoint"
                )
            frontier = max(old.frontier, consumed[-1][1] if consumed else 0)
            open_ = merge_intervals([*old.holes, (old.frontier, frontier)])
            if subtract_intervals(consumed, open_):
                raise UserError(
                    "the ranks' data states claim samples consumed before; resume from another checkpoint"
                )
            bases.append(Basis(frontier, subtract_intervals(open_, consumed)).to_dict())
    plan = derive_seed(first["seed"], "plan", first["plan"], samples, repr(bases)) % 2**63
    return {
        "version": STATE_VERSION,
        "seed": first["seed"],
        "mode": first["mode"],
        "shards": first["shards"],
        "source": first["source"],
        "plan": plan,
        "bases": bases,
        "samples": samples,
        "windows": [w for s in states for w in s["windows"]],
    }


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
            if s.counts is None:
                raise UserError(
                    f"{s.spec} gives no sample counts, and exact mode needs them so that every rank gets the "
                    "same number of batches and each sample is read once per epoch; count the shards once "
                    f"with `vit-scale shards count '{s.spec}' --out shards.json` and train on "
                    "data.train=shards.json, or use data.mode=resampled"
                )
            if s.num_samples == 0:
                raise UserError(f"{s.spec} holds no samples; rebuild it with samples in it")
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
