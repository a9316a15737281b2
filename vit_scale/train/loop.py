"""THE training loop, used by `pretrain` and `finetune` alike.

`train()` reads top to bottom: build (data, model, engine), resume, then a fixed number of `train_step`s
with logging, the caller's hooks, checkpoints and preemption at step boundaries, then the final save.
Every rank runs the same number of steps, and every decision that must be the same on every rank
(skip, checkpoint now, stop) is one all-reduce.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vit_scale.checkpoint import commit
from vit_scale.checkpoint.average import AVERAGE
from vit_scale.checkpoint.policy import CheckpointPolicy
from vit_scale.config import Batch, Config, ConfigError, to_dict
from vit_scale.config.schema import ModelConfig
from vit_scale.data.transforms import make_mixup, to_model_input
from vit_scale.dist import collective_device, device, is_multi_rank, is_rank0, on_rank0, rank, world_size
from vit_scale.errors import UserError
from vit_scale.models import build_model, model_dims, train_flops
from vit_scale.observe import metrics
from vit_scale.observe.progress import Progress
from vit_scale.train.average import ParamAverage
from vit_scale.train.engine import build_engine, init_distributed
from vit_scale.train.preempt import DEADLINE_REASON, Preempted, PreemptionWatch, job_deadline


class TrainingHalted(UserError):
    """Too many consecutive non-finite steps: the run cannot make progress as configured."""

    @classmethod
    def after(cls, skips: int, step: int) -> TrainingHalted:
        return cls(
            f"{skips} consecutive steps had non-finite loss or gradients (up to step {step}); nothing was "
            "updated or checkpointed since. Lower optim.lr, raise schedule.warmup_steps, or use "
            "precision.dtype=fp32 / bf16 instead of fp16"
        )


class PeerLost(UserError):
    """A collective timed out or lost its connection: another rank is frozen or has died."""

    exit_code = 1  # a crash, not bad input: a launcher may restart the job, which then resumes

    SIGNS = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")

    @classmethod
    def matches(cls, e: BaseException) -> bool:
        """A communication backend's error (not, say, a shard read's timeout) about a missing peer."""
        msg = str(e).lower()
        from_backend = isinstance(e, dist.DistError) or any(b in msg for b in ("gloo", "nccl", "c10d"))
        return isinstance(e, RuntimeError) and from_backend and any(s in msg for s in cls.SIGNS)

    @classmethod
    def at_step(cls, e: BaseException, r: int, step: int, timeout_minutes: float) -> PeerLost:
        detail = str(e).strip().splitlines()[-1][-200:]
        return cls(
            f"rank {r} at step {step}: a collective operation failed ({detail}). Another rank is frozen or has "
            f"died; parallel.timeout_minutes={timeout_minutes:g} bounds how long the others wait for it. Run "
            f"the same command again to resume from the last committed checkpoint"
        )


@dataclass
class Counters:
    """What the loop itself adds to a checkpoint (DeepSpeed saves model, optimizer and schedule)."""

    step: int = 0
    samples: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    wandb_id: str | None = None
    job_ids: list[str] = field(default_factory=list)  # the launcher's job ids (SLURM requeues), in order

    def advance(self, applied: bool, global_batch: int) -> None:
        """One step taken; `applied` is false when DeepSpeed skipped its update (non-finite gradients)."""
        self.step += 1
        self.samples += global_batch
        self.skipped_steps += not applied
        self.consecutive_skips = 0 if applied else self.consecutive_skips + 1


@dataclass(frozen=True)
class Hook:
    """Periodic work a command passes to `train` (an evaluation, say): `run(model)` on every rank after every
    `every`-th step, returning figures for metrics.jsonl. The loop restores the training RNG and the module's
    train mode afterwards, so a hook cannot change the steps that follow."""

    every: int
    run: Callable[[nn.Module], dict]


# ---------------------------------------------------------------- pieces


def total_steps(cfg: Config, num_samples: int) -> int:
    """The run length in optimizer steps, converted once from epochs or examples when given so."""
    t = cfg.train
    if t.steps is not None:
        return t.steps
    if t.examples is not None:
        return math.ceil(t.examples / t.global_batch)
    if t.epochs is not None:
        if num_samples <= 0:
            raise ConfigError(
                f"train.epochs={t.epochs} needs the sample count from {cfg.data.train}/index.json; "
                "give train.steps or train.examples instead"
            )
        return math.ceil(t.epochs * num_samples / t.global_batch)
    raise ConfigError("give the run length: train.steps, train.epochs or train.examples")


def check_classes(cfg: Config, num_classes: int) -> None:
    """The head must cover the training data's classes, and match them for multi-hot labels."""
    head = cfg.model.num_classes
    if cfg.data.labels == "multi" and num_classes != head:
        raise ConfigError(
            f"{cfg.data.train} has {num_classes} classes but model.num_classes={head}; "
            f"set model.num_classes={num_classes}"
        )
    if num_classes > head:
        raise ConfigError(
            f"{cfg.data.train} has {num_classes} classes but model.num_classes={head} is smaller; "
            f"set model.num_classes={num_classes}"
        )


