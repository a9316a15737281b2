"""The glyph corpus: no digit among its classes, optdigits-like images, determinism, and shards."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import unicodedata

import numpy as np
import pytest
from PIL import Image

from vit_scale.commands.shards import cmd_synth
from vit_scale.data import digits, glyphs
from vit_scale.errors import UserError


def test_no_class_is_a_digit_or_a_lookalike_and_each_is_drawn():
    assert len(set(glyphs.CHARS)) == len(glyphs.CHARS) == 65
    for c in glyphs.CHARS:
        assert unicodedata.category(c) != "Nd" and not c.isnumeric(), c
        assert c not in glyphs.LOOKALIKES, c
        # Several fonts per class, so a class is a character, not one typeface's drawing of it.
        assert len(glyphs.fonts_for(c)) >= 12, (c, glyphs.fonts_for(c))
    assert len({glyphs.class_name(i) for i in range(len(glyphs.CHARS))}) == len(glyphs.CHARS)


def test_instances_look_like_optdigits_scans():
    images, _ = digits.load()
    for label in range(0, len(glyphs.CHARS), 7):
        c = glyphs.counts(label, seed=0, instance=3)
        assert c.shape == (8, 8) and c.min() >= 0 and c.max() <= 16
        # Ink fills the frame as a scanned digit does: most rows or most columns are touched.
        assert max((c.sum(1) > 0).sum(), (c.sum(0) > 0).sum()) >= 6
    # The digits' own range and mean ink are of the same order (the digits use 0..16, mean ~4.9).
    ink = np.mean([glyphs.counts(label, 0, i).mean() for label in range(20) for i in range(5)])
    assert 0.4 * images.mean() < ink < 2.0 * images.mean()


def test_same_seed_same_bytes_and_instances_differ():
    a = glyphs.encode_jpeg(glyphs.sample(seed=1, label=4, instance=9, size=24))
    assert a == glyphs.encode_jpeg(glyphs.sample(seed=1, label=4, instance=9, size=24))
    others = [glyphs.counts(4, 1, i) for i in range(10, 16)]
    assert len({o.tobytes() for o in others}) == len(others)
    assert a != glyphs.encode_jpeg(glyphs.sample(seed=2, label=4, instance=9, size=24))


def test_classes_are_told_apart_by_their_mean_image():
    # Random fonts, strokes and warps vary the instances; the character must still set the class.
    train, test = 30, 10
    feats, labels = [], []
    for label in range(len(glyphs.CHARS)):
        for i in range(train + test):
            feats.append(glyphs.counts(label, 0, i).ravel().astype(np.float64))
            labels.append(label)
    feats, labels = np.array(feats), np.array(labels)
    is_train = np.tile(np.arange(train + test) < train, len(glyphs.CHARS))
    means = np.stack([feats[is_train & (labels == c)].mean(0) for c in range(len(glyphs.CHARS))])
    dist = ((feats[~is_train][:, None] - means[None]) ** 2).sum(-1)
    accuracy = (dist.argmin(1) == labels[~is_train]).mean()
    assert accuracy >= 0.3, f"nearest class mean {accuracy:.2f}, chance is {1 / len(glyphs.CHARS):.3f}"


def test_shards_hold_every_class_and_do_not_depend_on_worker_count(tmp_path):
    kw = dict(classes=5, per_class=3, size=16, seed=2, shard_size=4, progress=False)
    one = glyphs.write_glyphs(tmp_path / "one", workers=1, **kw)
    two = glyphs.write_glyphs(tmp_path / "two", workers=2, **kw)
    index = json.loads((one / "index.json").read_text())
    assert (index["num_samples"], index["num_classes"]) == (15, 5)
    assert index["generator"] == {"corpus": "glyphs", "seed": 2, "classes": 5, "per_class": 3, "size": 16}
    assert [c["name"] for c in index["classes"]] == [glyphs.class_name(c) for c in range(5)]
    assert [s["sha256"] for s in index["shards"]] == [
        s["sha256"] for s in json.loads((two / "index.json").read_text())["shards"]
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["glyphs", "--classes", "1", "--per-class", "2", "--out", "x"],
        ["glyphs", "--classes", "66", "--per-class", "2", "--out", "x"],
        ["glyphs", "--per-class", "0", "--out", "x"],
        ["glyphs", "--per-class", "2", "--size", "4", "--out", "x"],
    ],
)
def test_bad_sizes_are_user_errors(argv, tmp_path):
    argv[-1] = str(tmp_path / "out")
    with pytest.raises(UserError, match="glyphs"):
        cmd_synth(argv)
    assert not (tmp_path / "out").exists()


def test_command_line_builds_shards_that_verify(tmp_path):
    out = tmp_path / "glyphs"
    run = [sys.executable, "-m", "vit_scale.cli", "shards"]
    built = subprocess.run(
        [*run, "synth", "glyphs", "--classes", "3", "--per-class", "2", "--size", "24", "--out", str(out),
         "--workers", "1", "--no-progress"], capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    checked = subprocess.run([*run, "verify", str(out)], capture_output=True, text=True)
    assert checked.returncode == 0 and "6 samples" in checked.stdout, checked.stdout + checked.stderr
    first = json.loads((out / "index.json").read_text())["shards"][0]["name"]
    with tarfile.open(out / first) as tar:
        jpeg = next(tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg"))
    image = Image.open(io.BytesIO(jpeg))
    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (24, 24))


def test_the_demo_defaults_to_every_class():
    from vit_scale.commands.demo import CORPORA

    assert CORPORA["glyphs"].classes == CORPORA["glyphs"].most_classes == len(glyphs.CHARS)
