"""Weight import: the official .npz layout, timm state dicts and safetensors give the source's logits."""


import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from transfer_helpers import numpy_vit_logits, official_npz_arrays

from vit_scale.checkpoint.weights import build_pretrained, load_pretrained
from vit_scale.config.schema import ModelConfig
from vit_scale.errors import UserError
from vit_scale.models import model_dims


@pytest.mark.parametrize("rep", [None, 24])
def test_npz_import_matches_reference_forward(tmp_path, rep):
    rng = np.random.default_rng(0)
    arrays = official_npz_arrays(rng, depth=2, width=32, heads=4, mlp=48, patch=8, img=32, classes=7, rep=rep)
    path = tmp_path / "ViT-tiny.npz"
    np.savez(path, **arrays)
    pre = load_pretrained(path)
    dims = model_dims(pre.model)
    assert (dims["layers"], dims["width"], dims["mlp"], dims["heads"], dims["patch"]) == (2, 32, 48, 4, 8)
    assert (pre.model.img_size, pre.model.num_classes, pre.model.representation_size) == (32, 7, rep)
    model = build_pretrained(pre).eval()
    images = rng.uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ours = model(torch.from_numpy(images)).double().numpy()
    ref = numpy_vit_logits(arrays, images)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)


def test_npz_with_optimizer_prefix_and_bad_layouts(tmp_path):
    rng = np.random.default_rng(1)
    arrays = official_npz_arrays(rng)
    np.savez(tmp_path / "opt.npz", **{f"opt/target/{k}": v for k, v in arrays.items()})
    assert load_pretrained(tmp_path / "opt.npz").model.img_size == 32
    gap = {k: v for k, v in arrays.items() if k != "cls"}
    np.savez(tmp_path / "gap.npz", **gap)
    with pytest.raises(UserError, match="class token"):
        load_pretrained(tmp_path / "gap.npz")
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(UserError, match="embedding/kernel"):
        load_pretrained(tmp_path / "other.npz")
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(UserError, match="not a readable .npz"):
        load_pretrained(tmp_path / "torn.npz")


def _timm_source(width=192, heads=3):
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32, patch_size=16, embed_dim=width, depth=2, num_heads=heads, mlp_ratio=2.0, num_classes=6
    ).eval()


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped"])
def test_timm_weights_give_identical_logits(tmp_path, fmt):
    source = _timm_source()
    sd = source.state_dict()
    path = tmp_path / f"timm.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "epoch": 3} if fmt == "wrapped" else sd, path)
    pre = load_pretrained(path)
    assert pre.model.variant == "vit_ti16" and model_dims(pre.model)["layers"] == 2
    model = build_pretrained(pre).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_heads_of_unknown_width_come_from_the_hint(tmp_path):
    source = _timm_source(width=40, heads=5)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserError, match="model.heads"):
        load_pretrained(tmp_path / "w.pth")
    pre = load_pretrained(tmp_path / "w.pth", hint=ModelConfig(width=40, heads=5))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(build_pretrained(pre).eval()(x), source(x))


def test_unreadable_weights_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="do not exist"):
        load_pretrained(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UserError, match="not a readable torch state dict"):
        load_pretrained(tmp_path / "junk.pth")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(UserError, match="do not know how to read"):
        load_pretrained(tmp_path / "w.txt")
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(UserError, match="not a timm-style ViT"):
        load_pretrained(tmp_path / "x.safetensors")
