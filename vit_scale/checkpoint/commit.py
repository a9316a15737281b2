"""Checkpoints that never tear: DeepSpeed's sharded save under our own commit protocol.

    checkpoints/step_000000020/   DeepSpeed's files + rank_00000.pt ... (each rank's data position and RNGs)
                  .rank_00000.done ...  each rank's report: its files are durable, their sizes and sha256
                  manifest.json   every rank's report merged, counters, world size, ZeRO stage, who wrote it
                  COMMITTED       written last, after every rank's report and the manifest are on disk
    checkpoints/latest            name of the newest committed step, replaced atomically

A save is a snapshot at a step boundary (`Saver.save`), then each rank writes, fsyncs and hashes its own
files, in the background by default, and rank 0 commits once every rank has reported. A directory without
COMMITTED, or whose files disagree with its manifest, is never loaded. DeepSpeed's own `latest` file is not
written: it appears before all ranks finish.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vit_scale.checkpoint import safe_load, snapshot
from vit_scale.checkpoint.lock import writer
from vit_scale.dist import barrier, collective_device, is_multi_rank, is_rank0, rank, world_size
from vit_scale.errors import UserError
from vit_scale.io import atomic_write_json, atomic_write_text, disk_full_error, fsync_dir, is_disk_full

COMMITTED = "COMMITTED"
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d{9})$")
# Fault injection for the kill-at-every-write-point test: VIT_SCALE_CRASH_AT=<point>[@<step>] SIGKILLs
# this process there. The points, in save order: the snapshot (nothing written yet), a rank's DeepSpeed
# files, its own state file, its done-marker (all in the writer thread of a background save), then rank
# 0's commit.
CRASH_POINTS = (
    "after_snapshot",
    "after_engine_save",
    "after_rank_files",
    "after_done_marker",
    "after_manifest",
    "after_committed",
    "after_latest",
)


class CheckpointError(UserError):
    """A checkpoint that cannot be used as asked; the message says which and what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def rank_file_name(r: int) -> str:
    return f"rank_{r:05d}.pt"


def _crash_point(name: str, step: int) -> None:
    want = os.environ.get("VIT_SCALE_CRASH_AT", "")
    point, _, at = want.partition("@")
    if point == name and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- saving


def _on_every_rank(flag: bool) -> bool:
    """True when `flag` is true on every rank (one all-reduce)."""
    if not is_multi_rank():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() == 0.0


def _gather(obj) -> list:
    """`obj` of every rank, in rank order."""
    if not is_multi_rank():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj):
    if not is_multi_rank():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _manifest_files(ckpt: Path) -> dict:
    """Size and sha256 of every file in `ckpt` but the manifest, the marker and hidden (temporary) ones."""
    return {
        str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": snapshot.sha256_file(p)}
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, COMMITTED) and not p.name.startswith(".")
    }


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def done_marker_name(r: int) -> str:
    """Rank r's report that its files are durable: their sizes and sha256, for rank 0's manifest."""
    return f".rank_{r:05d}.done"