def loss_function(cfg: Config):
    kind = cfg.optim.loss
    if kind == "auto":
        kind = "sigmoid" if cfg.data.labels == "multi" else "softmax"
    if kind == "sigmoid":
        # Summed over classes, averaged over images: the multi-label (JFT-style) pretraining loss.
        return lambda logits, y: (
            F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="none").sum(-1).mean()
        )
    if cfg.data.mixup > 0 or cfg.data.cutmix > 0:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()  # the targets arrive mixed, and smoothed by the Mixup (`make_mixup`)
    smoothing = cfg.optim.label_smoothing
    return lambda logits, y: F.cross_entropy(logits, y, label_smoothing=smoothing)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def agree(*flags: bool) -> list[bool]:
    """Each flag true on any rank becomes true on every rank (one all-reduce for all of them)."""
    if not is_multi_rank():
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def model_dtype(cfg: Config) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision.dtype, torch.float32)


def train_step(engine, batches, loss_fn, dtype: torch.dtype, mix=None) -> torch.Tensor:
    """Forward, backward and optimizer step over one step's micro batches; returns the mean local loss.

    `mix` (timm's Mixup, from `make_mixup`) blends each micro batch's images in fp32 and turns its labels
    into the soft targets `loss_fn` expects; its draws come from numpy's global RNG, which checkpoints save
    per rank. DeepSpeed accumulates gradients until the last micro batch and then steps, or skips the update
    on every rank alike when any gradient is non-finite (read back with `engine.was_step_applied()`).
    """
    losses = []
    for images, labels in batches:
        images = images.to(engine.device, non_blocking=True)
        labels = labels.to(engine.device, non_blocking=True)
        inputs = to_model_input(images)
        if mix is not None:
            inputs, labels = mix(inputs, labels)
        logits = engine(inputs.to(dtype))
        loss = loss_fn(logits.float(), labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def evaluated_module(engine, average: ParamAverage | None, model_cfg: ModelConfig) -> nn.Module:
    """What evaluation scores: the parameter average when optim.ema_decay is set, else the trained module."""
    return engine.module if average is None else average.module(model_cfg)


def run_hooks(
    hooks: Sequence[Hook], step: int, engine, average: ParamAverage | None, model_cfg: ModelConfig
) -> list[dict]:
    """The figures of the hooks due at `step`, all run on one evaluated module."""
    due = [hook for hook in hooks if step % hook.every == 0]
    if not due:
        return []
    # Evaluation must not move the training RNG, or a resume that lands between two evaluations would
    # draw different dropout masks and mixup from the uninterrupted run.
    saved_rng = commit.rng_state()
    model = evaluated_module(engine, average, model_cfg)
    figures = [hook.run(model) for hook in due]
    commit.set_rng_state(saved_rng)
    engine.train()
    return figures


def resume(cfg: Config, engine, run_dir: Path, loader, average: ParamAverage | None = None):
    """The counters to continue with, after loading the newest committed checkpoint of cfg.resume (by
    default of run_dir) into `engine` (and `average`) and the data position into `loader`; a fresh run gets
    new counters.

    The same layout continues every rank's data position and RNGs exactly. Another layout (number of
    processes, data.workers, micro batch, shuffle buffer) continues the same epoch from what every rank
    had consumed, each sample once; with another number of processes the random streams (dropout, drop
    path, mixup) start afresh for the new layout, and later resumes with it are exact again.
    """
    chosen = commit.select_everywhere(Path(cfg.resume) if cfg.resume else run_dir, cfg.checkpoint.verify)
    for note in chosen.notes:
        on_rank0(print, f"vit-scale: {note}", file=sys.stderr)
    if cfg.resume and chosen.path is None:
        raise UserError(f"resume={cfg.resume}: no committed checkpoint there")
    if chosen.path is None:
        return Counters()
    saved, own = commit.load(engine, chosen.path, scratch=run_dir / "checkpoints")
    if average is not None:
        average.restore(own, chosen.path)
    saved.pop("stream_seed", None)  # kept by checkpoints of data state version 1, which the loader refuses
    counters = Counters(**saved)
    on_rank0(print, f"vit-scale: resumed from {chosen.path} at step {counters.step}", file=sys.stderr)
    if own is not None and loader.same_layout(own["data"]):
        loader.load_state_dict(own["data"])
        commit.set_rng_state(own["rng"])
        return counters
    loader.continue_from(data_progress(chosen.path))
    before = commit.read_manifest(chosen.path)["world_size"]
    if own is not None:  # the same processes with other data settings: their RNGs carry on
        commit.set_rng_state(own["rng"])
        on_rank0(
            print,
            "vit-scale: the data layout changed (data.workers, micro batch or shuffle buffer): the current "
            "epoch continues with the samples not yet seen, each once",
            file=sys.stderr,
        )
        return counters
    from vit_scale.data.streams import derive_seed

    world = world_size()
    seed_everything(
        derive_seed(cfg.train.seed, "world", world, "step", counters.step) % 2**31 * 1000 + rank() + 1
    )
    on_rank0(
        print,
        f"vit-scale: that checkpoint was written by {before} processes and {world} run now: weights, "
        f"optimizer state and schedule were re-sharded for {world}; the current epoch continues with the "
        f"samples not yet seen, each once, and the random streams (dropout, drop path, mixup, augmentation) "
        f"start afresh for the new layout, so this run will not match an uninterrupted one bit for bit",
        file=sys.stderr,
    )
    return counters


def data_progress(ckpt: Path) -> dict:
    """Every rank's data state in `ckpt`, merged on rank 0 into the layout-free progress of the epoch and
    sent to every rank (or the reason it cannot be, raised everywhere alike)."""
    from vit_scale.data.loader import merge_states

    box: list = [None]
    if is_rank0():
        try:
            box[0] = merge_states([s["data"] for s in commit.rank_states(ckpt)])
        except UserError as e:
            box[0] = str(e)
    if is_multi_rank():
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise UserError(box[0])
    return box[0]


def open_metrics(cfg: Config, run_dir: Path, counters: Counters) -> metrics.MetricsLog | None:
    """Rank 0's metrics.jsonl and wandb run (None elsewhere), continuing the wandb run and the chain of
    job ids that the counters carry across requeues; this job joins the chain."""
    job = os.environ.get("VIT_SCALE_JOB_ID")
    if job and job not in counters.job_ids:
        counters.job_ids.append(job)
    if not is_rank0():
        return None
    log = metrics.MetricsLog(
        run_dir,
        to_dict(cfg),
        wandb_setting=cfg.logging.wandb,
        project=cfg.logging.project,
        entity=cfg.logging.entity,
        run_name=cfg.run.name,
        run_id=counters.wandb_id,
        job_ids=counters.job_ids,
        resume_step=counters.step,
    )
    counters.wandb_id = log.run_id
    return log


# ---------------------------------------------------------------- the loop


def train(
    cfg: Config,
    run_dir: str | os.PathLike,
    batch: Batch,
    model: nn.Module | None = None,
    hooks: Sequence[Hook] = (),
) -> dict:
    """Train `model` (by default a new one from cfg.model) on cfg.data.train, running the caller's `hooks`
    at their steps; returns the final figures. `batch` is what `validate(cfg, world_size)` returned."""
    from vit_scale.data.loader import make_loader

    run_dir, m, ck = Path(run_dir), cfg.model, cfg.checkpoint
    init_distributed(cfg)
    r, world, micro = rank(), world_size(), batch.micro_batch_per_rank
    if world != batch.world_size:
        raise ConfigError(f"the settings were validated for {batch.world_size} processes but {world} run")

    # ---- build: data, then model and engine (the same initial weights on every rank)
    kw = dict(
        train=True, img_size=m.img_size, batch_size=micro, rank=r, world_size=world, seed=cfg.train.seed
    )
    loader = make_loader(cfg.data.train, cfg.data, **kw)
    steps = total_steps(cfg, loader.num_samples)
    check_classes(cfg, loader.num_classes)
    seed_everything(cfg.train.seed)
    if model is None:
        model = build_model(m)
    model.to(device())
    engine, _, _ = build_engine(cfg, model, batch, steps)
    average = ParamAverage(engine, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    seed_everything(cfg.train.seed * 1000 + r + 1)  # dropout / drop path differ between ranks

    # ---- resume
    counters = resume(cfg, engine, run_dir, loader, average)
    log = open_metrics(cfg, run_dir, counters)
    flops = train_flops(model_dims(m), m.img_size, m.num_classes, m.pool != "avg")
    window = metrics.Window(world, loader.num_samples, flops, metrics.peak_tflops(cfg.logging.peak_tflops))

    def emit(record: dict) -> None:
        if log is not None:
            log.log(record)

    kw = dict(config=to_dict(cfg), keep_last=ck.keep_last, keep_every=ck.keep_every, background=ck.async_)
    saver = commit.Saver(engine, run_dir, **kw)

    def save(reason: str) -> float:
        """Checkpoint this step; returns how long a save that must commit before the run stops takes."""
        t0 = time.perf_counter()
        own = {"rng": commit.rng_state(), "data": loader.state_dict()}
        if average is not None:
            own[AVERAGE] = average.state_dict()
        saver.save(counters.step, asdict(counters), own)
        stall = time.perf_counter() - t0  # the loop waited this long; the files may still be being written
        record = {"step": counters.step, "checkpoint_s": stall, "checkpoint_reason": reason}
        emit(dict(record, checkpoint_async=saver.in_flight))
        return max(stall, saver.last_save_s)

    # ---- steps
    loss_fn, dtype = loss_function(cfg), model_dtype(cfg)
    mix = make_mixup(cfg.data.mixup, cfg.data.cutmix, m.num_classes, cfg.optim.label_smoothing)
    policy = CheckpointPolicy(ck.every_steps, ck.every_minutes, job_deadline(), counters.step)
    watch = PreemptionWatch()
    data_iter = iter(loader)
    progress = Progress(cfg.logging.progress and is_rank0(), steps, counters.step)
    engine.train()
    try:
        while counters.step < steps:
            t0 = time.perf_counter()
            batches = [next(data_iter) for _ in range(batch.grad_accum)]
            t_data = time.perf_counter() - t0
            lr = engine.get_lr()[0]  # the rate this step applies; the schedule moves on inside the step
            loss = train_step(engine, batches, loss_fn, dtype, mix)
            applied = engine.was_step_applied()
            counters.advance(applied, cfg.train.global_batch)
            if average is not None and applied:
                average.update()
            window.add(loss, time.perf_counter() - t0, t_data, lr)
            if counters.consecutive_skips >= cfg.train.max_consecutive_skips:
                raise TrainingHalted.after(counters.consecutive_skips, counters.step)
            if counters.step % cfg.logging.every_steps == 0 or counters.step == steps:
                emit(window.record(engine, counters.step, counters.samples, counters.skipped_steps))
            for figures in run_hooks(hooks, counters.step, engine, average, m):
                emit({"step": counters.step, **figures})
            progress.update(counters.step)
            if counters.step == steps:
                break  # done: the final save below, whatever was requested meanwhile
            near = policy.deadline_near(counters.step, window.step_s)
            due, stop = agree(policy.save_due(counters.step), watch.requested or near)
            if stop:
                if policy.unsaved(counters.step):
                    save("preempt")
                saver.wait()  # committed on every rank before the exit that asks for a requeue
                why = watch.reason or (DEADLINE_REASON if near else "requested")
                raise Preempted(f"stopped at step {counters.step} for requeue: {why}")
            if due:
                policy.saved(counters.step, save("interval"))
        if ck.save_final and policy.unsaved(counters.step):
            save("final")
        saver.wait()
    except TrainingHalted:
        saver.wait()  # every rank halts at the same step, so the save in flight can still commit
        raise
    except RuntimeError as e:
        if not PeerLost.matches(e):
            raise
        raise PeerLost.at_step(e, r, counters.step + 1, cfg.parallel.timeout_minutes) from None
    finally:
        data_iter.close()  # stops the DataLoader workers now, whether the loop ended or raised
        watch.restore()
        progress.close()
        if log is not None:
            log.close()
    return {
        "step": counters.step,
        "samples": counters.samples,
        "skipped_steps": counters.skipped_steps,
        "loss": window.last_loss,
        "images_per_s": window.last_images_per_s,
        "bad_samples": loader.bad_samples,
        "run_dir": str(run_dir),
        "model": evaluated_module(engine, average, m),  # what evaluation after training should score
    }
