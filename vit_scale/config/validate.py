"""The one validation pass: every value range and every combination of settings, before any work starts.

Every command (and `vit-scale slurm --dry-run`, for the job's world size) calls `validate` once, before
it reads data or starts a process. It returns the resolved batch, which is passed on from there rather
than derived again. Each failure is a ConfigError naming the settings involved and what to change.
Allowed values of enumerated settings are typed in the schema (`Literal[...]`) and checked on loading.
"""

from __future__ import annotations

import dataclasses
import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vit_scale.config.loader import ConfigError
from vit_scale.config.schema import Config, TrainConfig
from vit_scale.config.tasks import VTAB_TASKS, canonical, refusal
from vit_scale.config.variants import VARIANTS, model_dims

Kind = Literal["pretrain", "finetune"]


@dataclass(frozen=True)
class Batch:
    """How `train.global_batch` splits over the launched processes."""

    micro_batch_per_rank: int
    grad_accum: int
    world_size: int


def resolve_batch(train: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro_batch_per_rank, grad_accum) such that micro × accum × world_size == global_batch."""
    g, micro, accum = train.global_batch, train.micro_batch_per_rank, train.grad_accum
    if g <= 0:
        raise ConfigError(f"train.global_batch must be positive, got {g}")
    if micro is not None and accum is not None:
        if micro * accum * world_size != g:
            raise ConfigError(
                f"train.global_batch={g} but train.micro_batch_per_rank={micro} × train.grad_accum={accum}"
                f" × world size {world_size} = {micro * accum * world_size}; change one of them"
            )
        return micro, accum
    if micro is not None:
        if g % (micro * world_size):
            raise ConfigError(
                f"train.global_batch={g} is not a multiple of train.micro_batch_per_rank={micro}"
                f" × world size {world_size}; change one of them"
            )
        return micro, g // (micro * world_size)
    accum = accum or 1
    if g % (accum * world_size):
        raise ConfigError(
            f"train.global_batch={g} is not divisible by train.grad_accum={accum} × world size {world_size};"
            " set train.micro_batch_per_rank or change the batch"
        )
    return g // (accum * world_size), accum


# ---------------------------------------------------------------- value ranges

# key: (lowest, highest, what the lowest means when it is a switch) — None: no bound on that side.
# A bound in a one-element tuple is exclusive. `None` values (unset optional settings) are not checked.
RANGES: dict[str, tuple] = {
    "model.num_classes": (1, None),
    "model.img_size": (1, None),
    "model.depth": (1, None),
    "model.width": (1, None),
    "model.mlp": (1, None),
    "model.heads": (1, None),
    "model.patch": (1, None),
    "model.representation_size": (1, None),
    "model.dropout": (0.0, (1.0,)),
    "model.drop_path": (0.0, (1.0,)),
    "data.workers": (0, None),
    "data.shuffle_buffer": (0, None),
    "data.crop_area_min": ((0.0,), 1.0),
    "data.mixup": (0.0, None),
    "data.cutmix": (0.0, None),
    "data.max_bad_fraction": (0.0, (1.0,)),
    "data.bad_window": (1, None),
    "optim.lr": ((0.0,), None),
    "optim.eps": ((0.0,), None),
    "optim.momentum": (0.0, (1.0,)),
    "optim.weight_decay": (0.0, None),
    "optim.grad_clip": (0.0, None, "off"),
    "optim.label_smoothing": (0.0, (1.0,)),
    "optim.ema_decay": (0.0, (1.0,), "off"),
    "schedule.warmup_steps": (0, None),
    "schedule.end_lr": (0.0, None),
    "train.steps": (1, None),
    "train.epochs": ((0.0,), None),
    "train.examples": (1, None),
    "train.global_batch": (1, None),
    "train.seed": (0, 2**31 - 1),  # the streams re-derive 31-bit seeds from it (train/loop.reseed_for)
    "train.micro_batch_per_rank": (1, None),
    "train.grad_accum": (1, None),
    "train.max_consecutive_skips": (1, None),
    "parallel.checkpoint_every_k_blocks": (1, None),
    "parallel.timeout_minutes": ((0.0,), None),
    "parallel.world_size": (1, None),
    "precision.initial_scale_power": (0, 32),
    "checkpoint.every_steps": (0, None, "off"),
    "checkpoint.every_minutes": (0.0, None, "off"),
    "checkpoint.keep_last": (1, None),
    "checkpoint.keep_every": (0, None, "off"),
    "logging.every_steps": (1, None),
    "logging.peak_tflops": ((0.0,), None),
    "eval.every_steps": (0, None, "off"),
    "eval.batch_size": (1, None),
    "eval.img_size": (1, None),
    "eval.fewshot_every_steps": (0, None, "off"),
    "eval.fewshot_seeds": (1, None),
    "eval.fewshot_l2": ((0.0,), None),
}
# Lists whose every element has the range of the key named.
ELEMENT_RANGES = {
    "optim.betas": (0.0, (1.0,)),
    "sweep.lr": ((0.0,), None),
    "eval.fewshot_shots": (1, None),
    "data.weights": (0.0, None),
}


def _get(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _bound_text(lo, hi, off: str | None) -> str:
    parts = []
    if lo is not None:
        parts.append(f"> {lo[0]}" if isinstance(lo, tuple) else f">= {lo}")
    if hi is not None:
        parts.append(f"< {hi[0]}" if isinstance(hi, tuple) else f"<= {hi}")
    text = " and ".join(parts)
    return f"{text} ({lo} turns it off)" if off else text


def _in_range(value, lo, hi) -> bool:
    if not math.isfinite(value):
        return False
    if lo is not None and (value <= lo[0] if isinstance(lo, tuple) else value < lo):
        return False
    return hi is None or (value < hi[0] if isinstance(hi, tuple) else value <= hi)


def check_ranges(cfg: Config) -> None:
    for key, (lo, hi, *off) in RANGES.items():
        value = _get(cfg, key)
        if value is not None and not _in_range(value, lo, hi):
            bounds = _bound_text(lo, hi, off[0] if off else None)
            raise ConfigError(f"{key}={value} must be a finite number {bounds}")
    for key, (lo, hi) in ELEMENT_RANGES.items():
        values = _get(cfg, key)
        if not all(_in_range(v, lo, hi) for v in values):
            raise ConfigError(f"{key}={values}: every value must be a finite number {_bound_text(lo, hi, None)}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas={cfg.optim.betas} must be two numbers, e.g. [0.9, 0.999]")


def _strings(obj, prefix: str = ""):
    """(dotted key, text) of every string setting, list elements included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _strings(value, f"{prefix}{f.name}.")
        elif isinstance(value, str):
            yield f"{prefix}{f.name}", value
        elif isinstance(value, list):
            yield from ((f"{prefix}{f.name}", v) for v in value if isinstance(v, str))


