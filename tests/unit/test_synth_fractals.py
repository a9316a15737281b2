"""The FractalDB-style corpus: determinism, the degeneracy filter, and classes that differ in shape."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from vit_scale.commands.shards import cmd_synth
from vit_scale.data import synth
from vit_scale.errors import UserError


def test_same_seed_same_bytes_and_seeds_differ():
    a = synth.encode_jpeg(synth.sample(seed=3, label=5, instance=7, size=48))
    # A fresh category build (as a different worker process would do) must give the same pixels.
    b = synth.encode_jpeg(synth.sample(seed=3, label=5, instance=7, size=48, ifs=synth.category(3, 5)))
    assert a == b
    assert a != synth.encode_jpeg(synth.sample(seed=4, label=5, instance=7, size=48))
    assert a != synth.encode_jpeg(synth.sample(seed=3, label=5, instance=8, size=48))


def test_categories_are_contractive_and_fill_the_frame():
    for label in range(12):
        ifs = synth.category(seed=0, label=label)
        assert synth.MAPS[0] <= len(ifs.p) <= synth.MAPS[1]
        assert np.isclose(ifs.p.sum(), 1.0)
        assert (np.linalg.norm(ifs.A, ord=2, axis=(1, 2)) < 1.0).all()
        # Measured again with another random stream than the one that accepted it.
        assert synth.fill_rate(ifs, np.random.default_rng(1000 + label)) >= synth.MIN_FILL * 0.8


def _radial_profile(grey: np.ndarray) -> np.ndarray:
    """Mass around the centroid against radius / radius of gyration: blind to rotation, flip, shift, scale."""
    w = np.clip(grey - np.median(grey), 0, None)
    w /= w.sum()
    yy, xx = np.mgrid[: grey.shape[0], : grey.shape[1]]
    r = np.hypot(yy - (w * yy).sum(), xx - (w * xx).sum())
    hist, _ = np.histogram(r / np.sqrt((w * r**2).sum()), bins=16, range=(0, 3), weights=w)
    return hist


def test_classes_differ_in_shape():
    # Instances are randomly rotated, flipped, placed and coloured, so raw-pixel class means blur
    # together; a pose-invariant shape descriptor shows that each class is one recognisable shape.
    classes, train, test, size = 10, 12, 6, 48
    feats, labels, is_train = [], [], []
    for label in range(classes):
        ifs = synth.category(0, label)
        for i in range(train + test):
            jpeg = synth.encode_jpeg(synth.sample(0, label, i, size, ifs))
            grey = np.asarray(Image.open(io.BytesIO(jpeg)).convert("L"), dtype=np.float64)
            feats.append(_radial_profile(grey))
            labels.append(label)
            is_train.append(i < train)
    feats, labels, is_train = np.array(feats), np.array(labels), np.array(is_train)
    means = np.stack([feats[is_train & (labels == c)].mean(0) for c in range(classes)])
    dist = ((feats[~is_train][:, None] - means[None]) ** 2).sum(-1)
    accuracy = (dist.argmin(1) == labels[~is_train]).mean()
    assert accuracy >= 0.4, f"nearest class mean {accuracy:.2f}, chance is {1 / classes:.2f}"


def test_instances_vary_within_a_class():
    images = [synth.sample(0, 2, i, 32).astype(np.int32) for i in range(4)]
    for i in range(1, 4):
        assert np.abs(images[i] - images[0]).mean() > 5


def test_order_puts_every_class_in_every_stretch():
    items = synth.order(classes=4, per_class=3)
    assert sorted(items) == [(c, i) for c in range(4) for i in range(3)]
    assert [label for label, _ in items[:4]] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "argv",
    [
        ["fractals", "--classes", "1", "--per-class", "2", "--out", "x"],
        ["fractals", "--classes", "3", "--per-class", "0", "--out", "x"],
        ["fractals", "--classes", "3", "--per-class", "2", "--size", "8", "--out", "x"],
    ],
)
def test_bad_sizes_are_user_errors(argv, tmp_path):
    argv[-1] = str(tmp_path / "out")
    with pytest.raises(UserError, match="fractals"):
        cmd_synth(argv)
    assert not (tmp_path / "out").exists()


def _labels_in_shards(directory) -> list[int]:
    labels = []
    for tar_path in sorted(directory.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            labels += [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
    return labels


def test_shards_are_counted_and_do_not_depend_on_worker_count(tmp_path):
    one = synth.write_fractals(
        tmp_path / "one", classes=3, per_class=4, size=24, seed=1, workers=1, shard_size=5, progress=False
    )
    two = synth.write_fractals(
        tmp_path / "two", classes=3, per_class=4, size=24, seed=1, workers=2, shard_size=5, progress=False
    )
    index = json.loads((one / "index.json").read_text())
    assert (index["num_samples"], index["num_shards"], index["num_classes"]) == (12, 3, 3)
    assert [s["samples"] for s in index["shards"]] == [5, 5, 2]
    assert [c["name"] for c in index["classes"]] == [synth.class_name(c) for c in range(3)]
    assert index["generator"] == {"corpus": "fractals", "seed": 1, "classes": 3, "per_class": 4, "size": 24}
    assert sorted(_labels_in_shards(one)) == [0] * 4 + [1] * 4 + [2] * 4
    # Worker processes change nothing: same shards, byte for byte.
    assert [s["sha256"] for s in index["shards"]] == [
        s["sha256"] for s in json.loads((two / "index.json").read_text())["shards"]
    ]


def test_shard_images_decode_at_the_requested_size(tmp_path):
    out = synth.write_fractals(tmp_path / "f", classes=2, per_class=1, size=40, workers=1, progress=False)
    with tarfile.open(out / "shard-000000.tar") as tar:
        jpegs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert len(jpegs) == 2
    for data in jpegs:
        image = Image.open(io.BytesIO(data))
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (40, 40))


def _vit_scale(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "vit_scale.cli", *argv], capture_output=True, text=True, env=env
    )


def test_command_line_builds_shards_that_verify(tmp_path):
    out = tmp_path / "fractals"
    built = _vit_scale(
        "shards",
        "synth",
        "fractals",
        "--classes",
        "3",
        "--per-class",
        "2",
        "--size",
        "32",
        "--out",
        str(out),
        "--workers",
        "1",
        "--no-progress",
    )
    assert built.returncode == 0, built.stderr
    assert json.loads((out / "index.json").read_text())["num_samples"] == 6
    checked = _vit_scale("shards", "verify", str(out))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "6 samples" in checked.stdout

    bad = _vit_scale(
        "shards", "synth", "fractals", "--classes", "1", "--per-class", "2", "--out", str(tmp_path / "x")
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "vit-scale shards: error: fractals: need --classes >= 2, --per-class >= 1 and --size >= 16 (got 1, 2, 64)"
    ]
