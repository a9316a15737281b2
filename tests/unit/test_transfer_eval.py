"""`vit-scale eval`: top-1/top-5 and precision@1 over real shards equal a count done by hand."""

import json

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from transfer_helpers import class_images

from vit_scale.cli import main as cli
from vit_scale.data.shards import ShardWriter


def _png(pixels):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _model(classes):
    torch.manual_seed(3)
    return VisionTransformer(
        img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=classes
    ).eval()


def _data(tmp_path, classes, multi=False):
    rng = np.random.default_rng(0)
    images, labels = [], []
    with ShardWriter(tmp_path / "data" / "test", classes=[f"c{i}" for i in range(classes)]) as w:
        for label in range(classes):
            for j, img in enumerate(class_images(label, 4, 32, rng)):
                y = [label, (label + 1) % classes] if multi else label
                w.write(f"s{label}_{j}", _png(img), "png", y, {})
                images.append(img)
                labels.append(y)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, labels


def test_eval_counts_top1_and_top5(tmp_path, capsys):
    model = _model(8)
    x, labels = _data(tmp_path, 8)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    with torch.no_grad():
        logits = model(x)
    y = torch.tensor(labels)
    top1 = (logits.argmax(1) == y).double().mean().item()
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).double().mean().item()
    assert top1 < top5  # a random model: the two counts differ, so each is really checked
    rc = cli(
        [
            "eval",
            str(tmp_path / "w.pth"),
            "--data",
            str(tmp_path / "data" / "test"),
            "--run-dir",
            str(tmp_path / "run"),
            "--batch-size",
            "5",
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    got = res["datasets"]["data"]
    assert (got["top1"], got["top5"], got["n"]) == (
        pytest.approx(top1, abs=1e-12),
        pytest.approx(top5, abs=1e-12),
        32,
    )
    assert (tmp_path / "run" / "results.md").exists()


def test_eval_multilabel_precision_at_1(tmp_path):
    model = _model(4)
    x, labels = _data(tmp_path, 4, multi=True)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    with torch.no_grad():
        pred = model(x).argmax(1).tolist()
    prec1 = np.mean([p in ls for p, ls in zip(pred, labels)])
    rc = cli(
        [
            "eval",
            str(tmp_path / "w.pth"),
            "--data",
            str(tmp_path / "data" / "test"),
            "--labels",
            "multi",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["metric"] == "prec1"
    assert res["datasets"]["data"]["prec1"] == pytest.approx(prec1, abs=1e-12)


def test_eval_refuses_headless_weights_and_wrong_class_count(tmp_path, capsys):
    x, _ = _data(tmp_path, 8)
    torch.save(_model(0).state_dict(), tmp_path / "headless.pth")
    torch.save(_model(3).state_dict(), tmp_path / "three.pth")
    data = str(tmp_path / "data" / "test")
    assert cli(["eval", str(tmp_path / "headless.pth"), "--data", data]) == 2
    assert "no classification head" in capsys.readouterr().err
    assert cli(["eval", str(tmp_path / "three.pth"), "--data", data, "--run-dir", str(tmp_path / "r")]) == 2
    assert "8 classes but the model's head has 3" in capsys.readouterr().err


def test_eval_on_cifar10_shards_built_from_the_official_pickles(tmp_path):
    from transfer_helpers import write_cifar10_python

    src, images, labels = write_cifar10_python(tmp_path / "raw", per_class=2)
    out = tmp_path / "cifar10" / "test"
    assert (
        cli(
            [
                "shards",
                "build",
                str(src),
                "--out",
                str(out),
                "--format",
                "cifar",
                "--split",
                "test",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    model = _model(10)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # PNG in the shards: exact pixels
    with torch.no_grad():
        top = model(x).topk(5, 1).indices
    y = torch.tensor(labels)
    assert cli(["eval", str(tmp_path / "w.pth"), "--data", str(out), "--run-dir", str(tmp_path / "run")]) == 0
    got = json.loads((tmp_path / "run" / "results.json").read_text())["datasets"]["cifar10"]
    assert got["n"] == 20
    assert got["top1"] == pytest.approx((top[:, 0] == y).double().mean().item(), abs=1e-12)
    assert got["top5"] == pytest.approx((top == y[:, None]).any(1).double().mean().item(), abs=1e-12)