def check_text(cfg: Config) -> None:
    """String settings become paths, names, table cells and lines of job scripts: a control character (a
    newline, CR, NUL, an escape) in one would split or garble them, and text that is not UTF-8 cannot be
    written into config.yaml."""
    for key, value in _strings(cfg):
        bad = next((c for c in value if unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise ConfigError(f"{key}={value!r} holds the control character {bad!r}; remove it")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{key}={value!r} is not valid UTF-8 text") from None


# ---------------------------------------------------------------- combinations


def _check_model(cfg: Config) -> None:
    m = cfg.model
    if m.variant not in VARIANTS:
        raise ConfigError(
            f"model.variant={m.variant!r} is not a known variant; `vit-scale models` lists: {', '.join(VARIANTS)}"
        )
    dims = model_dims(m)
    patch = dims["patch"]
    if m.img_size < patch:
        raise ConfigError(
            f"model.img_size={m.img_size} is smaller than one {patch}-pixel patch; raise model.img_size"
        )
    if m.img_size % patch:
        raise ConfigError(
            f"model.img_size={m.img_size} is not divisible by the patch size {patch}; "
            f"use a multiple of {patch}, e.g. {m.img_size // patch * patch or patch}"
        )
    if dims["width"] % dims["heads"]:
        raise ConfigError(f"model width {dims['width']} is not divisible by {dims['heads']} heads")
    if cfg.eval.img_size is not None and cfg.eval.img_size % patch:
        raise ConfigError(f"eval.img_size={cfg.eval.img_size} is not a multiple of the patch size {patch}")


def _check_parallel(cfg: Config, world_size: int) -> None:
    p = cfg.parallel
    if p.offload_optimizer and p.zero_stage < 2:
        raise ConfigError(
            f"parallel.offload_optimizer needs ZeRO stage 2 or 3, but parallel.zero_stage={p.zero_stage}"
        )
    if p.offload_optimizer and cfg.optim.name != "adamw":
        raise ConfigError(
            f"parallel.offload_optimizer steps with DeepSpeed's CPU Adam only, but optim.name={cfg.optim.name}; "
            "use optim.name=adamw or set parallel.offload_optimizer=false"
        )
    if p.offload_params and p.zero_stage < 3:
        raise ConfigError(f"parallel.offload_params needs ZeRO stage 3, but parallel.zero_stage={p.zero_stage}")
    if p.world_size is not None and p.world_size != world_size:
        raise ConfigError(
            f"parallel.world_size={p.world_size} but {world_size} processes were launched; "
            "change the launch or the setting"
        )


def _check_data(cfg: Config, cuda: bool | None) -> None:
    sources = [s for s in cfg.data.train.split("::") if s.strip()] if cfg.data.train else []
    if cfg.data.weights and len(cfg.data.weights) != len(sources):
        raise ConfigError(
            f"data.weights has {len(cfg.data.weights)} values but data.train names {len(sources)} "
            "`::`-separated sources; give one weight per source"
        )
    if cfg.data.weights and sum(cfg.data.weights) <= 0:
        raise ConfigError(f"data.weights={cfg.data.weights} must have a positive sum")
    t = cfg.train
    lengths = [x for x in (t.steps, t.epochs, t.examples) if x is not None]
    if len(lengths) > 1:
        raise ConfigError("give only one of train.steps, train.epochs, train.examples")
    _check_randaugment(cfg.data.randaugment)
    if cfg.eval.every_steps > 0 and not cfg.data.val:
        raise ConfigError(f"eval.every_steps={cfg.eval.every_steps} scores data.val; set data.val=SHARDS")
    if cfg.data.decode == "gpu":
        if cuda is None:
            import torch  # only here: the rest of validation must stay cheap to import

            cuda = torch.cuda.is_available()
        if not cuda:
            raise ConfigError(
                "data.decode=gpu decodes with nvJPEG on a CUDA device, and none is visible; use data.decode=cpu"
            )
        if cfg.data.randaugment:
            raise ConfigError(
                f"data.randaugment={cfg.data.randaugment!r} runs on CPU images (PIL), which data.decode=gpu "
                "does not make; use data.decode=cpu or drop RandAugment"
            )


def _check_randaugment(spec: str) -> None:
    """The spec through the parser the data loader will use (timm's), so a typo stops the run now and not
    in the first batch of a loader worker."""
    if not spec:
        return
    from timm.data import rand_augment_transform

    try:
        rand_augment_transform(spec, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise ConfigError(
            f"data.randaugment={spec!r} is not a timm RandAugment spec ({e or 'it must start with rand-'}); "
            "e.g. rand-m9-mstd0.5"
        ) from None


def _index(source: str) -> dict:
    """A shard directory's index.json; {} when there is none (patterns, pipes) or it cannot be read."""
    index = Path(source) / "index.json"
    if not index.is_file():
        return {}
    try:
        found = json.loads(index.read_text())
    except (OSError, ValueError):
        return {}  # the data layer reports an unreadable index with its own message when it opens it
    return found if isinstance(found, dict) else {}


def index_classes(source: str) -> int:
    """Classes a shard directory's index.json declares; 0 when it cannot tell (patterns, pipes)."""
    try:
        return int(_index(source).get("num_classes") or 0)
    except (TypeError, ValueError):
        return 0


def index_task(source: str) -> str:
    """The task a shard directory's index.json records (`shards build --format vtab`); "" when none."""
    return str(_index(source.strip()).get("task") or "") if source.strip() else ""


def data_tasks(cfg: Config) -> list[str]:
    """The tasks the run's data belongs to: `data.task`, and each shard directory's recorded task."""
    sources = [*cfg.data.train.split("::"), cfg.data.val, cfg.data.test, cfg.sweep.final_train]
    found = [cfg.data.task] + [index_task(s) for s in sources]
    return list(dict.fromkeys(t for t in found if t))


def _check_augmentation(cfg: Config) -> None:
    d = cfg.data
    if d.randaugment and d.augment != "inception":
        raise ConfigError(
            f"data.randaugment={d.randaugment!r} applies to inception crops only, but "
            f"data.augment={d.augment}; set data.augment=inception or data.randaugment=''"
        )
    if d.task and canonical(d.task) not in VTAB_TASKS:
        raise ConfigError(
            f"data.task={d.task!r} is not a VTAB-1k task; leave it empty or name one of: "
            + ", ".join(VTAB_TASKS)
        )
    for task in data_tasks(cfg):
        why = refusal(task, d.augment, d.hflip, d.randaugment, d.eval_crop)
        if why:
            raise ConfigError(why)


def _check_finetune(cfg: Config) -> None:
    if not cfg.init:
        raise ConfigError(
            "fine-tuning needs starting weights: set init=PATH (checkpoint, export, .pth or .npz)"
        )
    if not Path(cfg.init).exists():
        raise ConfigError(
            f"init={cfg.init} does not exist; name a checkpoint or run dir, export, .pth or .npz"
        )
    if not cfg.data.train:
        raise ConfigError("fine-tuning needs data.train=SHARDS")
    if cfg.sweep.lr and not cfg.data.val:
        raise ConfigError("sweep.lr picks the best learning rate on data.val; set data.val=SHARDS")
    if cfg.sweep.lr and not cfg.data.test:
        raise ConfigError("after the sweep the final run is scored on data.test; set data.test=SHARDS")
    if not (cfg.data.test or cfg.data.val):
        raise ConfigError("nothing would score the fine-tuned model: set data.test=SHARDS (or data.val)")
    declared = index_classes(cfg.data.train)
    if declared and declared != cfg.model.num_classes:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but {cfg.data.train} has {declared} classes; "
            f"set model.num_classes={declared}"
        )


def validate(cfg: Config, world_size: int, kind: Kind = "pretrain", *, cuda: bool | None = None) -> Batch:
    """Raise ConfigError on a value out of range or an impossible or unsafe combination of settings for
    `world_size` processes; return how the global batch splits over them. `cuda`: whether the processes
    will have a CUDA device; None asks this machine (`vit-scale slurm` answers for the job's nodes)."""
    check_text(cfg)
    check_ranges(cfg)
    _check_model(cfg)
    _check_parallel(cfg, world_size)
    _check_data(cfg, cuda)
    _check_augmentation(cfg)
    if kind == "finetune":
        _check_finetune(cfg)
    batch = Batch(*resolve_batch(cfg.train, world_size), world_size=world_size)
    _check_mixing(cfg, batch)
    return batch


def _check_mixing(cfg: Config, batch: Batch) -> None:
    d = cfg.data
    if not (d.mixup or d.cutmix):
        return
    if d.labels == "multi" or cfg.optim.loss == "sigmoid":
        raise ConfigError(
            "data.mixup / data.cutmix mix single labels for the softmax loss; with data.labels=multi or "
            "optim.loss=sigmoid set both to 0"
        )
    if batch.micro_batch_per_rank % 2:
        raise ConfigError(
            f"data.mixup / data.cutmix pair the images of a micro batch, so it must be even, not "
            f"{batch.micro_batch_per_rank} per rank; change train.micro_batch_per_rank or train.global_batch"
        )