class _Save:
    """One save in flight on this rank: its recorded or snapshotted files, and what became of them."""

    def __init__(self, saver: Saver, step: int, ckpt: Path, files: list, manifest: dict):
        self.saver, self.step, self.ckpt, self.files, self.manifest = saver, step, ckpt, files, manifest
        self.started = time.perf_counter()
        self.written = threading.Event()  # this rank's files and its done-marker are durable, or failed
        self.cancelled = threading.Event()  # another rank failed: rank 0 stops waiting for the markers
        self.error: str | None = None  # why this rank's files were not written
        self.full = False  # ... because the disk is full
        self.commit_error: str | None = None  # rank 0: why the checkpoint was not committed
        self.thread: threading.Thread | None = None
        self.finished = 0.0  # when this rank's part ended (rank 0: the commit)

    def write(self) -> None:
        """This rank's files (DeepSpeed's, then its own state), durable, then its done-marker."""
        try:
            # A checkpoint with NaN or infinite weights or optimizer state would become the one a resume
            # loads: refused here, on the copy, so the check costs the loop nothing.
            bad = next((p for p, state in self.files if not snapshot.all_finite(state)), None)
            if bad is not None:
                self.error = (
                    f"checkpoint {self.ckpt} was not written: rank {rank()}: {bad.name} holds values that are "
                    f"not finite at step {self.step} (weights or optimizer state); the last committed one stays"
                )
                return
            reports = {}
            for path, state in self.files[:-1]:
                reports[str(path.relative_to(self.ckpt))] = snapshot.write_file(path, state)
            fsync_dir(self.ckpt)
            _crash_point("after_engine_save", self.step)
            path, state = self.files[-1]
            reports[path.name] = snapshot.write_file(path, state)
            fsync_dir(self.ckpt)
            _crash_point("after_rank_files", self.step)
            marker = {"step": self.step, "rank": rank(), "files": reports}
            atomic_write_json(self.ckpt / done_marker_name(rank()), marker)
            _crash_point("after_done_marker", self.step)
        except Exception as e:  # noqa: BLE001 - reported to every rank at the next wait
            full = _disk_full(self.saver.engine, self.ckpt, e)
            self.full = full is not None
            why = f"checkpoint {self.ckpt} was not written: rank {rank()}: {type(e).__name__}: {e}"
            self.error = full or why
        finally:
            self.files = []  # the snapshot's buffers go back to the saver's HostMemory
            self.finished = time.perf_counter()
            self.written.set()

    def commit(self) -> None:
        """Rank 0: once every rank's done-marker is on disk, the manifest, COMMITTED, `latest`, pruning."""
        try:
            markers = [self.ckpt / done_marker_name(r) for r in range(self.manifest["world_size"])]
            delay = 0.01
            while not all(m.is_file() for m in markers):
                if self.cancelled.wait(delay):
                    return
                delay = min(2 * delay, 0.25)
            files = {}
            for m in markers:
                report = json.loads(m.read_text())
                if report["step"] != self.step:
                    raise CheckpointError(f"{m} reports step {report['step']}, expected {self.step}")
                files.update({name: dict(f, rank=report["rank"]) for name, f in report["files"].items()})
            # Files DeepSpeed wrote itself rather than through its checkpoint engine, if any: rank 0's.
            for name, f in _manifest_files(self.ckpt).items():
                if name not in files:
                    _fsync(self.ckpt / name)
                    files[name] = dict(f, rank=0)
            try:
                manifest = dict(self.manifest, files=dict(sorted(files.items())))
                atomic_write_json(self.ckpt / MANIFEST, manifest)
                _crash_point("after_manifest", self.step)
                atomic_write_text(self.ckpt / COMMITTED, f"{self.step}\n")
            except Exception as e:
                full = _disk_full(self.saver.engine, self.ckpt, e)
                if full is None:
                    raise
                shutil.rmtree(self.ckpt, ignore_errors=True)
                self.commit_error = full
                return
            _crash_point("after_committed", self.step)
            root = self.ckpt.parent
            atomic_write_text(root / LATEST, self.ckpt.name + "\n")
            _crash_point("after_latest", self.step)
            prune(root, self.saver.keep_last, self.saver.keep_every)
        except Exception as e:  # noqa: BLE001 - reported to every rank at the next wait
            self.commit_error = f"checkpoint {self.ckpt} was not committed: {type(e).__name__}: {e}"
        finally:
            self.finished = time.perf_counter()

    def run_in_background(self) -> None:
        # The writer yields the CPU to training where cores are short; it runs at its own pace otherwise.
        # Linux takes a thread id here and sets that thread alone; relative to the process's niceness.
        me = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + WRITER_NICE))
        except OSError:
            pass  # a platform without per-thread priorities: the writer runs at the training's
        self.write()
        if is_rank0() and self.error is None:
            self.commit()


