"""Weight import: pretrained ViT weights from any supported source, as a timm-named state dict.

Sources, told apart by what is on disk:
- a committed pretrain checkpoint directory (any ZeRO stage), or a run directory (its latest one): the
  parameter average when the run kept one (optim.ema_decay), else the parameters;
- an exported safetensors file, or an export folder holding `model.safetensors`;
- timm weights on disk: a torch state dict (`.pth`, `.pt`, `.bin`) or a `.safetensors` file;
- the `.npz` layout of google-research/vision_transformer (the paper's released checkpoints).

Every source comes back as a `Pretrained`: the state dict under timm's parameter names plus the
architecture it describes, so the model can be rebuilt without guessing. It lives beside the checkpoint
code because it reads how runs are saved; `vit_scale.models` knows only the network.
"""

from __future__ import annotations

import dataclasses
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vit_scale.checkpoint import safe_load
from vit_scale.config.schema import ModelConfig
from vit_scale.errors import UserError
from vit_scale.models.vit import VARIANTS, ViT, build_model, grid_size

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@dataclass
class Pretrained:
    state_dict: dict[str, torch.Tensor]
    model: ModelConfig  # the architecture of these weights; img_size is their training resolution
    source: str  # "checkpoint", "safetensors", "timm" or "npz"
    path: str


# ---------------------------------------------------------------- the official .npz layout


