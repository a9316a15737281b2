"""`vit-scale export CKPT --out DIR [--dtype bf16]`: ZeRO shards of any stage -> a timm / HF Hub model folder.

DIR gets `config.json` (architecture, num_classes, model_args, pretrained_cfg) and `model.safetensors` in
timm's key layout, so `timm.create_model("local-dir:DIR", pretrained=True)` rebuilds the model with no
missing or unexpected keys, and the folder can be uploaded to the Hub as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vit_scale.checkpoint import commit
from vit_scale.checkpoint.average import read_average
from vit_scale.checkpoint.zero import consolidated_state_dict
from vit_scale.config import Config, from_dict
from vit_scale.errors import UserError
from vit_scale.io import atomic_write_bytes, atomic_write_json

TIMM_SIZE_NAMES = {"ti": "tiny", "s": "small", "b": "base", "l": "large", "h": "huge"}


def load_consolidated_state_dict(
    ckpt_path: str | Path, averaged: bool = True
) -> tuple[dict[str, torch.Tensor], Config]:
    """fp32 weights of a committed checkpoint (a run directory's newest, or the one named), with timm's
    parameter names, and the config it was trained with. Works for every ZeRO stage, on one process, and
    runs no code from the checkpoint's pickles (`checkpoint.zero`).

    A run trained with Polyak averaging (optim.ema_decay) gives its averaged weights unless `averaged` is
    false; the raw parameters are the ones training continues from."""
    chosen = commit.select(Path(ckpt_path))
    if chosen.path is None:
        notes = "; ".join(chosen.notes)
        raise UserError(f"{ckpt_path} holds no committed checkpoint{': ' + notes if notes else ''}")
    ckpt = chosen.path
    manifest = commit.read_manifest(ckpt)
    cfg = from_dict(manifest["config"])
    if averaged and (average := read_average(ckpt)) is not None:
        return average, cfg
    sd = consolidated_state_dict(ckpt, manifest["zero_stage"])
    return {k.removeprefix("module."): v.detach().float().contiguous() for k, v in sd.items()}, cfg


def timm_architecture(cfg: Config) -> str:
    """timm's registered name for the variant (model_args override its sizes with any reduced-size ones)."""
    from vit_scale.models import VARIANTS

    size = cfg.model.variant.removeprefix("vit_").rstrip("0123456789")
    return f"vit_{TIMM_SIZE_NAMES[size]}_patch{VARIANTS[cfg.model.variant]['patch']}_224"


def hub_config(cfg: Config) -> dict:
    from vit_scale.models import timm_kwargs

    m = cfg.model
    if m.representation_size:
        raise UserError(
            f"model.representation_size={m.representation_size}: timm's VisionTransformer has no pre-logits "
            "layer, so this model cannot be exported in timm's layout; fine-tune from the checkpoint itself "
            "(init=CKPT) instead"
        )
    args = timm_kwargs(m)
    num_classes = args.pop("num_classes")
    for training_only in ("pos_drop_rate", "proj_drop_rate", "drop_path_rate"):
        args.pop(training_only)
    return {
        "architecture": timm_architecture(cfg),
        "num_classes": num_classes,
        "num_features": args["embed_dim"],
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": {
            "tag": cfg.run.name or "vit-scale",
            "input_size": [3, m.img_size, m.img_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5],  # the trainer maps [0, 255] to [-1, 1]
            "std": [0.5, 0.5, 0.5],
            "num_classes": num_classes,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def export(ckpt_path: str | Path, out_dir: str | Path, dtype: str = "fp32", averaged: bool = True) -> Path:
    """Write the folder; a run trained with Polyak averaging exports its averaged weights unless `averaged`
    is false."""
    from safetensors.torch import save

    sd, cfg = load_consolidated_state_dict(ckpt_path, averaged)
    config = hub_config(cfg)
    if dtype == "bf16":
        sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    out = Path(out_dir)
    atomic_write_bytes(out / "model.safetensors", save(sd, metadata={"format": "pt"}))
    atomic_write_json(out / "config.json", config)
    return out