WRITER_NICE = 10


class Saver:
    """The checkpoints of one run under the commit protocol; every rank makes the same calls.

    With `background` (checkpoint.async), `save` returns once this rank's state is copied into host
    memory at the step boundary; a thread then writes, fsyncs and hashes this rank's files and reports their
    sizes and sha256 in a done-marker, and rank 0's thread writes the manifest and COMMITTED once every
    rank's marker is on disk. At most one save is in flight: `save` first `wait`s for the one before. When a
    host copy would take more than half the memory available on some rank, that save is written in the
    foreground instead, with a note. Without `background`, `save` writes the same files and commits before
    it returns.
    """

    def __init__(
        self,
        engine,
        run_dir: Path,
        *,
        config: dict,
        keep_last: int = 3,
        keep_every: int = 0,
        background: bool = True,
    ):
        self.engine, self.root, self.config = engine, Path(run_dir) / "checkpoints", config
        self.keep_last, self.keep_every, self.background = keep_last, keep_every, background
        self.memory = snapshot.HostMemory()
        self.pending: _Save | None = None
        self.last_save_s = 0.0  # from the start of the last finished save to its commit (this rank's view)

    def save(self, step: int, trainer_state: dict, rank_state: dict) -> Path:
        """Checkpoint `step`: returns its directory once the state is in host memory (background) or the
        checkpoint is committed."""
        self.wait()
        ckpt = self.root / step_dir_name(step)
        if is_rank0():
            self.root.mkdir(parents=True, exist_ok=True)
            if ckpt.exists():  # a torn earlier attempt at this step, or one superseded after a resume
                shutil.rmtree(ckpt)
        barrier()
        files = snapshot.record_save(self.engine, self.root, ckpt.name, {"trainer": trainer_state})
        files.append((ckpt / rank_file_name(rank()), dict(rank_state, rank=rank(), world_size=world_size())))
        manifest = {
            "step": step,
            "world_size": world_size(),
            "zero_stage": self.engine.zero_optimization_stage(),
            "trainer": copy.deepcopy(trainer_state),
            "config": self.config,  # a checkpoint directory describes itself, even copied away from its run
            "time": time.time(),
            # Who wrote it (user, host, pid, job id): resuming unpickles its files, so know whose they are.
            "writer": writer(),
        }
        background = self.background and _on_every_rank(self._fits(files, step))
        if background:
            files = self.memory.snapshot(files)
        _crash_point("after_snapshot", step)
        self.pending = job = _Save(self, step, ckpt, files, manifest)
        if background:
            job.thread = threading.Thread(
                target=job.run_in_background, name=f"checkpoint-{step}", daemon=True
            )
            job.thread.start()
        else:
            job.write()
            self.wait()
        return ckpt

    @property
    def in_flight(self) -> bool:
        """The last save went to the background and has not been waited for."""
        return self.pending is not None

    def _fits(self, files: list, step: int) -> bool:
        import psutil

        need, free = self.memory.new_bytes(files), psutil.virtual_memory().available
        if need <= free // 2:
            return True
        print(
            f"vit-scale: rank {rank()}: checkpoint {step} is written in the foreground: a host copy of this "
            f"rank's state needs {need / 1e9:.1f} GB and {free / 1e9:.1f} GB are available",
            file=sys.stderr,
            flush=True,
        )
        return False

    def wait(self) -> None:
        """Until the save in flight is committed; every rank calls it. Raises CheckpointError on every rank
        when some rank could not write its files or rank 0 could not commit them."""
        job, self.pending = self.pending, None
        if job is None:
            return
        job.written.wait()
        # after this gather every rank's writer has ended: a full disk's partial checkpoint can go
        failed = sorted((not full, e) for e, full in _gather((job.error, job.full)) if e is not None)
        if failed:
            job.cancelled.set()
            full, error = not failed[0][0], failed[0][1]
            if full and is_rank0():
                shutil.rmtree(job.ckpt, ignore_errors=True)
            raise CheckpointError(error)
        if is_rank0():
            if job.thread is not None:
                job.thread.join()
            else:
                job.commit()
        error = _from_rank0(job.commit_error)
        if error is not None:
            raise CheckpointError(error)
        self.last_save_s = job.finished - job.started


