"""The model zoo: every variant builds and trains, full-size counts match the paper, FLOPs are right."""

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vit_scale.config.schema import ModelConfig
from vit_scale.models import (
    VARIANTS,
    build_model,
    count_params,
    forward_flops,
    model_dims,
    resample_pos_embed,
    reset_head,
    set_resolution,
)

PAPER_TABLE_1 = {  # layers, width, MLP, heads
    "vit_b16": (12, 768, 3072, 12),
    "vit_l16": (24, 1024, 4096, 16),
    "vit_h14": (32, 1280, 5120, 16),
}
REFERENCE_PARAMS = {"vit_b16": 85.8e6, "vit_l16": 303.3e6, "vit_h14": 630.8e6}  # without head
REFERENCE_TRAIN_GFLOPS = {"vit_b16": 105.4, "vit_l16": 369.3, "vit_h14": 1003.8}


def small(variant: str, **kw) -> ModelConfig:
    patch = VARIANTS[variant]["patch"]
    return ModelConfig(variant=variant, num_classes=7, img_size=patch * 3, depth=2, width=32, mlp=64, heads=2, **kw)


def test_table_1_rows():
    for name, (layers, width, mlp, heads) in PAPER_TABLE_1.items():
        row = VARIANTS[name]
        assert (row["layers"], row["width"], row["mlp"], row["heads"]) == (layers, width, mlp, heads)
    assert {"vit_ti16", "vit_s16", "vit_b16", "vit_b32", "vit_l16", "vit_l32", "vit_h14"} <= set(VARIANTS)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("pool, rep", [("token", None), ("avg", 16)])
def test_every_variant_builds_and_gets_gradients(variant, pool, rep):
    torch.manual_seed(0)
    model = build_model(small(variant, pool=pool, representation_size=rep, dropout=0.1, drop_path=0.1))
    x = torch.randn(2, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1])
    logits = model(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    logits.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert (pool == "avg") == (model.cls_token is None)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_full_size_param_counts_match_paper(name):
    params = count_params(ModelConfig(variant=name, num_classes=0))
    assert abs(params - REFERENCE_PARAMS[name]) / REFERENCE_PARAMS[name] < 0.005


@pytest.mark.parametrize("name", sorted(REFERENCE_TRAIN_GFLOPS))
def test_analytic_training_flops_match_reference(name):
    gflops = 3 * forward_flops(VARIANTS[name], 224) / 1e9
    assert abs(gflops - REFERENCE_TRAIN_GFLOPS[name]) / REFERENCE_TRAIN_GFLOPS[name] < 0.002


def test_analytic_flops_match_flop_counter():
    cfg = ModelConfig(variant="vit_s16", num_classes=10, img_size=64, depth=3)
    model = build_model(cfg).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    analytic = forward_flops(model_dims(cfg), 64, num_classes=10)
    assert abs(analytic - counter.get_total_flops()) / counter.get_total_flops() < 0.05


def test_pos_embed_unchanged_at_same_grid():
    pe = torch.randn(1, 1 + 14 * 14, 8)
    assert torch.equal(resample_pos_embed(pe, 14), pe)


def reference_bilinear(grid: torch.Tensor, out: int) -> torch.Tensor:
    """Half-pixel-centre bilinear resize of a (G, G, D) grid, written out by hand."""
    g = grid.shape[0]
    result = torch.empty(out, out, grid.shape[2], dtype=torch.float64)
    for i in range(out):
        for j in range(out):
            y = min(max((i + 0.5) * g / out - 0.5, 0), g - 1)
            x = min(max((j + 0.5) * g / out - 0.5, 0), g - 1)
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, g - 1), min(x0 + 1, g - 1)
            wy, wx = y - y0, x - x0
            result[i, j] = (
                (1 - wy) * (1 - wx) * grid[y0, x0] + (1 - wy) * wx * grid[y0, x1]
                + wy * (1 - wx) * grid[y1, x0] + wy * wx * grid[y1, x1]
            )
    return result


def test_pos_embed_interpolation_matches_reference_bilinear():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 4 * 4, 3, dtype=torch.float64)
    new = resample_pos_embed(pe, 6)
    assert new.shape == (1, 1 + 36, 3)
    assert torch.equal(new[:, :1], pe[:, :1])  # class token kept as is
    expected = reference_bilinear(pe[0, 1:].reshape(4, 4, 3), 6).reshape(1, 36, 3)
    torch.testing.assert_close(new[:, 1:], expected, rtol=0, atol=1e-12)


def test_set_resolution_and_zero_head():
    torch.manual_seed(0)
    model = build_model(small("vit_b16", representation_size=16)).eval()
    before = model.pos_embed.detach().clone()
    set_resolution(model, 16 * 5)
    reset_head(model, 4)
    assert model.pos_embed.shape == (1, 1 + 25, 32)
    assert torch.equal(model.pos_embed[:, :1], before[:, :1])
    logits = model(torch.randn(3, 3, 80, 80))
    assert torch.equal(logits, torch.zeros(3, 4))  # zero head: uniform prediction at step 0
    assert "pre_logits.fc.weight" not in model.state_dict()  # dropped on transfer, as in the paper


def test_models_command_json():
    out = subprocess.run([sys.executable, "-m", "vit_scale.cli", "models", "--json"],
                         capture_output=True, text=True, check=True).stdout
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows["vit_b16"]) == {"name", "layers", "width", "mlp", "heads", "patch", "params", "train_gflops_224"}
    assert rows["vit_l16"]["train_gflops_224"] == 369.3
    assert rows["vit_h14"]["params"] == count_params(ModelConfig(variant="vit_h14", num_classes=0))