def npz_to_state_dict(arrays) -> tuple[dict[str, torch.Tensor], int]:
    """timm-named tensors and the head count from google-research/vision_transformer arrays.

    Flax stores dense kernels as (in, out) and attention kernels split per head, (D, H, D/H) for
    q/k/v and (H, D/H, D) for the output; torch wants (out, in) with heads folded.
    """
    keys = set(arrays.keys())
    prefix = "opt/target/" if "opt/target/embedding/kernel" in keys else ""
    if prefix + "embedding/kernel" not in keys:
        if any("conv_root" in k or k.startswith(prefix + "block") for k in keys):
            raise UserError("the .npz holds a hybrid ResNet+ViT; only plain ViT checkpoints can be imported")
        raise UserError(
            "the .npz has no embedding/kernel: not a google-research/vision_transformer checkpoint"
        )
    if prefix + "cls" not in keys:
        raise UserError(
            "the .npz has no class token (a global-average-pooling model); only class-token ViTs can be "
            "imported, because flax normalises before pooling and timm after"
        )

    def get(name: str) -> torch.Tensor:
        try:
            return torch.from_numpy(np.array(arrays[prefix + name], dtype=np.float32))
        except KeyError:
            raise UserError(f"the .npz lacks {prefix + name}; the file is truncated or not a ViT") from None

    def dense(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return get(f"{name}/kernel").T.contiguous(), get(f"{name}/bias")

    sd = {
        "patch_embed.proj.weight": get("embedding/kernel").permute(3, 2, 0, 1).contiguous(),
        "patch_embed.proj.bias": get("embedding/bias"),
        "cls_token": get("cls"),
        "pos_embed": get("Transformer/posembed_input/pos_embedding"),
        "norm.weight": get("Transformer/encoder_norm/scale"),
        "norm.bias": get("Transformer/encoder_norm/bias"),
    }
    depth = sum(
        1
        for k in keys
        if k.startswith(prefix + "Transformer/encoderblock_") and k.endswith("LayerNorm_0/scale")
    )
    heads = 0
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        att = b + "MultiHeadDotProductAttention_1/"
        q, k, v = (get(f"{att}{n}/kernel") for n in ("query", "key", "value"))
        heads = q.shape[1]
        width = q.shape[0]
        sd[f"blocks.{i}.norm1.weight"] = get(b + "LayerNorm_0/scale")
        sd[f"blocks.{i}.norm1.bias"] = get(b + "LayerNorm_0/bias")
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([t.reshape(width, -1).T for t in (q, k, v)])
        sd[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
            [get(f"{att}{n}/bias").reshape(-1) for n in ("query", "key", "value")]
        )
        sd[f"blocks.{i}.attn.proj.weight"] = get(att + "out/kernel").reshape(-1, width).T.contiguous()
        sd[f"blocks.{i}.attn.proj.bias"] = get(att + "out/bias")
        sd[f"blocks.{i}.norm2.weight"] = get(b + "LayerNorm_2/scale")
        sd[f"blocks.{i}.norm2.bias"] = get(b + "LayerNorm_2/bias")
        for j, name in ((0, "fc1"), (1, "fc2")):
            w, bias = dense(f"{b}MlpBlock_3/Dense_{j}")
            sd[f"blocks.{i}.mlp.{name}.weight"], sd[f"blocks.{i}.mlp.{name}.bias"] = w, bias
    if prefix + "pre_logits/kernel" in keys:
        sd["pre_logits.fc.weight"], sd["pre_logits.fc.bias"] = dense("pre_logits")
    if prefix + "head/kernel" in keys:
        sd["head.weight"], sd["head.bias"] = dense("head")
    return sd, heads


# ---------------------------------------------------------------- architecture from shapes


def infer_model_config(
    sd: dict[str, torch.Tensor], heads: int | None = None, hint: ModelConfig | None = None
) -> ModelConfig:
    """The ModelConfig a timm-named ViT state dict describes.

    Depth, width, MLP, patch, pooling, pre-logits size, classes and resolution follow from the
    shapes; the head count does not, so it comes from the source (`heads`), else from `hint` when
    its width matches, else from the variants table row of that width.
    """
    if "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise UserError("the weights have no patch_embed.proj.weight / pos_embed: not a timm-style ViT")
    width, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    mlp = sd["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * width
    class_token = "cls_token" in sd
    prefix = int(class_token)
    img_size = grid_size(sd["pos_embed"].shape[1] - prefix) * patch
    rep = sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd else None
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    base = hint or ModelConfig()
    if heads is None:
        if hint is not None and _dims(hint)["width"] == width:
            heads = _dims(hint)["heads"]
        else:
            rows = {row["width"]: row["heads"] for row in VARIANTS.values()}
            if width not in rows:
                raise UserError(
                    f"cannot tell the number of attention heads of width-{width} weights; set model.heads"
                )
            heads = rows[width]
    variant = next(
        (name for name, r in VARIANTS.items() if r["width"] == width and r["patch"] == patch), base.variant
    )
    row = VARIANTS[variant]
    return dataclasses.replace(
        base,
        variant=variant,
        num_classes=num_classes,
        img_size=img_size,
        pool="token" if class_token else "avg",
        representation_size=rep,
        depth=None if depth == row["layers"] else depth,
        width=None if width == row["width"] else width,
        mlp=None if mlp == row["mlp"] else mlp,
        heads=None if heads == row["heads"] else heads,
        patch=None if patch == row["patch"] else patch,
    )


def _dims(m: ModelConfig) -> dict[str, int]:
    from vit_scale.models.vit import model_dims

    return model_dims(m)


# ---------------------------------------------------------------- reading each source


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a torch checkpoint file (timm saves it bare or under a key)."""
    for key in ("state_dict_ema", "state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


def _heads_from_meta(meta: dict) -> int | None:
    """The head count an exporter recorded: safetensors metadata or a timm/HF config.json."""
    for key in ("heads", "num_heads"):
        if key in meta:
            return int(meta[key])
    for key in ("model_args", "model"):
        sub = meta.get(key)
        if isinstance(sub, str):
            try:
                sub = json.loads(sub)
            except ValueError:
                continue
        if isinstance(sub, dict):
            found = _heads_from_meta(sub)
            if found is not None:
                return found
    return None


def _from_checkpoint(path: Path) -> Pretrained:
    """A committed checkpoint (newest under a run directory, or the one named), any ZeRO stage."""
    from vit_scale.checkpoint import load_consolidated_state_dict

    sd, cfg = load_consolidated_state_dict(path)
    heads = _dims(cfg.model)["heads"]
    return Pretrained(sd, infer_model_config(sd, heads=heads, hint=cfg.model), "checkpoint", str(path))


def _export_dir_file(path: Path) -> Path | None:
    for name in ("model.safetensors", "pytorch_model.bin", "model.pth"):
        if (path / name).is_file():
            return path / name
    return None


def load_pretrained(path: str | Path, hint: ModelConfig | None = None) -> Pretrained:
    """Read pretrained weights from `path`, whatever its kind; UserError when it is none of them."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights {path} do not exist")
    if not path.is_dir():
        return _load_file(path, hint)
    inner = _export_dir_file(path)
    if inner is None:
        if not (path / "checkpoints").is_dir() and (path / "final" / "checkpoints").is_dir():
            path = path / "final"  # a fine-tune with a learning-rate sweep: its final run
        return _from_checkpoint(path)
    meta: dict = {}
    if (path / "config.json").is_file():
        try:
            meta = json.loads((path / "config.json").read_text())
        except ValueError:
            raise UserError(f"{path / 'config.json'} is not valid JSON") from None
    return _load_file(inner, hint, heads=_heads_from_meta(meta))


def _load_file(path: Path, hint: ModelConfig | None, heads: int | None = None) -> Pretrained:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as arrays:
                sd, npz_heads = npz_to_state_dict(arrays)
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise UserError(f"{path} is not a readable .npz file ({e})") from None
        return Pretrained(sd, infer_model_config(sd, heads=npz_heads, hint=hint), "npz", str(path))
    if suffix == ".safetensors":
        sd, meta = _read_safetensors(path)
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        heads = heads if heads is not None else _heads_from_meta(meta)
        return Pretrained(sd, infer_model_config(sd, heads=heads, hint=hint), "safetensors", str(path))
    if suffix in TORCH_SUFFIXES:
        sd = _unwrap(safe_load.load(path, what="torch state dict"), path)
        return Pretrained(sd, infer_model_config(sd, heads=heads, hint=hint), "timm", str(path))
    raise UserError(
        f"do not know how to read weights {path}: give a checkpoint or run directory, an export folder, "
        f"a .safetensors, a torch state dict ({', '.join(TORCH_SUFFIXES)}) or an official .npz"
    )


def build_pretrained(pre: Pretrained) -> ViT:
    """The model the weights describe, with the weights loaded (every parameter must match)."""
    model = build_model(pre.model)
    try:
        missing, unexpected = model.load_state_dict(pre.state_dict, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise UserError(f"weights {pre.path} do not fit the model they describe: {str(e)[:300]}") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(sorted(missing)[:5])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(sorted(unexpected)[:5])}")
        raise UserError(f"weights {pre.path} do not fit a plain ViT ({'; '.join(parts)})")
    return model
