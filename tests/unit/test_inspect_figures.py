"""`vit-scale inspect`: position-embedding similarity, attention distance and rollout, checked by hand."""

import glob
import os

import pytest
import sklearn
import torch
from PIL import Image
from safetensors.torch import save_file

from vit_scale.cli import main as cli_main
from vit_scale.commands import inspect as inspect_command
from vit_scale.config.schema import ModelConfig
from vit_scale.errors import UserError
from vit_scale.models import build_model
from vit_scale.observe import inspect as ins

PHOTOS = sorted(glob.glob(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "*.jpg")))
CFG = ModelConfig(variant="vit_ti16", depth=3, width=32, heads=2, mlp=64, img_size=32, patch=8, num_classes=5)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(CFG).eval()


@pytest.fixture
def weights(tmp_path, model):
    path = tmp_path / "w" / "model.safetensors"
    path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"heads": "2"})
    return path


def test_attention_weights_are_the_ones_timm_uses(model):
    """With timm's unfused path, the softmax weights pass through attn_drop: capture them there."""
    seen = []
    for block in model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    x = torch.randn(2, 3, 32, 32)
    maps = ins.attention_maps(model, x)
    assert len(maps) == 3 and maps[0].shape == (2, 2, 17, 17)
    for ours, timms in zip(maps, seen):
        assert torch.equal(ours, timms)


def test_posemb_similarity_of_row_codes():
    """Position embeddings that encode only the row: patches in one row are identical (1), others orthogonal (0)."""
    m = build_model(CFG)
    g = 4
    rows = torch.eye(g).repeat_interleave(g, dim=0)  # patch (i, j) -> e_i
    pos = torch.zeros(1, 1 + g * g, 32)
    pos[0, 1:, :g] = rows
    m.pos_embed.data = pos
    sim = ins.posemb_similarity(m)
    assert sim.shape == (g, g, g, g)
    expected = (torch.arange(g)[:, None, None, None] == torch.arange(g)[None, None, :, None]).float()
    assert torch.allclose(sim, expected.expand(g, g, g, g))


def test_attention_distance_by_hand():
    g, patch, n = 3, 16, 10  # 3x3 patches + class token
    self_only = torch.eye(n).expand(1, 1, n, n)
    # Each query attends half to the class token (left out) and half to the patch one to its right (wrapping).
    right = torch.zeros(1, 1, n, n)
    for q in range(9):
        r, c = divmod(q, 3)
        right[0, 0, q + 1, 1 + r * 3 + (c + 1) % 3] = 0.5
        right[0, 0, q + 1, 0] = 0.5
    dist = ins.mean_attention_distance([self_only, right], g, patch)
    assert dist.shape == (2, 1)
    assert dist[0, 0] == 0
    # two of the three columns step one patch right (16 px), the last wraps two patches left (32 px)
    assert dist[1, 0].item() == pytest.approx((2 * 16 + 32) / 3)


def test_rollout_by_hand():
    n = 5  # class token + 2x2 patches
    identity = torch.eye(n).expand(1, 2, n, n)
    assert torch.equal(ins.attention_rollout([identity, identity]), torch.zeros(1, 4))
    uniform = torch.full((1, 2, n, n), 1 / n)
    # One layer: (U + I) / 2; the class token's row gives each patch (1/n) / 2.
    assert torch.allclose(ins.attention_rollout([uniform]), torch.full((1, 4), 0.1))
    # Two layers: ((U + I) / 2)^2 = (3U + I) / 4 since U @ U = U.
    assert torch.allclose(ins.attention_rollout([uniform, uniform]), torch.full((1, 4), 0.15))


def test_inspect_writes_the_three_pictures(weights, tmp_path, capsys):
    out = tmp_path / "pics"
    assert cli_main(["inspect", str(weights), "--images", *PHOTOS, "--out", str(out)]) == 0
    assert "attention_rollout.png" in capsys.readouterr().out
    for name in ("posemb_similarity", "attention_distance", "attention_rollout"):
        with Image.open(out / f"{name}.png") as im:
            assert im.format == "PNG" and min(im.size) > 200
    _, numbers = ins.inspect(str(weights), tmp_path / "again", PHOTOS)
    assert numbers["attention_distance"].shape == (3, 2)
    assert numbers["rollout"].shape == (len(PHOTOS), 16)
    assert torch.allclose(numbers["posemb_similarity"][1, 2, 1, 2], torch.tensor(1.0))


def test_without_images_no_rollout_and_default_out(weights, capsys):
    assert inspect_command.main([str(weights)]) == 0
    assert "no --images given" in capsys.readouterr().out
    out = weights.parent / "inspect"
    assert sorted(p.name for p in out.iterdir()) == ["attention_distance.png", "posemb_similarity.png"]


def test_bad_inputs_are_user_errors(weights, tmp_path):
    with pytest.raises(UserError, match="do not exist"):
        ins.inspect(str(tmp_path / "nope.safetensors"), tmp_path / "o")
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    with pytest.raises(UserError, match="notes.jpg is not an image"):
        ins.inspect(str(weights), tmp_path / "o", [str(not_image)])
    with pytest.raises(UserError, match="cannot read image"):
        ins.inspect(str(weights), tmp_path / "o", [str(tmp_path / "missing.jpg")])
