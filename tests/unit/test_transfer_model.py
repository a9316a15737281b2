"""The model a fine-tune starts from: new zero head, interpolated position embeddings, body intact."""

from pathlib import Path

import numpy as np
import pytest
import torch
from transfer_helpers import official_npz_arrays

from vit_scale.checkpoint.weights import load_pretrained
from vit_scale.config import (
    ConfigError,
    load_config,
    validate,
)
from vit_scale.evaluate.finetune import build_transfer_model
from vit_scale.models import build_model, model_dims

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "finetune" / "cifar100_vit_b16.yaml"


@pytest.fixture
def npz(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(path, **official_npz_arrays(np.random.default_rng(0), img=32, classes=9, rep=16))
    return path


def test_zero_head_predicts_uniformly_at_step_0(npz):
    cfg = load_config(RECIPE, [f"init={npz}", "model.img_size=48"])
    model, _ = build_transfer_model(cfg)
    assert cfg.model.num_classes == 100 and cfg.model.representation_size is None
    assert model.head.weight.shape == (100, 32)  # pre-logits dropped: the head reads the width-32 token
    with torch.no_grad():
        probs = model.eval()(torch.randn(4, 3, 48, 48)).softmax(-1)
    assert torch.equal(probs, torch.full_like(probs, 1 / 100))


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_position_embeddings_equal_originals_at_original_size(npz, interp):
    source = load_pretrained(npz)
    cfg = load_config(RECIPE, [f"init={npz}", "model.img_size=32", f"model.pos_embed_interp={interp}"])
    model, _ = build_transfer_model(cfg)
    assert torch.equal(model.pos_embed.detach(), source.state_dict["pos_embed"])
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(v, source.state_dict[k]) for k, v in body.items())


def test_saved_config_rebuilds_the_finetuned_model(npz):
    cfg = load_config(RECIPE, [f"init={npz}", "model.img_size=64", "model.pos_embed_interp=bicubic"])
    model, _ = build_transfer_model(cfg)
    assert (model_dims(cfg.model)["width"], cfg.model.img_size) == (32, 64)
    rebuilt = build_model(cfg.model)
    rebuilt.load_state_dict(model.state_dict())  # strict: every shape agrees
    assert model.pos_embed.shape == (1, 1 + 64, 32)


def test_bad_finetune_configs_name_the_setting(tmp_path, npz):
    from transfer_helpers import write_class_shards

    data = write_class_shards(tmp_path / "d", num_classes=3, per_class=1)
    cases = [
        ([], "init=PATH"),
        ([f"init={tmp_path / 'nope.npz'}"], "does not exist"),
        ([f"init={npz}"], "data.train"),
        ([f"init={npz}", f"data.train={data}", "model.pos_embed_interp=nearest"], "pos_embed_interp"),
        ([f"init={npz}", f"data.train={data}", "sweep.lr=[]", "data.test=x"], "set model.num_classes=3"),
        ([f"init={npz}", f"data.train={data}", "model.num_classes=3", "sweep.lr=[0.01]"], "data.val"),
        ([f"init={npz}", f"data.train={data}", "model.num_classes=3", "sweep.lr=[]"], "data.test"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            validate(load_config(RECIPE, overrides), 1, "finetune")
    cfg = load_config(RECIPE, [f"init={npz}", "model.img_size=36"])
    with pytest.raises(ConfigError, match="model.img_size=36"):
        build_transfer_model(cfg)


def test_evaluation_copy_scores_like_the_model_and_draws_no_random_numbers(npz):
    from vit_scale.evaluate.common import plain_copy

    cfg = load_config(RECIPE, [f"init={npz}", "model.img_size=32"])
    model, _ = build_transfer_model(cfg)
    torch.nn.init.normal_(model.head.weight)  # a non-zero head, so the logits say something
    model.to(torch.bfloat16)  # as DeepSpeed leaves a bf16 module
    rng = torch.random.get_rng_state()
    copy = plain_copy(model, cfg.model, torch.device("cpu"), keep_head=True)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(p.dtype == torch.float32 for p in copy.parameters()) and not copy.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(copy(x), model.float().eval()(x))
