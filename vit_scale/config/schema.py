"""The typed config tree. YAML files and `section.key=value` overrides only change these defaults.

Every field a recipe or a command line may set is declared here; anything else is an error.
Defaults follow the paper's pretraining recipe (Table 3) where one applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    variant: str = "vit_b16"  # a row of vit_scale.models.VARIANTS
    num_classes: int = 1000
    img_size: int = 224
    pool: Literal["token", "avg"] = "token"  # class token, or global average pooling
    representation_size: int | None = None  # pre-logits tanh layer (the paper's IN-21k pretraining)
    dropout: float = 0.0
    drop_path: float = 0.0
    pos_embed_interp: Literal["bilinear", "bicubic"] = "bilinear"  # fine-tuning at a new resolution (paper's code: bilinear)
    # Reduced-size overrides of the variant's row, for tests and tiny recipes.
    depth: int | None = None
    width: int | None = None
    mlp: int | None = None
    heads: int | None = None
    patch: int | None = None


@dataclass
class DataConfig:
    train: str = ""  # shard source: dir with index.json, .json shard list, pattern, pipe:..., or A::B mixture
    val: str = ""
    test: str = ""
    mode: Literal["exact", "resampled"] = "exact"  # exact: each sample once per epoch, resumable
    weights: list[float] = field(default_factory=list)  # one per `::`-separated source when mixing
    workers: int = 4  # DataLoader workers per rank
    # cpu: the workers decode, crop and resize (libjpeg-turbo, large crops at reduced scale); gpu: the workers
    # only read tars and JPEG headers, the rank decodes each batch with nvJPEG on its GPU (needs CUDA)
    decode: Literal["cpu", "gpu"] = "cpu"
    shuffle_buffer: int = 2000
    labels: Literal["int", "multi"] = "int"  # int: softmax; multi: multi-hot, sigmoid
    # Training input. inception: a random crop (area crop_area_min..1, aspect 3/4..4/3) resized to S x S, then
    # the flip (the paper's fine-tuning pipeline); resize: the whole image resized to S x S, nothing random
    # (the VTAB protocol); center: the shorter side resized to S, then the central S x S crop.
    augment: Literal["inception", "resize", "center"] = "inception"
    crop_area_min: float = 0.05
    hflip: bool = True  # with augment=inception: mirror half the crops
    # Evaluation input. none: the whole image resized to S x S (the paper's pipeline); center: the shorter
    # side resized to S, then the central S x S crop.
    eval_crop: Literal["none", "center"] = "none"
    # A VTAB-1k task name: the augmentations that change its labels are refused (config/tasks.py). Shards
    # built with `--format vtab` record their task in index.json, which validation reads as well.
    task: str = ""
    randaugment: str = ""  # timm RandAugment spec, e.g. "rand-m9-mstd0.5"
    # timm's batch Mixup / CutMix in training (DeiT: 0.8 / 1.0): Beta alphas, 0 is off; with both on,
    # each micro batch gets one of the two. Softmax loss on soft targets; optim.label_smoothing applies.
    mixup: float = 0.0
    cutmix: float = 0.0
    max_bad_fraction: float = 0.001  # stop when more than this fraction of a window of samples is corrupt
    bad_window: int = 10000


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"  # adamw: pretraining; sgd: fine-tuning (Table 4)
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 0.03
    grad_clip: float = 1.0  # global norm; 0 disables
    loss: Literal["auto", "softmax", "sigmoid"] = "auto"  # auto: sigmoid when data.labels is "multi"
    label_smoothing: float = 0.0
    # Polyak averaging of the parameters: after every applied step average = f * average + (1 - f) * params.
    # 0 turns it off; the paper's ImageNet fine-tunes use 0.9999. Evaluation and export use the average.
    ema_decay: float = 0.0


@dataclass
class ScheduleConfig:
    warmup_steps: int = 10000
    decay: Literal["linear", "cosine", "constant"] = "linear"
    end_lr: float = 0.0


@dataclass
class TrainConfig:
    steps: int | None = None  # length in optimizer steps; or give epochs / examples
    epochs: float | None = None
    examples: int | None = None
    global_batch: int = 4096
    micro_batch_per_rank: int | None = None  # derived from global_batch when not given
    grad_accum: int | None = None  # derived when not given
    seed: int = 0
    max_consecutive_skips: int = 10  # halt after this many non-finite steps in a row


@dataclass
class ParallelConfig:
    zero_stage: Literal[0, 1, 2, 3] = 1
    offload_optimizer: bool = False  # ZeRO stage >= 2
    offload_params: bool = False  # ZeRO stage 3
    activation_checkpointing: bool = False
    checkpoint_every_k_blocks: int = 1  # checkpoint every k-th block when activation checkpointing
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPU, gloo on CPU
    timeout_minutes: float = 5.0  # collective timeout: a dead rank ends the job instead of hanging
    compile: bool = False
    world_size: int | None = None  # when set, checked against the launched world before the first step


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"  # fp16 with dynamic loss scaling
    initial_scale_power: int = 16  # fp16 only


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # 0 disables step-based checkpoints
    every_minutes: float = 0.0  # 0 disables time-based checkpoints
    keep_last: int = 3
    keep_every: int = 0  # additionally keep every Nth step for good; 0 keeps none
    save_final: bool = True
    # Write in the background: training stops only while each rank copies its state into host memory
    # (one more host copy of the rank's share, kept between saves; a save that would not fit in half the
    # available memory is written in the foreground). false: training waits for the whole save.
    async_: bool = True  # the key checkpoint.async (`async` is a Python keyword)
    # What a resume checks, each rank the files it wrote: full (sha256 of every byte) or size (existence
    # and size only: cheaper for very large checkpoints, but blind to bytes changed in place).
    verify: Literal["full", "size"] = "full"


@dataclass
class LoggingConfig:
    every_steps: int = 10
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with credentials, else offline
    project: str = "vit-scale"
    entity: str = ""
    peak_tflops: float | None = None  # device peak for MFU; looked up from a table when not set
    progress: bool = True


@dataclass
class EvalConfig:
    every_steps: int = 0  # top-1/top-5 on data.val every N training steps, logged as val/...; 0: never
    batch_size: int = 256
    img_size: int | None = None  # defaults to model.img_size
    fewshot_every_steps: int = 0  # 0 disables few-shot evaluation during pretraining
    fewshot_train: str = ""  # shard source for few-shot representations
    fewshot_test: str = ""
    fewshot_shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])
    fewshot_seeds: int = 3
    fewshot_l2: float | None = None  # ridge penalty; None: leave-one-out within the shots (big_vision fixes 1024)
    vtab_data: str = ""  # VTAB-1k root holding <task>/<split>/ shard directories (`vit-scale vtab`)


@dataclass
class SweepConfig:
    lr: list[float] = field(default_factory=list)  # learning-rate grid for fine-tuning
    final_train: str = ""  # training source of the final run after the sweep (train + dev); default data.train


@dataclass
class RunConfig:
    name: str = ""  # defaults to the config file's name
    dir: str = ""  # defaults to runs/<name>


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    run: RunConfig = field(default_factory=RunConfig)
    init: str = ""  # fine-tuning: starting weights (checkpoint, safetensors, timm state dict, .npz)
    resume: str = ""  # a checkpoint to resume from; by default the run directory's latest committed one
