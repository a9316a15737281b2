"""Shard writing and `vit-scale shards build | merge-index | verify | stats` on every source format.

All inputs are real files in the real layouts: JPEGs cut from scikit-learn's photos, synset tars inside a
release tar, CIFAR pickles, VTAB-1k list files, CSV lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from data_helpers import encode, image_folder, jpeg_bytes, photo_crop

from vit_scale.cli import main as vit_scale
from vit_scale.config.schema import DataConfig
from vit_scale.data.loader import make_loader
from vit_scale.data.shards import ShardWriter
from vit_scale.errors import UserError


def index_of(d: Path) -> dict:
    return json.loads((d / "index.json").read_text())


def members(shard: Path) -> list[str]:
    with tarfile.open(shard) as t:
        return t.getnames()


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tar"))}


def all_labels(d: Path, **kw) -> list:
    loader = make_loader(str(d), DataConfig(workers=0, **kw), train=False, img_size=8, batch_size=64)
    return [y.tolist() for _, ys in loader for y in ys]


# ---- ShardWriter --------------------------------------------------------------------------------------------


def test_writer_layout_index_and_reproducible_bytes(tmp_path):
    def write(d):
        with ShardWriter(d, shard_size=3, classes=["a", {"name": "b", "wnid": "n1"}]) as w:
            for i in range(7):
                w.write(f"k{i}", jpeg_bytes(i), "jpg", i % 2, {"source": f"f{i}"})
            assert not w.write("k2", b"again", "jpg", 0, {"source": "dup"})
        return index_of(d)

    index = write(tmp_path / "a")
    assert [s["samples"] for s in index["shards"]] == [3, 3, 1]
    assert index["num_samples"] == 7 and index["num_classes"] == 2
    assert index["classes"][1] == {"id": 1, "name": "b", "wnid": "n1"}
    assert index["skipped"] == [{"source": "dup", "reason": "duplicate key k2"}]
    assert members(tmp_path / "a" / "shard-000000.tar") == [
        f"k{i}.{e}" for i in range(3) for e in ("jpg", "cls", "json")
    ]
    for s in index["shards"]:
        data = (tmp_path / "a" / s["name"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    assert not list((tmp_path / "a").glob("*.tmp"))
    write(tmp_path / "b")
    assert digests(tmp_path / "a") == digests(tmp_path / "b")


def test_writer_shard_bytes_cap_and_resume_after_abort(tmp_path):
    with ShardWriter(tmp_path / "cap", shard_size=100, shard_bytes=12_000) as w:
        for i in range(6):
            w.write(f"k{i}", jpeg_bytes(i), "jpg", 0, {})
    assert all(s["bytes"] <= 12_000 for s in index_of(tmp_path / "cap")["shards"])
    assert index_of(tmp_path / "cap")["num_shards"] > 1

    out = tmp_path / "resume"
    with pytest.raises(KeyboardInterrupt), ShardWriter(out, shard_size=2, resume=True) as w:
        for i in range(5):
            w.write(f"k{i}", jpeg_bytes(i), "jpg", 0, {})
        raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == [".progress.json", "shard-000000.tar", "shard-000001.tar"]
    with ShardWriter(out, shard_size=2, resume=True) as w:
        assert w.resume_inputs == 4
        for i in range(w.resume_inputs, 7):
            w.write(f"k{i}", jpeg_bytes(i), "jpg", 0, {})
    with ShardWriter(tmp_path / "clean", shard_size=2) as w:
        for i in range(7):
            w.write(f"k{i}", jpeg_bytes(i), "jpg", 0, {})
    assert digests(out) == digests(tmp_path / "clean")
    assert index_of(out)["shards"] == index_of(tmp_path / "clean")["shards"]


# ---- sources and quirks -------------------------------------------------------------------------------------


@pytest.fixture
def quirky_folder(tmp_path) -> Path:
    root = image_folder(tmp_path / "src", {"cat": 4, "dog": 3})
    (root / "empty").mkdir()
    (root / "cat" / "gray.jpg").write_bytes(encode(photo_crop(1, 50, 40).convert("L")))
    (root / "cat" / "cmyk.jpg").write_bytes(encode(photo_crop(2, 50, 40).convert("CMYK")))
    (root / "dog" / "png_inside.JPEG").write_bytes(encode(photo_crop(3, 50, 40), "PNG"))
    (root / "dog" / "truncated.jpg").write_bytes(jpeg_bytes(4, 60, 50)[:400])
    (root / "dog" / "zero.jpg").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "large.jpg").write_bytes(jpeg_bytes(5, 300, 200))
    (root / "dog" / "same.jpg").write_bytes(jpeg_bytes(6))
    (root / "dog" / "same.png").write_bytes(encode(photo_crop(6, 40, 30), "PNG"))
    return root


def test_build_image_folder_with_quirks(quirky_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = vit_scale(
        [
            "shards",
            "build",
            str(quirky_folder),
            "--out",
            str(out),
            "--max-side",
            "100",
            "--shard-size",
            "4",
            "--workers",
            "2",
        ]
    )
    assert rc == 0
    summary = capsys.readouterr().out
    assert "13 samples" in summary and "3 inputs skipped" in summary and "empty classes: empty" in summary
    index = index_of(out)
    assert [c["name"] for c in index["classes"]] == ["cat", "dog", "empty"]
    reasons = {Path(s["source"]).name: s["reason"] for s in index["skipped"]}
    assert reasons["zero.jpg"] == "zero-byte file"
    assert reasons["truncated.jpg"].startswith("undecodable image")
    assert reasons["notes.txt"].startswith("not an image file")
    samples = {}
    for s in index["shards"]:
        with tarfile.open(out / s["name"]) as t:
            for m in t.getmembers():
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = t.extractfile(m).read()
    meta = {k: json.loads(v["json"]) for k, v in samples.items()}
    assert meta["cat_gray_jpg"]["mode"] == "L" and "jpg" in samples["cat_gray_jpg"]
    assert meta["cat_cmyk_jpg"]["mode"] == "CMYK"
    assert meta["dog_png_inside_JPEG"]["format"] == "PNG" and "png" in samples["dog_png_inside_JPEG"]
    assert meta["dog_large_jpg"]["width"] == 300 and meta["dog_large_jpg"]["resized"] == [100, 67]
    # A small RGB JPEG is stored byte for byte.
    assert samples["cat_img_000_jpg"]["jpg"] == (quirky_folder / "cat" / "img_000.jpg").read_bytes()
    assert {"dog_same_jpg", "dog_same_png"} <= set(samples)
    from vit_scale.data.transforms import decode_rgb

    for s in samples.values():
        image = next(v for k, v in s.items() if k in ("jpg", "png"))
        assert decode_rgb(image).shape[0] == 3
    assert sorted(all_labels(out)) == [0] * 6 + [1] * 7


def test_rebuild_is_kept_and_other_options_are_refused(quirky_folder, tmp_path):
    out = tmp_path / "out"
    args = ["shards", "build", str(quirky_folder), "--out", str(out), "--workers", "1", "--no-progress"]
    assert vit_scale(args) == 0
    before = digests(out)
    assert vit_scale(args) == 0
    assert digests(out) == before
    assert vit_scale(args + ["--max-side", "20"]) == 2  # refused with a message, not rebuilt silently
    assert vit_scale(args + ["--max-side", "20", "--force"]) == 0
    assert digests(out) != before


def _synset_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, __import__("io").BytesIO(data))


def test_build_imagenet21k_release_tar_and_directory(tmp_path):
    synsets = tmp_path / "synsets"
    synsets.mkdir()
    _synset_tar(synsets / "n02000002.tar", {f"n02000002_{i}.JPEG": jpeg_bytes(10 + i) for i in range(3)})
    _synset_tar(
        synsets / "n01000001.tar",
        {
            "n01000001_1.JPEG": jpeg_bytes(1),
            "n01000001_2.JPEG": encode(photo_crop(2, 40, 30), "PNG"),  # PNG data in a .JPEG, as in ImageNet
            "n01000001_3.JPEG": b"",
        },
    )
    _synset_tar(synsets / "n03000003.tar", {})
    (synsets / "n04000004.tar").write_bytes(b"not a tar file at all" * 40)
    release = tmp_path / "winter21_whole.tar"
    with tarfile.open(release, "w") as t:
        for p in sorted(synsets.iterdir()):
            t.add(p, arcname=p.name)
    for src in (release, synsets):
        out = tmp_path / f"out_{src.name}"
        assert (
            vit_scale(["shards", "build", str(src), "--out", str(out), "--no-progress", "--workers", "1"])
            == 0
        )
        index = index_of(out)
        assert [c["wnid"] for c in index["classes"]] == ["n01000001", "n02000002", "n03000003", "n04000004"]
        assert index["num_samples"] == 5 and index["empty_classes"] == ["n03000003", "n04000004"]
        assert [s["source"] for s in index["skipped"]] == ["n04000004.tar", "n01000001/n01000001_3.JPEG"]
        assert index["skipped"][0]["reason"].startswith("unreadable synset tar")
        assert index["skipped"][1]["reason"] == "zero-byte file"
        assert sorted(all_labels(out)) == [0, 0, 1, 1, 1]
    assert digests(tmp_path / "out_synsets") == digests(tmp_path / f"out_{release.name}")


def _cifar_batch(path: Path, n: int, offset: int, hundred: bool) -> None:
    data = np.stack(
        [np.asarray(photo_crop(offset + i, 32, 32)).transpose(2, 0, 1).reshape(-1) for i in range(n)]
    )
    d = {b"data": data, b"filenames": [f"img{offset + i}.png".encode() for i in range(n)]}
    if hundred:
        d[b"fine_labels"] = [(offset + i) % 100 for i in range(n)]
        d[b"coarse_labels"] = [(offset + i) % 20 for i in range(n)]
    else:
        d[b"labels"] = [(offset + i) % 10 for i in range(n)]
    path.write_bytes(pickle.dumps(d))


def test_build_cifar10_and_cifar100(tmp_path):
    c10 = tmp_path / "c10" / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    _cifar_batch(c10 / "data_batch_1", 3, 0, False)
    _cifar_batch(c10 / "data_batch_2", 2, 3, False)
    _cifar_batch(c10 / "test_batch", 2, 50, False)
    (c10 / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"n{i}".encode() for i in range(10)]}))
    c100 = tmp_path / "c100" / "cifar-100-python"
    c100.mkdir(parents=True)
    _cifar_batch(c100 / "train", 4, 0, True)
    _cifar_batch(c100 / "test", 2, 60, True)
    (c100 / "meta").write_bytes(
        pickle.dumps(
            {
                b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
            }
        )
    )
    for src, split, n in ((c10.parent, "train", 5), (c10.parent, "test", 2), (c100.parent, "test", 2)):
        out = tmp_path / f"{src.name}_{split}"
        assert (
            vit_scale(["shards", "build", str(src), "--out", str(out), "--split", split, "--no-progress"])
            == 0
        )
        assert index_of(out)["num_samples"] == n
    assert sorted(all_labels(tmp_path / "c10_train")) == [0, 1, 2, 3, 4]
    index = index_of(tmp_path / "c100_test")
    assert index["num_classes"] == 100 and index["classes"][60]["name"] == "f60"
    with tarfile.open(tmp_path / "c100_test" / "shard-000000.tar") as t:
        first = t.getnames()[0].split(".")[0]
        meta = json.loads(t.extractfile(f"{first}.json").read())
        png = t.extractfile(f"{first}.png").read()
    assert meta["coarse_label"] == 0 and meta["coarse_name"] == "c0" and meta["filename"] == "img60.png"
    # The paper's dev split: a fixed part of CIFAR's training set, the rest still trains.
    parts = {}
    for split in ("val", "train"):
        out = tmp_path / f"c10_holdout_{split}"
        args = ["shards", "build", str(c10.parent), "--out", str(out), "--split", split, "--val-holdout", "2"]
        assert vit_scale([*args, "--no-progress"]) == 0
        parts[split] = all_labels(out)
    assert len(parts["val"]) == 2 and len(parts["train"]) == 3
    assert sorted(parts["val"] + parts["train"]) == [0, 1, 2, 3, 4]
    assert vit_scale(["shards", "build", str(c10.parent), "--out", str(tmp_path / "x"), "--split", "val"]) == 2
    # PNG keeps CIFAR's pixels exactly.
    from vit_scale.data.transforms import decode_rgb

    assert np.array_equal(decode_rgb(png).permute(1, 2, 0).numpy(), np.asarray(photo_crop(60, 32, 32)))


def test_build_vtab_task_folder_and_csv_multilabel(tmp_path):
    task = tmp_path / "vtab_task"
    (task / "images").mkdir(parents=True)
    for i in range(6):
        (task / "images" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    (task / "train800.txt").write_text("images/0.jpg 0\nimages/1.jpg 1\nimages/2.jpg 2\n")
    (task / "val200.txt").write_text("images/3.jpg 0\n")
    (task / "train800val200.txt").write_text(
        "images/0.jpg 0\nimages/1.jpg 1\nimages/2.jpg 2\nimages/3.jpg 0\n"
    )
    (task / "test.txt").write_text("images/4.jpg 4\nimages/5.jpg 1\n")
    out = tmp_path / "vtab_out"
    assert (
        vit_scale(["shards", "build", str(task), "--out", str(out), "--split", "val200", "--no-progress"])
        == 0
    )
    index = index_of(out)
    assert index["num_samples"] == 1 and index["num_classes"] == 5 and index["split"] == "val200"

    lst = tmp_path / "list.csv"
    lst.write_text(
        "path,label\nvtab_task/images/0.jpg,0;2\nvtab_task/images/1.jpg,3\nvtab_task/images/9.jpg,1\n"
    )
    out = tmp_path / "csv_out"
    assert vit_scale(["shards", "build", str(lst), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    index = index_of(out)
    assert index["labels"] == "labels" and index["num_classes"] == 4 and index["num_samples"] == 2
    assert index["skipped"][0]["source"] == "vtab_task/images/9.jpg"
    assert all_labels(out, labels="multi") == [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def test_val_holdout_and_array_parts_merge(tmp_path):
    root = image_folder(tmp_path / "src", {"a": 7, "b": 6, "c": 5})
    common = ["--no-progress", "--workers", "1", "--shard-size", "3"]
    val, train = tmp_path / "val", tmp_path / "train"
    assert (
        vit_scale(
            ["shards", "build", str(root), "--out", str(val), "--val-holdout", "5", "--split", "val"] + common
        )
        == 0
    )
    assert (
        vit_scale(
            ["shards", "build", str(root), "--out", str(train), "--val-holdout", "5", "--split", "train"]
            + common
        )
        == 0
    )
    val_keys = {k for s in index_of(val)["shards"] for k in members(val / s["name"])}
    train_keys = {k for s in index_of(train)["shards"] for k in members(train / s["name"])}
    assert len(val_keys) == 5 * 3 and len(train_keys) == 13 * 3 and not val_keys & train_keys

    arr = tmp_path / "array"
    for i in (2, 0, 1):
        args = ["shards", "build", str(root), "--out", str(arr)]
        assert vit_scale(args + ["--array-index", str(i), "--array-count", "3"] + common) == 0
        if i == 0:
            assert vit_scale(["shards", "merge-index", str(arr)]) == 2  # one part still missing
    assert vit_scale(["shards", "merge-index", str(arr)]) == 0
    merged = index_of(arr)
    assert merged["num_samples"] == 18 and merged["shards"][0]["name"].startswith("part-00000/")
    assert sorted(all_labels(arr)) == [0] * 7 + [1] * 6 + [2] * 5
    assert vit_scale(["shards", "verify", str(arr)]) == 0


def test_verify_catches_a_flipped_byte_and_a_truncated_shard(tmp_path, capsys):
    root = image_folder(tmp_path / "src", {"a": 4, "b": 4})
    out = tmp_path / "out"
    assert (
        vit_scale(["shards", "build", str(root), "--out", str(out), "--shard-size", "3", "--no-progress"])
        == 0
    )
    assert vit_scale(["shards", "verify", str(out)]) == 0
    assert "ok: 3 shards, 8 samples" in capsys.readouterr().out
    shard = out / "shard-000001.tar"
    good = shard.read_bytes()
    flipped = bytearray(good)
    flipped[512 + 700] ^= 0x40  # inside the first image's JPEG data
    shard.write_bytes(bytes(flipped))
    assert vit_scale(["shards", "verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert "shard-000001.tar" in report and "sha256 mismatch" in report and "shard-000000.tar" in report
    shard.write_bytes(good[: len(good) // 2])
    assert vit_scale(["shards", "verify", str(out)]) == 1
    assert "size" in capsys.readouterr().out
    assert vit_scale(["shards", "stats", str(out)]) == 0
    stats = capsys.readouterr().out
    assert "8 samples" in stats and "median 48×36" in stats


def test_interrupted_build_resumes_to_identical_shards(tmp_path):
    root = image_folder(tmp_path / "src", {f"c{k}": 60 for k in range(5)}, size=(120, 90))
    args = [str(root), "--shard-size", "10", "--max-side", "64", "--workers", "1", "--no-progress"]
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vit_scale.cli", "shards", "build", "--out", str(out), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / ".progress.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "index.json").exists(), "the build finished before it could be interrupted"
    done_before = len(list(out.glob("shard-*.tar")))
    assert done_before >= 1
    assert vit_scale(["shards", "build", "--out", str(out), *args]) == 0
    assert vit_scale(["shards", "build", "--out", str(tmp_path / "clean"), *args]) == 0
    assert digests(out) == digests(tmp_path / "clean")
    assert index_of(out)["shards"] == index_of(tmp_path / "clean")["shards"]
    assert not list(out.glob("*.tmp"))


def test_bad_sources_are_clear_errors(tmp_path, capsys):
    assert vit_scale(["shards", "build", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "flat").mkdir()
    assert vit_scale(["shards", "build", str(tmp_path / "flat"), "--out", str(tmp_path / "o")]) == 2
    assert "no class directories" in capsys.readouterr().err
    assert vit_scale(["shards", "verify", str(tmp_path / "flat")]) == 2
    with pytest.raises(UserError, match="array-index 3"):
        from vit_scale.data.build import build

        build(str(tmp_path), str(tmp_path / "o"), part=3, parts=2)


def test_array_parts_of_a_vtab_task_merge_with_their_task_and_mixed_tasks_are_refused(tmp_path, capsys):
    """The task index.json records (for the augmentations validation refuses) survives an array build."""
    from transfer_helpers import write_vtab_task

    common = ["--no-progress", "--workers", "1", "--format", "vtab", "--split", "test"]
    arr = tmp_path / "array"
    for task, out in (("clevr_count", arr), ("dtd", tmp_path / "other")):
        folder = write_vtab_task(tmp_path / "raw", task, 2)
        for i in (0, 1):
            part = ["--array-index", str(i), "--array-count", "2"]
            assert vit_scale(["shards", "build", str(folder), "--out", str(out), *part, *common]) == 0
    assert vit_scale(["shards", "merge-index", str(arr)]) == 0
    assert index_of(arr)["task"] == "clevr_count" and index_of(arr)["num_samples"] == 6
    (arr / "part-00002").mkdir()
    foreign = (tmp_path / "other" / "part-00001" / "index.json").read_text()  # a part built for dtd
    (arr / "part-00002" / "index.json").write_text(foreign)
    parts = [str(arr / "part-00000"), str(arr / "part-00002")]
    assert vit_scale(["shards", "merge-index", str(arr), *parts]) == 2
    assert "name different tasks (clevr_count, dtd)" in capsys.readouterr().err