def save(
    engine,
    run_dir: Path,
    step: int,
    trainer_state: dict,
    rank_state: dict,
    *,
    config: dict,
    keep_last: int = 3,
    keep_every: int = 0,
) -> Path:
    """Write, commit and publish checkpoint `step` before returning; every rank calls this."""
    saver = Saver(
        engine, run_dir, config=config, keep_last=keep_last, keep_every=keep_every, background=False
    )
    return saver.save(step, trainer_state, rank_state)


def checkpoint_bytes(engine, root: Path) -> int:
    """About how much one checkpoint takes: the newest committed one's size, else 16 bytes per parameter
    (fp32 weights, Adam's two moments, the module's own copy)."""
    committed = committed_dirs(root)
    if committed:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return sum(f["size"] for f in read_manifest(committed[-1])["files"].values())
    return 16 * sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())


def _disk_full(engine, ckpt: Path, e: BaseException) -> str | None:
    """The one line for a write into `ckpt` that failed for lack of space (the path, the free space, the
    size needed), None for any other failure. The caller removes the partial checkpoint, which the line
    says: it has no COMMITTED marker, so it would never be loaded, but it holds the space the next try
    needs."""
    needed = checkpoint_bytes(engine, ckpt.parent)
    if not is_disk_full(e, ckpt, needed):
        return None
    err = disk_full_error(
        ckpt, needed, "checkpoint",
        "removed the partial checkpoint (the run resumes from its last committed one); free space or "
        "move the run directory, then run the same command again",
    )  # fmt: skip
    return str(err)


