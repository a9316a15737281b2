"""The embedded digits benchmark: the documented fixed split, images, and shards."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image

from vit_scale.data import digits


def test_split_is_fixed_stratified_and_complete():
    images, labels = digits.load()
    assert images.shape == (1797, 8, 8)
    train, test = digits.split(labels)
    assert (len(train), len(test)) == (1297, 500)
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    assert np.bincount(labels[test], minlength=10).tolist() == [50] * 10
    train_counts = np.bincount(labels[train], minlength=10)
    assert train_counts.min() >= 124 and train_counts.max() <= 133
    again_train, again_test = digits.split(labels)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)


def test_upsampled_image_keeps_the_digit():
    images, _ = digits.load()
    big = digits.to_image(images[0], 32)
    assert big.shape == (32, 32, 3) and big.dtype == np.uint8
    assert (big[..., 0] == big[..., 1]).all() and (big[..., 1] == big[..., 2]).all()
    # Averaging back to 8x8 recovers the original strokes.
    small = big[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.corrcoef(small.ravel(), images[0].ravel())[0, 1] > 0.9


def _read(directory):
    samples = {}
    for tar_path in sorted(directory.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_shards_hold_the_split(tmp_path):
    out = digits.write_digits(tmp_path / "digits", size=16)
    _, labels = digits.load()
    train_idx, test_idx = digits.split(labels)
    for name, idx in (("train", train_idx), ("test", test_idx)):
        index = json.loads((out / name / "index.json").read_text())
        assert index["num_samples"] == len(idx) and index["split"] == name
        assert [c["name"] for c in index["classes"]] == [str(d) for d in range(10)]
        samples = _read(out / name)
        got = sorted(json.loads(s["json"])["index"] for s in samples.values())
        assert got == idx.tolist()
        for s in samples.values():
            assert int(s["cls"]) == labels[json.loads(s["json"])["index"]]
        assert Image.open(io.BytesIO(next(iter(samples.values()))["jpg"])).size == (16, 16)
    # The same command gives the same bytes.
    again = digits.write_digits(tmp_path / "again", size=16)
    for name in ("train", "test"):
        first = json.loads((out / name / "index.json").read_text())["shards"]
        second = json.loads((again / name / "index.json").read_text())["shards"]
        assert [s["sha256"] for s in first] == [s["sha256"] for s in second]
