"""Training metrics: throughput and MFU from the analytic FLOPs, metrics.jsonl, and the wandb run.

Everything here runs on rank 0 only (the loop calls it through `on_rank0`); metrics.jsonl is the
source every plot and dashboard reads, so wandb gets exactly the same records.
"""

from __future__ import annotations

import json
import netrc
import os
import resource
import sys
from pathlib import Path

import torch

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
