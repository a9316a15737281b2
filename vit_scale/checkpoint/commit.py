"""Checkpoints that never tear: DeepSpeed's sharded save under our own commit protocol.

    checkpoints/step_000000020/   DeepSpeed's files + rank_00000.pt ... (each rank's data position and RNGs)
                  manifest.json   sizes and sha256 of every file, counters, world size, ZeRO stage, who wrote it
                  COMMITTED       written last, after every rank finished and the manifest is on disk
    checkpoints/latest            name of the newest committed step, replaced atomically

A directory without COMMITTED, or whose files disagree with its manifest, is never loaded. DeepSpeed's
own `latest` file is not written: it appears before all ranks finish.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vit_scale.checkpoint import safe_load
from vit_scale.checkpoint.lock import writer
from vit_scale.dist import barrier, collective_device, is_multi_rank, is_rank0, rank, world_size
from vit_scale.errors import UserError
from vit_scale.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    disk_full_error,
    fsync_dir,
    is_disk_full,
)

COMMITTED = "COMMITTED"
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d{9})$")
# Fault injection for the kill-at-every-write-point test: VIT_SCALE_CRASH_AT=<point>[@<step>] SIGKILLs
# this process there. The points, in write order:
CRASH_POINTS = ("after_engine_save", "after_rank_files", "after_manifest", "after_committed", "after_latest")


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


def _all_finite(engine) -> bool:
    """True when every rank's weights (its ZeRO-3 partition, or the full module) are finite."""
    ok = True
    for p in engine.module.parameters():
        t = getattr(p, "ds_tensor", p)
        if t.numel() and not torch.isfinite(t).all():
            ok = False
            break
    if is_multi_rank():
        flag = torch.tensor([0.0 if ok else 1.0], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        ok = flag.item() == 0.0
    return ok


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_files(ckpt: Path) -> dict:
    return {
        str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(ckpt.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, COMMITTED) and not p.name.startswith(".")
    }


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
    """Write, commit and publish checkpoint `step`; every rank calls this. Returns its directory."""
    root = Path(run_dir) / "checkpoints"
    tag = step_dir_name(step)
    ckpt = root / tag
    if not _all_finite(engine):
        raise CheckpointError(f"weights are not finite at step {step}; refusing to write {ckpt}")
    if is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        if ckpt.exists():  # a torn earlier attempt at this step, or one superseded after a resume
            shutil.rmtree(ckpt)
    barrier()
    with _space_for(engine, ckpt):
        engine.save_checkpoint(str(root), tag=tag, client_state={"trainer": trainer_state}, save_latest=False)
        _crash_point("after_engine_save", step)
        buf = io.BytesIO()
        torch.save(dict(rank_state, rank=rank(), world_size=world_size()), buf)
        atomic_write_bytes(ckpt / rank_file_name(rank()), buf.getvalue())
    _crash_point("after_rank_files", step)
    barrier()
    if is_rank0():
        with _space_for(engine, ckpt):
            _commit(engine, ckpt, step, trainer_state, config)
        _crash_point("after_committed", step)
        atomic_write_text(root / LATEST, tag + "\n")
        _crash_point("after_latest", step)
        prune(root, keep_last, keep_every)
    barrier()
    return ckpt


def _commit(engine, ckpt: Path, step: int, trainer_state: dict, config: dict) -> None:
    """Rank 0, once every rank's files are on disk: the manifest, then COMMITTED."""
    manifest = {
        "step": step,
        "world_size": world_size(),
        "zero_stage": engine.zero_optimization_stage(),
        "trainer": trainer_state,
        "config": config,  # a checkpoint directory describes itself, even copied away from its run
        "time": time.time(),
        # Who wrote it (user, host, pid, job id): resuming unpickles its files, so know whose they are.
        "writer": writer(),
        "files": _manifest_files(ckpt),
    }
    atomic_write_json(ckpt / MANIFEST, manifest)
    _crash_point("after_manifest", step)
    atomic_write_text(ckpt / COMMITTED, f"{step}\n")


def checkpoint_bytes(engine, root: Path) -> int:
    """About how much one checkpoint takes: the newest committed one's size, else 16 bytes per parameter
    (fp32 weights, Adam's two moments, the module's own copy)."""
    committed = committed_dirs(root)
    if committed:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return sum(f["size"] for f in read_manifest(committed[-1])["files"].values())
    return 16 * sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())


@contextlib.contextmanager
def _space_for(engine, ckpt: Path):
    """A full disk while writing `ckpt` becomes one line with the path, the free space and the size needed,
    and the partial checkpoint is removed: it has no COMMITTED marker, so it would never be loaded, but
    it holds the space the next try needs."""
    try:
        yield
    except Exception as e:
        needed = checkpoint_bytes(engine, ckpt.parent)
        if not is_disk_full(e, ckpt, needed):
            raise
        err = disk_full_error(
            ckpt, needed, "checkpoint",
            "removed the partial checkpoint (the run resumes from its last committed one); free space or "
            "move the run directory, then run the same command again",
        )  # fmt: skip
        shutil.rmtree(ckpt, ignore_errors=True)
        raise CheckpointError(str(err)) from None


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


def verify(ckpt: Path) -> str | None:
    """None when `ckpt` is committed and matches its manifest; otherwise why not."""
    if not (ckpt / COMMITTED).is_file():
        return f"{ckpt} has no {COMMITTED} marker (its save did not finish)"
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"{ckpt}: unreadable {MANIFEST} ({e})"
    for name, want in manifest["files"].items():
        f = ckpt / name
        if not f.is_file():
            return f"{ckpt}: {name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{ckpt}: {name} has {f.stat().st_size} bytes, the manifest says {want['size']}"
        if _sha256(f) != want["sha256"]:
            return f"{ckpt}: {name} does not match its sha256 in the manifest"
    return None


def read_manifest(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / MANIFEST).read_text())


@dataclass
class Selection:
    path: Path | None
    notes: list[str]  # why newer directories were passed over


def select(path: Path) -> Selection:
    """The newest usable checkpoint under `path`: a run directory, its checkpoints/ folder, or one
    checkpoint directory. Unusable ones are passed over with a note, falling back to older ones."""
    path = Path(path)
    if STEP_DIR.match(path.name):
        why = verify(path)
        if why is not None:
            raise CheckpointError(f"cannot use checkpoint: {why}")
        return Selection(path, [])
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    notes = []
    for d in reversed(_step_dirs(root)):
        why = verify(d)
        if why is None:
            return Selection(d, notes)
        notes.append(f"skipping {why}; falling back to an older checkpoint")
    return Selection(None, notes)


def select_everywhere(path: Path) -> Selection:
    """`select` on rank 0, the answer broadcast, so every rank loads the same directory."""
    box = [select(path) if is_rank0() else None]
    if is_multi_rank():
        dist.broadcast_object_list(box, src=0)
    return box[0]


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
