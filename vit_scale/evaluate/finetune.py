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

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

from vit_scale.config import Config, ConfigError, load_config, save_config
from vit_scale.dist import barrier, is_rank0, on_rank0
from vit_scale.errors import UserError
from vit_scale.evaluate.results import RESULTS, read_results, weights_label, write_results

INTERP = ("bilinear", "bicubic")


def _index_classes(source: str) -> int:
    """Classes a shard directory's index.json declares; 0 when it cannot tell (patterns, pipes)."""
    from vit_scale.data.shards import INDEX_NAME, read_index

    path = Path(source)
    if not (path / INDEX_NAME).is_file():
        return 0
    return int(read_index(path).get("num_classes") or 0)


def check_finetune_config(cfg: Config) -> None:
    """Refuse, before anything loads, a fine-tune that cannot run; say which setting to change."""
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
    if cfg.model.pos_embed_interp not in INTERP:
        raise ConfigError(
            f"model.pos_embed_interp must be one of {', '.join(INTERP)}; got {cfg.model.pos_embed_interp!r}"
        )
    if cfg.sweep.lr and not cfg.data.val:
        raise ConfigError("sweep.lr picks the best learning rate on data.val; set data.val=SHARDS")
    if cfg.sweep.lr and not cfg.data.test:
        raise ConfigError("after the sweep the final run is scored on data.test; set data.test=SHARDS")
    if not (cfg.data.test or cfg.data.val):
        raise ConfigError("nothing would score the fine-tuned model: set data.test=SHARDS (or data.val)")
    if any(lr <= 0 for lr in cfg.sweep.lr):
        raise ConfigError(f"sweep.lr values must be positive, got {cfg.sweep.lr}")
    if cfg.model.num_classes < 1:
        raise ConfigError("model.num_classes must be the number of classes of the new task")
    declared = _index_classes(cfg.data.train)
    if declared and declared != cfg.model.num_classes:
        raise ConfigError(
            f"model.num_classes={cfg.model.num_classes} but {cfg.data.train} has {declared} classes; "
            f"set model.num_classes={declared}"
        )
    if cfg.train.steps is not None and cfg.train.steps < 1:
        raise ConfigError(f"train.steps must be at least 1, got {cfg.train.steps}")


def build_transfer_model(cfg: Config):
    """The model to fine-tune: pretrained body, new zero head, resolution `cfg.model.img_size`.

    Rewrites `cfg.model` to describe that model exactly (dimensions from the weights, the new head
    and resolution), so the saved config rebuilds it from its checkpoints.
    """
    from vit_scale.models import reset_head, set_resolution
    from vit_scale.models.weights import build_pretrained, load_pretrained

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


def finetune_once(cfg: Config, run_dir: str | Path, eval_sources: dict[str, str]) -> dict:
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

    summary = train(cfg, run_dir, model=model, hooks=training_hooks(cfg))
    # After a resume that found the run finished, the module holds the final checkpoint's weights.
    scores = score(model, cfg, eval_sources, progress=cfg.logging.progress)
    out = {
        "lr": cfg.optim.lr,
        "steps": (summary or {}).get("step", cfg.train.steps),
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


def run_finetune(cfg: Config, run_dir: str | Path, label: str | None = None) -> dict:
    """The whole protocol: optional learning-rate sweep on data.val, final run scored on data.test."""
    check_finetune_config(cfg)
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
            res = finetune_once(c, run_dir / "sweep" / f"lr_{lr:g}", {"val": cfg.data.val})
            sweep.append({"lr": lr, "val": res["eval"]["val"]})
            if is_rank0():
                print(f"sweep lr={lr:g}: val top-1 {100 * _primary(res['eval']['val']):.2f}%")
        best = max(sweep, key=lambda s: _primary(s["val"]))  # ties: the first (smallest) rate of the grid
        final_cfg.optim.lr = best["lr"]
        final_cfg.data.train = cfg.sweep.final_train or cfg.data.train
        final = finetune_once(final_cfg, run_dir / "final", {"test": cfg.data.test})
    else:
        final = finetune_once(final_cfg, run_dir, {"val": cfg.data.val, "test": cfg.data.test})
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


def _primary(metrics: dict) -> float:
    return metrics.get("top1", metrics.get("prec1", 0.0))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vit-scale finetune",
        description="Fine-tune pretrained weights on a new task with the paper's recipe (Table 4). Resumes "
        "on its own from the run directory. Exit 0: done; 2: bad config or input; 75: checkpointed for "
        "preemption, requeue me.",
        epilog="example: vit-scale finetune configs/finetune/cifar100_vit_b16.yaml init=runs/pretrain "
        "data.train=shards/cifar100/train data.test=shards/cifar100/test train.steps=500",
    )
    parser.add_argument("config", help="a recipe, e.g. configs/finetune/cifar100_vit_b16.yaml")
    parser.add_argument(
        "overrides", nargs="*", help="section.key=value settings, e.g. init=PATH train.steps=N"
    )
    parser.add_argument("--run-dir", default=None, help="default: runs/<config name>")
    parser.add_argument(
        "--nproc", type=int, help="start this many local processes (not under torchrun / srun)"
    )
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or cfg.run.dir)
    return launch_or_run(
        "finetune",
        args,
        [args.config, *args.overrides, "--run-dir", str(run_dir)],
        lambda: check_finetune_config(cfg),
        lambda: _finetune_main(cfg, run_dir),
    )


def launch_or_run(command: str, args, rank_argv: list[str], check, body) -> int:
    """Start `--nproc` local ranks re-running `command` (after `check()` refused nothing), or run
    `body` in this process's rank.

    A preempted run has committed a checkpoint: exit with the requeue code so SLURM requeues it.
    """
    from launch import env

    if args.nproc is not None and not env.under_launcher():
        if args.nproc < 1:
            raise UserError(f"--nproc must be at least 1, got {args.nproc}")
        check()  # refuse before any process starts
        from launch.local import run

        return run(args.nproc, [command, *rank_argv])
    env.apply()
    from vit_scale.train.preempt import Preempted

    try:
        return body()
    except Preempted as e:
        on_rank0(print, f"vit-scale {command}: {e}")
        return e.exit_code


def _finetune_main(cfg: Config, run_dir: Path) -> int:
    results = run_finetune(cfg, run_dir)
    if is_rank0():
        (name, scores), *_ = results["datasets"].items()
        print(f"{name}: {results['metric']} {100 * _primary(scores):.2f}%; wrote {run_dir / RESULTS}")
    return 0
