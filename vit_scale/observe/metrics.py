"""Training metrics: the per-window figures, throughput and MFU from the analytic FLOPs, metrics.jsonl,
and the wandb run.

`Window` runs on every rank (its loss is averaged across them); `MetricsLog` on rank 0 only.
metrics.jsonl is the source every plot and dashboard reads, so wandb gets exactly the same records.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vit_scale.dist import is_multi_rank

# Dense bf16 peak TFLOP/s per device, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}

# The names logged at every logging step (also listed in docs/architecture.md for the report).
METRIC_NAMES = (
    "step",
    "epoch",
    "samples",
    "loss",
    "lr",
    "grad_norm",
    "loss_scale",
    "skipped_steps",
    "images_per_s",
    "images_per_s_per_rank",
    "data_wait_frac",
    "tflops_per_device",
    "mfu",
    "peak_mem_gb",
)


def peak_tflops(override: float | None = None) -> float | None:
    """The device's peak for MFU: the config's value, else the table's row for this GPU, else unknown."""
    if override is not None:
        return override
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def peak_memory_gb() -> float:
    """Peak memory of this process: allocated GPU memory, or the resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform != "darwin" else kib / 2**30


def throughput(
    images: int, seconds: float, data_seconds: float, world: int, flops_per_image: float, peak: float | None
) -> dict:
    """Images/s (global and per rank), data-wait fraction, model TFLOP/s per device and MFU."""
    ips = images / seconds if seconds > 0 else 0.0
    tflops = ips / world * flops_per_image / 1e12
    return {
        "images_per_s": ips,
        "images_per_s_per_rank": ips / world,
        "data_wait_frac": data_seconds / seconds if seconds > 0 else 0.0,
        "tflops_per_device": tflops,
        "mfu": tflops / peak if peak else None,
    }


class Window:
    """Per-step figures since the last logging step; losses stay on the device until they are logged."""

    def __init__(self, world: int, num_samples: int, flops_per_image: float, peak: float | None):
        self.world, self.num_samples = world, num_samples
        self.flops_per_image, self.peak = flops_per_image, peak
        self.losses: list[torch.Tensor] = []
        self.seconds = 0.0
        self.data_seconds = 0.0
        self.lr = 0.0
        self.last_loss: float | None = None
        self.last_images_per_s: float | None = None
        self.step_s = 0.0  # mean step time of the last logged window; 0 before the first

    def add(self, loss: torch.Tensor, seconds: float, data_seconds: float, lr: float) -> None:
        self.losses.append(loss)
        self.lr = lr
        self.seconds += seconds
        self.data_seconds += data_seconds

    def record(self, engine, step: int, samples: int, skipped_steps: int) -> dict:
        """The logging record of the window (named as METRIC_NAMES) from the DeepSpeed `engine`, on every
        rank (the loss is all-reduced); starts the next window."""
        steps = len(self.losses)
        local = torch.stack(self.losses).float()
        if is_multi_rank():
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
            local /= self.world
        finite = [v for v in local.tolist() if math.isfinite(v)]
        loss = sum(finite) / len(finite) if finite else None
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None and math.isfinite(float(grad_norm)) else None
        images = steps * engine.train_batch_size()
        rec = {
            "step": step,
            "epoch": samples / self.num_samples if self.num_samples > 0 else None,
            "samples": samples,
            "loss": loss,
            "lr": self.lr,
            "grad_norm": grad_norm,
            "loss_scale": float(getattr(engine.optimizer, "cur_scale", 1.0)),
            "skipped_steps": skipped_steps,
            **throughput(
                images, self.seconds, self.data_seconds, self.world, self.flops_per_image, self.peak
            ),
            "peak_mem_gb": peak_memory_gb(),
        }
        self.last_loss, self.last_images_per_s, self.step_s = loss, rec["images_per_s"], self.seconds / steps
        self.losses, self.seconds, self.data_seconds = [], 0.0, 0.0
        return rec


def wandb_mode(setting: str) -> str:
    """The mode for "auto": online only when credentials exist, so runs without a login never block on a prompt."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


class MetricsLog:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl and mirrors it to wandb."""

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        *,
        wandb_setting: str,
        project: str,
        entity: str,
        run_name: str,
        run_id: str | None,
        job_ids: list[str],
        resume_step: int,
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_rewound(resume_step)
        self.run = None
        self.run_id = run_id
        mode = wandb_mode(wandb_setting)
        if mode != "disabled":
            self.run = self._start_wandb(
                Path(run_dir), config, mode, project, entity, run_name, run_id, job_ids
            )
            self.run_id = self.run.id

    def _drop_rewound(self, resume_step: int) -> None:
        """After a resume from step S, records past S came from the lost steps: drop them so the file has
        each step once, in order, as if the run had never stopped."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line torn by the kill
            if rec.get("step", 0) <= resume_step:
                kept.append(line)
        from vit_scale.io import atomic_write_text

        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    @staticmethod
    def _start_wandb(run_dir, config, mode, project, entity, run_name, run_id, job_ids):
        import wandb

        run = wandb.init(
            project=project,
            entity=entity or None,
            name=run_name,
            id=run_id,  # None: wandb picks one, which the checkpoints then carry
            resume="allow",
            dir=str(run_dir),
            mode=mode,
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )
        if job_ids:  # the chain of SLURM jobs (requeues) this run has lived in, kept by the checkpoints
            run.config.update({"slurm_job_ids": list(job_ids)}, allow_val_change=True)
        return run

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.run is not None:
            self.run.log(
                {k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"]
            )

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
