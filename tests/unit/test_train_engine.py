"""The pieces of the engine that need no process group: schedule, DeepSpeed config, run length, losses."""

from __future__ import annotations

import math

import pytest
import torch

from vit_scale.config import ConfigError, load_config, validate
from vit_scale.data.transforms import to_model_input
from vit_scale.train.engine import deepspeed_config, lr_multiplier, param_groups
from vit_scale.train.loop import loss_function, total_steps


def test_warmup_then_linear_decay_to_zero():
    f = [lr_multiplier(s, total_steps=10, warmup_steps=4, decay="linear", end_ratio=0.0) for s in range(10)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[7] == pytest.approx(0.5) and f[9] == pytest.approx(1 / 6)
    assert all(a >= b for a, b in zip(f[3:], f[4:]))


def test_cosine_ends_at_end_lr():
    f = [lr_multiplier(s, total_steps=101, warmup_steps=1, decay="cosine", end_ratio=0.1) for s in range(102)]
    assert f[1] == 1.0 and f[51] == pytest.approx(0.55) and f[101] == pytest.approx(0.1)


def test_deepspeed_config_follows_the_config_tree():
    cfg = load_config(
        None,
        [
            "train.global_batch=64",
            "train.micro_batch_per_rank=8",
            "parallel.zero_stage=3",
            "parallel.offload_optimizer=true",
            "parallel.offload_params=true",
            "precision.dtype=fp16",
            "optim.grad_clip=0.5",
        ],
    )
    ds = deepspeed_config(cfg, validate(cfg, 2))
    assert ds["train_batch_size"] == 64
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2 == 64
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic scaling
    assert "bf16" not in ds and ds["gradient_clipping"] == 0.5


def test_plain_fp32_stage0_clips_in_our_guard_not_in_deepspeed():
    cfg = load_config(None, ["parallel.zero_stage=0", "precision.dtype=fp32", "train.global_batch=8"])
    assert deepspeed_config(cfg, validate(cfg, 1))["gradient_clipping"] == 0.0
    with pytest.raises(ConfigError, match="train.global_batch=8 is not a multiple"):
        validate(load_config(None, ["train.global_batch=8", "train.micro_batch_per_rank=3"]), 1)


def test_run_length_from_epochs_or_examples():
    cfg = load_config(None, ["train.epochs=2.5", "train.global_batch=100"])
    assert total_steps(cfg, num_samples=1000) == 25
    cfg = load_config(None, ["train.examples=1050", "train.global_batch=100"])
    assert total_steps(cfg, num_samples=-1) == 11
    with pytest.raises(ConfigError, match="index.json"):
        total_steps(load_config(None, ["train.epochs=1"]), num_samples=-1)


def test_no_weight_decay_on_biases_norms_and_embeddings():
    from vit_scale.models import build_model

    model = build_model(
        load_config(None, ["model.width=16", "model.depth=1", "model.heads=2", "model.mlp=32"]).model
    )
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "pos_embed",
        "cls_token",
        "norm.weight",
        "head.bias",
    }
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"]) and decay["weight_decay"] == 0.1


def test_losses_and_normalisation():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    softmax = loss_function(load_config(None, []))
    assert softmax(logits, torch.tensor([0])).item() == pytest.approx(
        -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
    )
    sigmoid = loss_function(load_config(None, ["data.labels=multi"]))
    want = sum(
        math.log1p(math.exp(-z)) if y else math.log1p(math.exp(z))
        for z, y in zip([2.0, 0.0, -1.0], [1, 0, 1])
    )
    assert sigmoid(logits, torch.tensor([[1.0, 0.0, 1.0]])).item() == pytest.approx(want)
    x = to_model_input(torch.tensor([0, 255], dtype=torch.uint8), torch.float32)
    assert x.tolist() == [-1.0, 1.0]


def test_mixing_trains_on_soft_targets_with_the_softmax_loss():
    """With data.mixup / data.cutmix the targets arrive as class distributions (mixed and smoothed by timm's
    Mixup), and the loss is their cross-entropy with the softmax of the logits."""
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    target = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])
    soft = loss_function(load_config(None, ["data.mixup=0.8", "optim.label_smoothing=0.1"]))
    want = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert soft(logits, target).item() == pytest.approx(want.item())


def test_plain_optimizer_guard_skips_non_finite_steps_and_clips_finite_ones():
    from vit_scale.train.engine import NonFiniteGuard, build_schedule

    cfg = load_config(None, ["schedule.warmup_steps=0", "train.steps=10"])
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    build_schedule(cfg, opt, 10)
    guard = NonFiniteGuard(opt, clip=1.0)
    w.grad = torch.tensor([float("nan"), 0.0])
    opt.step()
    assert guard.overflow and opt.overflow and w.tolist() == [1.0, 2.0]
    w.grad = torch.tensor([3.0, 4.0])  # norm 5, clipped to 1
    opt.step()
    assert not opt.overflow and opt._global_grad_norm == pytest.approx(5.0)
    assert w.tolist() == pytest.approx([1.0 - 0.6, 2.0 - 0.8])


def test_activation_checkpointing_every_kth_block_recomputes_only_those_and_keeps_the_gradients():
    """k=2 on 5 blocks wraps blocks 0, 2 and 4: those run their forward twice (once more in backward),
    the others once, and loss and gradients are bit-identical to the model without checkpointing,
    dropout and drop path included (the recomputation restores the RNG state)."""
    from vit_scale.config.schema import ModelConfig
    from vit_scale.models import build_model
    from vit_scale.train.engine import apply_activation_checkpointing

    cfg = ModelConfig(
        variant="vit_ti16",
        num_classes=3,
        img_size=16,
        patch=8,
        depth=5,
        width=32,
        mlp=64,
        heads=2,
        dropout=0.1,
        drop_path=0.1,
    )
    x, y = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])

    def loss_and_grads(model):
        torch.manual_seed(7)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(0)
    plain = build_model(cfg).train()
    torch.manual_seed(0)
    wrapped = build_model(cfg).train()
    assert apply_activation_checkpointing(wrapped, every_k=2) == 3
    calls = [0] * len(wrapped.blocks)
    for i, block in enumerate(wrapped.blocks):
        # on a submodule: the recomputation calls the block's original forward, not the block itself
        block.norm1.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    want_loss, want_grads = loss_and_grads(plain)
    got_loss, got_grads = loss_and_grads(wrapped)
    assert calls == [2, 1, 2, 1, 2]
    assert torch.equal(got_loss, want_loss)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))


def test_only_communication_failures_are_reported_as_a_lost_peer():
    """A real gloo timeout (a 1-rank group cannot time out, so a 2-rank store wait stands in for it)
    counts as a lost peer; a timeout from anything else (a shard fetched over http) does not."""
    from datetime import timedelta

    import torch.distributed as dist

    from vit_scale.train.loop import PeerLost

    store = dist.TCPStore(
        "127.0.0.1", 0, world_size=2, is_master=True, timeout=timedelta(seconds=0.2), wait_for_workers=False
    )
    with pytest.raises(RuntimeError) as waited:
        store.get("never-set")  # the other member never comes
    assert PeerLost.matches(waited.value), str(waited.value)
    assert not PeerLost.matches(RuntimeError("http://data/shard-000001.tar: read timed out"))
    assert not PeerLost.matches(ValueError("gloo timed out"))  # only backend errors, which are RuntimeErrors
