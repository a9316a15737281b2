"""Bytes autograd keeps for backward, per micro batch, for our timm ViT and loss.

Counted op by op from what each op saves (`torch/csrc/autograd/derivatives.yaml`) in timm's Block:
LayerNorm saves its input and per-token mean and rstd; a Linear its input; scaled_dot_product_attention
(flash or memory-efficient kernel) q, k, v (views of the qkv output), its output and the per-head
log-sum-exp; GELU its input; dropout (p > 0) its mask; drop path its per-sample mask. Tensors that are
views of one storage count once, as the measurement (tests/dist) counts them.

One kernel fact differs between CUDA and the CPU the tests run on, and `device` selects it: CUDA saves
LayerNorm statistics in fp32 and dropout masks as bool (its fused dropout kernel); the CPU saves both in the
input dtype. Both return the attention output in (batch, tokens, heads, dim) layout, which the projection
reads without a copy.

Activation checkpointing (`vit_scale.train.engine.apply_activation_checkpointing`, non-reentrant) keeps
only the input of each checkpointed block; backward recomputes that block's saved tensors, one block at a
time.
"""

from __future__ import annotations

from dataclasses import dataclass

from vit_scale.config import Config
from vit_scale.models import model_dims
from vit_scale.plan.layout import Layout
from vit_scale.plan.zero import LOW_PRECISION_BYTES

FP32 = 4


@dataclass(frozen=True)
class Shape:
    batch: int
    tokens: int
    width: int
    mlp: int
    heads: int
    image: int
    classes: int
    lp: int
    dropout: bool
    drop_path: bool
    avg_pool: bool
    representation: int


def _shape(cfg: Config, micro_batch: int) -> Shape:
    m = cfg.model
    d = model_dims(m)
    avg = m.pool == "avg"
    return Shape(
        batch=micro_batch,
        tokens=(m.img_size // d["patch"]) ** 2 + (0 if avg else 1),
        width=d["width"],
        mlp=d["mlp"],
        heads=d["heads"],
        image=m.img_size,
        classes=m.num_classes,
        lp=LOW_PRECISION_BYTES[cfg.precision.dtype],
        dropout=m.dropout > 0,
        drop_path=m.drop_path > 0,
        avg_pool=avg,
        representation=m.representation_size or 0,
    )


def block_bytes(s: Shape, device: str = "cuda") -> int:
    """Saved bytes of one transformer block run without checkpointing (its input included)."""
    cpu = device == "cpu"
    bnc, bnm, bn = s.batch * s.tokens * s.width, s.batch * s.tokens * s.mlp, s.batch * s.tokens
    stat = s.lp if cpu else FP32
    mask = s.lp if cpu else 1
    lp_elements = (
        bnc  # norm1 input (the block input)
        + bnc  # norm1 output (qkv's input)
        + 3 * bnc  # qkv output (q, k, v views)
        + bnc  # attention output, whose (batch, tokens, heads, dim) layout the projection reads as a view
        + bnc  # norm2 input
        + bnc  # norm2 output (fc1's input)
        + bnm  # fc1 output (GELU's input)
        + bnm  # GELU output or dropout output (fc2's input)
    )
    total = s.lp * lp_elements + 2 * 2 * bn * stat + FP32 * s.batch * s.heads * s.tokens  # LN stats, log-sum-exp
    if s.dropout:
        total += mask * (bnc + bnm + bnc)  # after proj, after GELU, after fc2
    if s.drop_path:
        total += 2 * s.batch * s.lp  # one scale per sample, per residual branch
    return total


def saved_bytes(cfg: Config, lay: Layout, micro_batch: int, device: str = "cuda") -> dict[str, int]:
    """Saved activations per micro batch, by part: embedding, blocks, head and loss."""
    s = _shape(cfg, micro_batch)
    cpu = device == "cpu"
    bnc = s.batch * s.tokens * s.width
    mask = s.lp if cpu else 1
    stat = s.lp if cpu else FP32
    embed = s.lp * s.batch * 3 * s.image * s.image  # the patch convolution's input
    if s.dropout:
        embed += mask * bnc  # position-embedding dropout
    full, ckpt = block_bytes(s, device), s.lp * bnc
    blocks = sum(ckpt if i in lay.checkpointed else full for i in range(lay.depth))
    if s.avg_pool:
        # Mean over tokens saves nothing; fc_norm saves its (batch, width) input and output.
        head = s.lp * 2 * s.batch * s.width + 2 * s.batch * stat
    else:
        # Final norm: the last block's output and its own output (the head reads token 0 of it).
        head = s.lp * 2 * bnc + 2 * s.batch * s.tokens * stat
    if s.representation:
        head += s.lp * s.batch * s.representation  # tanh output, the classifier's input
    multi = cfg.data.labels == "multi" or cfg.optim.loss == "sigmoid"
    if multi and cfg.optim.loss != "softmax":
        loss = FP32 * 2 * s.batch * s.classes  # logits and targets in fp32
    else:
        loss = FP32 * s.batch * s.classes + 8 * s.batch + FP32  # log-softmax output, int64 targets
    return {"embedding": embed, "blocks": blocks, "head": head, "loss": loss}


def backward_working_bytes(cfg: Config, lay: Layout, micro_batch: int, device: str = "cuda") -> int:
    """What backward holds beyond the saved tensors at its busiest (an estimate, not a count): the
    recomputed block when checkpointing, plus gradients in flight through one block (two of the MLP's
    hidden width and two of the residual stream)."""
    s = _shape(cfg, micro_batch)
    recompute = block_bytes(s, device) - s.lp * s.batch * s.tokens * s.width if lay.checkpointed else 0
    return recompute + s.lp * s.batch * s.tokens * (2 * s.mlp + 2 * s.width)