def prune(root: Path, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Remove old checkpoints once a newer one is committed: keep the last `keep_last` committed ones, every
    `keep_every`-th step for good, and nothing torn that is older than the newest committed one."""
    committed = committed_dirs(root)
    if not committed:
        return []
    keep = set(committed[-max(1, keep_last) :])
    if keep_every > 0:
        keep |= {d for d in committed if _step_of(d) % keep_every == 0}
    newest = _step_of(committed[-1])
    removed = []
    for d in _step_dirs(root):
        if d in keep or _step_of(d) > newest:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    if removed:
        fsync_dir(root)
    return removed


# ---------------------------------------------------------------- finding and verifying


def _step_of(d: Path) -> int:
    return int(STEP_DIR.match(d.name).group(1))


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and STEP_DIR.match(d.name)), key=_step_of)


def committed_dirs(root: Path) -> list[Path]:
    return [d for d in _step_dirs(root) if (d / COMMITTED).is_file()]


def verify(ckpt: Path, mode: str = "full", part: tuple[int, int] = (0, 1)) -> str | None:
    """None when `ckpt` is committed and matches its manifest; otherwise why not.

    mode "full" compares every file's sha256, "size" only that each file is there with its size (weaker:
    it misses a file overwritten in place with the same length). part=(i, n) checks only the i-th of n
    shares of the files: those written by the ranks r with r mod n = i, so n ranks verify in parallel what
    they wrote (with the same number of processes, the files each reads, but for rank 0's shared ones).
    """
    if not (ckpt / COMMITTED).is_file():
        return f"{ckpt} has no {COMMITTED} marker (its save did not finish)"
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"{ckpt}: unreadable {MANIFEST} ({e})"
    share, shares = part
    for i, (name, want) in enumerate(manifest["files"].items()):
        if want.get("rank", i) % shares != share:
            continue
        f = ckpt / name
        if not f.is_file():
            return f"{ckpt}: {name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{ckpt}: {name} has {f.stat().st_size} bytes, the manifest says {want['size']}"
        if mode == "full" and snapshot.sha256_file(f) != want["sha256"]:
            return f"{ckpt}: {name} does not match its sha256 in the manifest"
    return None


def read_manifest(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / MANIFEST).read_text())


@dataclass
class Selection:
    path: Path | None
    notes: list[str]  # why newer directories were passed over


def _candidates(path: Path) -> list[Path]:
    """Where to look, newest first: `path` itself when it names one checkpoint directory."""
    if STEP_DIR.match(path.name):
        return [path]
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return list(reversed(_step_dirs(root)))


def _choose(path: Path, candidates: list[Path], check) -> Selection:
    notes = []
    for d in candidates:
        why = check(d)
        if why is None:
            return Selection(d, notes)
        if STEP_DIR.match(path.name):
            raise CheckpointError(f"cannot use checkpoint: {why}")
        notes.append(f"skipping {why}; falling back to an older checkpoint")
    return Selection(None, notes)


def select(path: Path, mode: str = "full") -> Selection:
    """The newest usable checkpoint under `path`: a run directory, its checkpoints/ folder, or one
    checkpoint directory. Unusable ones are passed over with a note, falling back to older ones."""
    path = Path(path)
    return _choose(path, _candidates(path), lambda d: verify(d, mode))


def select_everywhere(path: Path, mode: str = "full") -> Selection:
    """`select` on every rank at once: rank 0 lists the candidates, each rank verifies its share of each
    candidate's files (`verify`'s part), and the first complaint of any rank rules a candidate out, so
    every rank loads the same directory."""
    path = Path(path)
    if not is_multi_rank():
        return select(path, mode)

    def check(d: Path) -> str | None:
        return next((w for w in _gather(verify(d, mode, (rank(), world_size()))) if w is not None), None)

    return _choose(path, _from_rank0(_candidates(path) if is_rank0() else None), check)


# ---------------------------------------------------------------- loading


UNIVERSAL_DIR = ".universal"  # under checkpoints/: a converted copy, alive only while it is being loaded


def _universal_copy(ckpt: Path, scratch: Path) -> Path:
    """Rank 0 converts `ckpt`'s ZeRO shards with DeepSpeed's ds_to_universal into scratch/.universal/; the
    path (or the conversion's error) reaches every rank. A copy left by an interrupted resume is replaced."""
    out = scratch / UNIVERSAL_DIR / ckpt.name
    box: list = [None]
    if is_rank0():
        import contextlib
        from argparse import Namespace

        from deepspeed.checkpoint import ds_to_universal

        shutil.rmtree(scratch / UNIVERSAL_DIR, ignore_errors=True)
        print(
            f"vit-scale: converting {ckpt} to DeepSpeed's universal checkpoint in {out.parent} for the new "
            "number of processes (once; about 7 s per GB of checkpoint on a 2-core machine)",
            file=sys.stderr,
            flush=True,
        )
        log = io.StringIO()
        args = Namespace(
            input_folder=str(ckpt),
            output_folder=str(out),
            num_extract_workers=1,  # in this process: a rank should not fork a pool
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
            box[0] = str(out)
        except Exception as e:  # noqa: BLE001 - any failure becomes one message on every rank
            box[0] = (
                f"error: DeepSpeed's universal checkpoint conversion of {ckpt} failed: {e!r}\n{log.getvalue()[-2000:]}"
            )
    if is_multi_rank():
        dist.broadcast_object_list(box, src=0)
    if box[0].startswith("error: "):
        raise CheckpointError(box[0][len("error: ") :])
    return Path(box[0])


def _other_model(ckpt: Path, e: RuntimeError) -> CheckpointError | None:
    """What to tell the user when torch refused the weights of `ckpt` for this model (a run directory reused
    with other model settings); None for any other failure."""
    text = str(e)
    if "Error(s) in loading state_dict" not in text:
        return None
    m = re.search(r"size mismatch for ([\w.]+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
                  r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", text)
    what = f"{m[1]} is {m[2]} there and {m[3]} now" if m else text.splitlines()[1].strip().rstrip(".")
    return CheckpointError(
        f"{ckpt} holds the weights of another model ({what}): resuming needs the model settings it was saved "
        f"with (its {MANIFEST} lists them); to start afresh use another --run-dir, or fine-tune from it with "
        f"init={ckpt}"
    )


def rank_states(ckpt: Path) -> list[dict]:
    """The own state of every rank that wrote `ckpt` (its data position, RNGs), in rank order: a resume
    with another layout continues the data from all of them."""
    ckpt = Path(ckpt)
    saved = read_manifest(ckpt)["world_size"]
    return [safe_load.load(ckpt / rank_file_name(r)) for r in range(saved)]


def load(
    engine, ckpt: Path, *, load_optimizer: bool = True, scratch: Path | None = None
) -> tuple[dict, dict | None]:
    """Restore `ckpt` into `engine`; returns (trainer state, this rank's own state).

    A checkpoint written by another number of processes has ZeRO shards and per-rank data positions that
    belong to other ranks. Its weights, optimizer state and schedule then go through DeepSpeed's universal
    checkpoint (converted into `scratch`, loaded, deleted), and this rank's own state comes back as None:
    the caller continues the data from every rank's states (`rank_states`) and starts new random streams.
    """
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    saved, now = manifest["world_size"], world_size()
    if saved == now:
        try:
            path, client = engine.load_checkpoint(
                str(ckpt.parent),
                tag=ckpt.name,
                load_optimizer_states=load_optimizer,
                load_lr_scheduler_states=load_optimizer,
            )
        except RuntimeError as e:
            refused = _other_model(ckpt, e)
            if refused is None:
                raise
            raise refused from None
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {ckpt}")
        own = safe_load.load(ckpt / rank_file_name(rank()))
        return client["trainer"], own

    was_offloaded = bool(manifest.get("config", {}).get("parallel", {}).get("offload_optimizer"))
    if load_optimizer and was_offloaded != engine.zero_use_cpu_optimizer():
        # DeepSpeedCPUAdam and torch's AdamW keep their state in different forms, which only the
        # same-layout load converts.
        raise CheckpointError(
            f"{ckpt} was written by {saved} processes with parallel.offload_optimizer={str(was_offloaded).lower()}; "
            f"to resume it with {now}, keep parallel.offload_optimizer={str(was_offloaded).lower()} (change it in "
            f"a later resume with {now} processes), or resume with {saved} processes"
        )
    if not any(ckpt.glob("*zero_pp_rank_*_optim_states.pt")):
        # No ZeRO shards (stage 0 in fp32): the optimizer state sits whole in the model-states file.
        source = ckpt
    else:
        source = _universal_copy(ckpt, scratch if scratch is not None else ckpt.parent)
    engine._config.load_universal_checkpoint = source is not ckpt
    try:
        path, client = engine.load_checkpoint(
            str(source.parent),
            tag=source.name,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer,
        )
    except Exception as e:  # noqa: BLE001 - DeepSpeed's own errors name its internals, not the options
        raise CheckpointError(
            f"{ckpt} was written by {saved} processes and could not be loaded by {now} ({e!r}). Options: resume "
            f"with {saved} processes (--nproc {saved} or the same SLURM layout); or start a new run from its "
            f"weights with `vit-scale export {ckpt} --out DIR` and init=DIR"
        ) from e
    finally:
        engine._config.load_universal_checkpoint = False
        barrier()
        if source is not ckpt and is_rank0():
            shutil.rmtree(source.parent, ignore_errors=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt}")
    return client["trainer"], None
