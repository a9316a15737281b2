"""`vit-scale finetune CONFIG [key=value ...]`: the paper's transfer recipe (Table 4, Appendix B.1.1).

Starting weights (`init=PATH`: a pretrain checkpoint or run directory, an export, timm weights or an
official .npz) lose their pre-logits layer and head; a zero-initialised head for the new classes
takes their place, and the position embeddings are 2D-interpolated to `model.img_size`. Training is
the pretraining loop itself (`vit_scale.train.loop.train`): same engine, metrics and committed
checkpoints, so a killed fine-tune resumes where it stopped when the same command runs again.

With `sweep.lr=[...]` every learning rate trains on `data.train` and is scored on `data.val`; the
best one retrains on `sweep.final_train` (train + dev; `data.train` when empty) and that run is
scored on `data.test`. Layout of the run directory:

    RUN/config.yaml, RUN/results.json, RUN/results.md
    RUN/sweep/lr_0.003/...   one complete training run per learning rate (with a sweep)
    RUN/final/...            the final run (with a sweep); without one, RUN itself is the run
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

from vit_scale.config import Batch, Config, ConfigError, save_config
from vit_scale.dist import barrier, is_rank0, on_rank0
from vit_scale.observe.results import RESULTS, read_results, weights_label, write_results


def build_transfer_model(cfg: Config):
    """The model to fine-tune: pretrained body, new zero head, resolution `cfg.model.img_size`.

    Rewrites `cfg.model` to describe that model exactly (dimensions from the weights, the new head
    and resolution), so the saved config rebuilds it from its checkpoints.
    """
    from vit_scale.checkpoint.weights import build_pretrained, load_pretrained
    from vit_scale.models import reset_head, set_resolution

    wanted = cfg.model
    pre = load_pretrained(cfg.init, hint=wanted)
    pre.model = dataclasses.replace(pre.model, dropout=wanted.dropout, drop_path=wanted.drop_path)
    model = build_pretrained(pre)
    reset_head(model, wanted.num_classes)
    try:
        set_resolution(model, wanted.img_size, wanted.pos_embed_interp)
    except ValueError as e:
        raise ConfigError(f"model.img_size={wanted.img_size}: {e}") from None
    cfg.model = dataclasses.replace(
        pre.model,
        num_classes=wanted.num_classes,
        img_size=wanted.img_size,
        representation_size=None,
        pos_embed_interp=wanted.pos_embed_interp,
    )
    return model, pre


def finetune_once(cfg: Config, run_dir: str | Path, eval_sources: dict[str, str], batch: Batch) -> dict:
    """Train one fine-tune in `run_dir` (resuming it if it was cut short) and score it.

    Returns {"lr", "steps", "eval": {split: metrics}}; a run that already finished is not redone.
    """
    run_dir = Path(run_dir)
    done = run_dir / "run.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = copy.deepcopy(cfg)
    cfg.run.dir = str(run_dir)
    cfg.checkpoint.save_final = True  # a finished run must be resumable into its final weights
    model, pre = build_transfer_model(cfg)
    on_rank0(save_config, cfg, run_dir / "config.yaml")  # describes the fine-tuned model exactly
    from vit_scale.evaluate.classify import score
    from vit_scale.evaluate.hooks import training_hooks
    from vit_scale.train.loop import train

    summary = train(cfg, run_dir, batch, model=model, hooks=training_hooks(cfg))
    # The trained module, or the parameter average with optim.ema_decay; after a resume that found the run
    # finished, they hold the final checkpoint's weights.
    scores = score(summary["model"], cfg, eval_sources, progress=cfg.logging.progress)
    out = {
        "lr": cfg.optim.lr,
        "steps": summary["step"],
        "init": {"path": pre.path, "source": pre.source, "img_size": pre.model.img_size},
        "eval": scores,
    }
    from vit_scale.io import atomic_write_json

    on_rank0(atomic_write_json, done, out)
    barrier()
    return out


def _warmup_fits(cfg: Config) -> None:
    """`train.steps=N` shortens a recipe: keep its warmup the same fraction short of the whole run."""
    steps = cfg.train.steps
    if steps is not None and cfg.schedule.warmup_steps >= steps:
        on_rank0(
            print,
            f"vit-scale: schedule.warmup_steps={cfg.schedule.warmup_steps} is not shorter than train.steps={steps}; "
            f"warming up for {steps // 10} steps instead",
            file=sys.stderr,
        )
        cfg.schedule.warmup_steps = steps // 10


def run_finetune(cfg: Config, run_dir: str | Path, batch: Batch, label: str | None = None) -> dict:
    """The whole protocol: optional learning-rate sweep on data.val, final run scored on data.test.

    `cfg` has passed `validate(cfg, world_size, "finetune")`, which returned `batch`."""
    _warmup_fits(cfg)
    run_dir = Path(run_dir)
    if (run_dir / RESULTS).is_file():
        return read_results(run_dir)
    on_rank0(save_config, cfg, run_dir / "config.yaml")
    sweep: list[dict] = []
    final_cfg = copy.deepcopy(cfg)
    if cfg.sweep.lr:
        for lr in cfg.sweep.lr:
            c = copy.deepcopy(cfg)
            c.optim.lr = lr
            res = finetune_once(c, run_dir / "sweep" / f"lr_{lr:g}", {"val": cfg.data.val}, batch)
            sweep.append({"lr": lr, "val": res["eval"]["val"]})
            if is_rank0():
                print(f"sweep lr={lr:g}: val top-1 {100 * primary_metric(res['eval']['val']):.2f}%")
        best = max(sweep, key=lambda s: primary_metric(s["val"]))  # ties: the first (smallest) rate of the grid
        final_cfg.optim.lr = best["lr"]
        final_cfg.data.train = cfg.sweep.final_train or cfg.data.train
        final = finetune_once(final_cfg, run_dir / "final", {"test": cfg.data.test}, batch)
    else:
        final = finetune_once(final_cfg, run_dir, {"val": cfg.data.val, "test": cfg.data.test}, batch)
    from vit_scale.evaluate.common import dataset_name

    split = "test" if final["eval"].get("test") else "val"
    scored = final["eval"][split]
    name = dataset_name(getattr(cfg.data, split))
    results = {
        "kind": "finetune",
        "model": label or weights_label(cfg.init),
        "metric": "prec1" if "prec1" in scored else "top1",
        "datasets": {name: scored},
        "details": {
            "init": final["init"],
            "img_size": cfg.model.img_size,
            "lr": final["lr"],
            "steps": final["steps"],
            "split": split,
            "sweep": sweep,
            "val": final["eval"].get("val") if not sweep else None,
        },
    }
    on_rank0(write_results, run_dir, results)
    barrier()
    return results


def primary_metric(metrics: dict) -> float:
    return metrics.get("top1", metrics.get("prec1", 0.0))
