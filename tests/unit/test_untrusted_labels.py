"""Labels are never silently wrong (issue 16, class 3): every input in its real format (CSV lists, VTAB-1k
task folders, CIFAR pickles, ImageFolder trees with links, devices and FIFOs, synset tars with link and
device members, shard sets), refused with one line naming the file and line, or listed as skipped."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_helpers import image_folder, jpeg_bytes
from hostile_helpers import tree, written_outside

from vit_scale.cli import main as vit_scale
from vit_scale.data.shards import make_index, make_key
from vit_scale.io import atomic_write_json


def build(capsys, source: Path, out: Path, *extra: str) -> tuple[int, str]:
    rc = vit_scale(
        ["shards", "build", str(source), "--out", str(out), "--no-progress", "--workers", "1", *extra]
    )
    return rc, capsys.readouterr().err


def refused(capsys, source: Path, out: Path, *needles: str, extra=()) -> str:
    rc, err = build(capsys, source, out, *extra)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("vit-scale shards: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() or not any(out.glob("*.tar")), "a refused build wrote shards"
    return lines[0]


def samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} of every sample in a shard directory."""
    found: dict[str, dict[str, bytes]] = {}
    for entry in json.loads((out / "index.json").read_text())["shards"]:
        with tarfile.open(out / entry["name"]) as t:
            for m in t.getmembers():
                key, _, ext = m.name.partition(".")
                found.setdefault(key, {})[ext] = t.extractfile(m).read()
    return found


def labels_by_source(out: Path) -> dict[str, str]:
    return {
        json.loads(s["json"])["source"]: (s.get("cls") or s["labels"]).decode() for s in samples(out).values()
    }


def index_of(out: Path) -> dict:
    return json.loads((out / "index.json").read_text())


@pytest.fixture
def images(tmp_path) -> Path:
    """A folder of real JPEGs a list can name: img/0.jpg ... img/5.jpg."""
    d = tmp_path / "src" / "img"
    d.mkdir(parents=True)
    for i in range(6):
        (d / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    return d.parent


# ---- CSV lists ---------------------------------------------------------------------------------------------


def test_csv_integer_labels_stay_as_given_and_names_number_in_sorted_order(capsys, images, tmp_path):
    ids = images / "ids.csv"
    ids.write_text("path,label\nimg/0.jpg,7\nimg/1.jpg,3\n")
    rc, err = build(capsys, ids, tmp_path / "ids")
    assert rc == 0, err
    assert labels_by_source(tmp_path / "ids") == {"img/0.jpg": "7", "img/1.jpg": "3"}
    assert index_of(tmp_path / "ids")["num_classes"] == 8

    names = images / "names.csv"
    names.write_text("img/0.jpg,zebra\nimg/1.jpg,ant\nimg/2.jpg,moth\n")
    rc, err = build(capsys, names, tmp_path / "names")
    assert rc == 0, err
    assert labels_by_source(tmp_path / "names") == {"img/0.jpg": "2", "img/1.jpg": "0", "img/2.jpg": "1"}
    assert [c["name"] for c in index_of(tmp_path / "names")["classes"]] == ["ant", "moth", "zebra"]


def test_csv_mixing_ids_and_names_is_refused(capsys, images, tmp_path):
    lst = images / "mixed.csv"
    lst.write_text("img/0.jpg,3\nimg/1.jpg,cat\nimg/2.jpg,1\n")
    refused(capsys, lst, tmp_path / "out", f"{lst}: labels mix class ids and class names", "line 1", "line 2")


def test_csv_empty_label_is_refused_unless_declared_multi_label(capsys, images, tmp_path):
    lst = images / "empty.csv"
    lst.write_text("img/0.jpg,2\nimg/1.jpg,\nimg/2.jpg,1;3\n")
    refused(capsys, lst, tmp_path / "out", f"{lst}:2:", "img/1.jpg has an empty label", "--multi-label")
    rc, err = build(capsys, lst, tmp_path / "multi", "--multi-label")
    assert rc == 0, err
    index = index_of(tmp_path / "multi")
    assert index["labels"] == "labels" and index["build"]["multi_label"] is True
    assert labels_by_source(tmp_path / "multi") == {"img/0.jpg": "2", "img/1.jpg": "", "img/2.jpg": "1;3"}


@pytest.mark.parametrize(
    "label, needle",
    [
        ("1000000", "class id 1000000 is past the limit of 1,000,000 classes"),
        ("99999999999", "class id 99999999999 is past the limit"),
        ("2.5", "label '2.5' is neither a class id"),
        ("-1", "label '-1' is neither a class id"),
        ("1e3", "label '1e3' is neither a class id"),
        ("3;0x1F", "label '0x1F' is neither a class id"),
    ],
)
def test_csv_labels_that_are_not_class_ids_name_file_and_line(capsys, images, tmp_path, label, needle):
    lst = images / "bad.csv"
    lst.write_text(f"path,label\nimg/0.jpg,1\nimg/1.jpg,{label}\n")
    refused(capsys, lst, tmp_path / "out", f"{lst}:3:", needle)


def test_csv_that_is_not_text_or_not_rows_is_one_line(capsys, images, tmp_path):
    lst = images / "latin1.csv"
    lst.write_bytes("img/0.jpg,caf\xe9\n".encode("latin-1"))
    refused(capsys, lst, tmp_path / "a", f"{lst} is not UTF-8 text")
    lst = images / "short.csv"
    lst.write_text("img/0.jpg,1\nimg/1.jpg\n")
    refused(capsys, lst, tmp_path / "b", f"{lst}:2: expected `path,label`")


def test_csv_entries_outside_the_list_folder_are_refused_unless_allowed(capsys, images, tmp_path):
    secret = tmp_path / "secret.jpg"  # a file of the person running the build, beside the corpus
    secret.write_bytes(jpeg_bytes(9))
    for i, entry in enumerate(("../secret.jpg", str(secret), "img/../../secret.jpg")):
        lst = images / f"escape{i}.csv"
        lst.write_text(f"img/0.jpg,0\n{entry},1\n")
        before = tree(tmp_path)
        refused(capsys, lst, tmp_path / f"out{i}", f"{lst}:2:", f"resolves to {secret}", "--follow-links")
        assert written_outside(before, tree(tmp_path), f"out{i}") == []
    rc, err = build(capsys, images / "escape0.csv", tmp_path / "allowed", "--follow-links")
    assert rc == 0, err
    assert any(s.get("jpg") == secret.read_bytes() for s in samples(tmp_path / "allowed").values())


# ---- VTAB-1k task folders ----------------------------------------------------------------------------------


def vtab_folder(root: Path, name: str, lines: dict[str, str]) -> Path:
    d = root / name
    (d / "images").mkdir(parents=True)
    for i in range(4):
        (d / "images" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    for split in ("train800", "val200", "train800val200", "test"):
        (d / f"{split}.txt").write_text(lines.get(split, "images/0.jpg 0\n"))
    return d


def test_vtab_labels_are_checked_against_the_tasks_class_count(capsys, tmp_path):
    # DTD has 47 classes: a label 47 in its test list is a class that does not exist.
    task = vtab_folder(tmp_path, "dtd", {"test": "images/0.jpg 3\nimages/1.jpg 47\n"})
    refused(
        capsys, task, tmp_path / "out", f"{task / 'test.txt'}:2:", "not a class of VTAB-1k dtd, which has 47"
    )
    ok = vtab_folder(tmp_path / "ok", "dtd", {"test": "images/0.jpg 3\nimages/1.jpg 46\n"})
    rc, err = build(capsys, ok, tmp_path / "ok_out", "--split", "test")
    assert rc == 0, err
    assert labels_by_source(tmp_path / "ok_out") == {"images/0.jpg": "3", "images/1.jpg": "46"}


def test_vtab_unparsable_label_and_escaping_path_name_file_and_line(capsys, tmp_path):
    task = vtab_folder(tmp_path, "task", {"val200": "images/0.jpg 1\nimages/1.jpg one\n"})
    refused(capsys, task, tmp_path / "a", f"{task / 'val200.txt'}:2:", "label 'one' is not a class id")
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes(7))
    task = vtab_folder(tmp_path / "b", "task", {"test": "images/0.jpg 0\n../../outside.jpg 1\n"})
    refused(
        capsys,
        task,
        tmp_path / "b_out",
        f"{task / 'test.txt'}:2:",
        "outside the source directory",
        extra=("--split", "test"),
    )
    task = vtab_folder(tmp_path / "c", "task", {"test": "images/0.jpg 0\nimages/link.jpg 1\n"})
    (task / "images" / "link.jpg").symlink_to(tmp_path / "outside.jpg")
    refused(
        capsys, task, tmp_path / "c_out", f"{task / 'test.txt'}:2:", "resolves to", extra=("--split", "test")
    )


# ---- CIFAR -------------------------------------------------------------------------------------------------


def cifar10(root: Path, labels: list, **extra) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    data = np.stack([np.full(3072, 10 * i, np.uint8) for i in range(len(labels))])
    for name in ("data_batch_1", "test_batch"):
        batch = {b"data": data, b"labels": labels, b"filenames": [b"x.png"] * len(labels), **extra}
        (d / name).write_bytes(pickle.dumps(batch))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root


@pytest.mark.parametrize(
    "labels, needle",
    [
        ([0, 10], "labels of image 1 is 10, not a class id in [0, 10)"),
        ([0, -1], "labels of image 1 is -1"),
        ([0], "is not a list of 2 labels"),
    ],
)
def test_cifar_labels_are_checked_against_the_class_count(capsys, tmp_path, labels, needle):
    src = tmp_path / "cifar"
    cifar10(src, labels)
    if len(labels) == 1:  # one label for two images
        d = src / "cifar-10-batches-py"
        for name in ("data_batch_1", "test_batch"):
            batch = pickle.loads((d / name).read_bytes())
            batch[b"data"] = np.concatenate([batch[b"data"]] * 2)
            (d / name).write_bytes(pickle.dumps(batch))
    refused(capsys, src, tmp_path / "out", "data_batch_1", needle)


# ---- shards verify -----------------------------------------------------------------------------------------


def shard_set(
    d: Path, members: list[tuple[str, bytes, str, bytes]], *, labels: str, num_classes: int
) -> Path:
    """A shard directory written byte by byte (as another tool, or a tampered copy, would): samples of
    (key, image, label member name, label bytes), and an index.json that describes the shard."""
    import hashlib

    from vit_scale.data.tar import TAR_END, member_bytes

    d.mkdir(parents=True)
    data = (
        b"".join(
            member_bytes(f"{k}.jpg", image)
            + member_bytes(f"{k}.{kind}", text)
            + member_bytes(f"{k}.json", b"{}")
            for k, image, kind, text in members
        )
        + TAR_END
    )
    (d / "shard-000000.tar").write_bytes(data)
    entry = {
        "name": "shard-000000.tar",
        "samples": len(members),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    classes = [f"c{i}" for i in range(num_classes)]
    atomic_write_json(d / "index.json", make_index([entry], classes=classes, skipped=[], labels=labels))
    return d


def verify(capsys, d: Path) -> tuple[int, str]:
    rc = vit_scale(["shards", "verify", str(d)])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize(
    "label_kind, text, problem",
    [
        ("cls", b"5", "1 samples with a label outside [0, 5)"),
        ("cls", b"-2", "1 samples with a label outside [0, 5)"),
        ("cls", b"two", "1 samples with an unparsable label"),
        ("labels", b"1;3", "1 samples with a labels label in a set of cls labels"),
    ],
)
def test_shards_verify_checks_every_label_against_the_index(capsys, tmp_path, label_kind, text, problem):
    good = [(f"s{i}", jpeg_bytes(i), "cls", str(i).encode()) for i in range(3)]
    d = shard_set(
        tmp_path / "bad", [*good, ("s9", jpeg_bytes(9), label_kind, text)], labels="cls", num_classes=5
    )
    rc, out = verify(capsys, d)
    assert rc == 1 and problem in out and "(first: s9)" in out, out
    d = shard_set(tmp_path / "good", good, labels="cls", num_classes=5)
    rc, out = verify(capsys, d)
    assert rc == 0 and "every label a cls label in [0, 5)" in out, out


def test_shards_verify_checks_multi_labels_too(capsys, tmp_path):
    members = [("a", jpeg_bytes(0), "labels", b"0;4"), ("b", jpeg_bytes(1), "labels", b"2;7")]
    rc, out = verify(capsys, shard_set(tmp_path / "m", members, labels="labels", num_classes=5))
    assert rc == 1 and "1 samples with a label outside [0, 5) (first: b)" in out, out


# ---- links, devices, FIFOs ---------------------------------------------------------------------------------


def test_image_folder_lists_links_fifos_and_devices_as_skipped(capsys, tmp_path):
    root = image_folder(tmp_path / "src", {"cat": 2, "dog": 2})
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg_bytes(20))
    (root / "cat" / "outside.jpg").symlink_to(secret)
    (root / "cat" / "inside.jpg").symlink_to(root / "dog" / "img_000.jpg")
    os.link(root / "dog" / "img_001.jpg", root / "dog" / "hard.jpg")
    os.mkfifo(root / "dog" / "pipe.jpg")  # reading it would wait for a writer for ever
    (root / "bird").symlink_to(tmp_path, target_is_directory=True)
    expected = {
        "outside.jpg": "symbolic link (to",
        "inside.jpg": "symbolic link (to",
        "hard.jpg": "hard link (one of 2",
        "img_001.jpg": "hard link (one of 2",
        "pipe.jpg": "FIFO (not a regular file)",
        "bird": "symbolic link (to",
    }
    try:
        os.mknod(root / "dog" / "null.jpg", 0o600 | __import__("stat").S_IFCHR, os.makedev(1, 3))
        expected["null.jpg"] = "character device (not a regular file)"
    except PermissionError:
        pass  # not root: the FIFO stands for the special files
    before = tree(tmp_path)
    rc, err = build(capsys, root, tmp_path / "out")
    assert rc == 0, err
    index = index_of(tmp_path / "out")
    reasons = {Path(s["source"]).name: s["reason"] for s in index["skipped"]}
    for name, reason in expected.items():
        assert reasons[name].startswith(reason), (name, reasons)
    assert [c["name"] for c in index["classes"]] == ["cat", "dog"]
    assert secret.read_bytes() not in [s["jpg"] for s in samples(tmp_path / "out").values()]
    assert index["num_samples"] == 3  # cat's two regular files and dog's img_000
    assert written_outside(before, tree(tmp_path), "out") == []

    rc, err = build(capsys, root, tmp_path / "followed", "--follow-links")
    assert rc == 0, err
    assert secret.read_bytes() in [s["jpg"] for s in samples(tmp_path / "followed").values()]


def test_synset_tar_members_that_are_not_regular_files_are_listed_as_skipped(capsys, tmp_path):
    src = tmp_path / "in21k"
    src.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in (("n01_1.JPEG", jpeg_bytes(1)), ("n01_2.JPEG", jpeg_bytes(2))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, kind, target in (
            ("n01_link.JPEG", tarfile.SYMTYPE, "/etc/passwd"),
            ("n01_hard.JPEG", tarfile.LNKTYPE, "n01_1.JPEG"),
            ("n01_dev.JPEG", tarfile.CHRTYPE, ""),
            ("n01_fifo.JPEG", tarfile.FIFOTYPE, ""),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            t.addfile(info)
    (src / "n01.tar").write_bytes(buf.getvalue())
    rc, err = build(capsys, src, tmp_path / "out")
    assert rc == 0, err
    index = index_of(tmp_path / "out")
    reasons = {s["source"]: s["reason"] for s in index["skipped"]}
    assert reasons == {
        "n01/n01_link.JPEG": "symbolic link member (to /etc/passwd; not a regular file)",
        "n01/n01_hard.JPEG": "hard link member (to n01_1.JPEG; not a regular file)",
        "n01/n01_dev.JPEG": "device member (not a regular file)",
        "n01/n01_fifo.JPEG": "FIFO member (not a regular file)",
    }
    assert index["num_samples"] == 2


def test_shards_verify_lists_link_members(capsys, tmp_path):
    d = shard_set(tmp_path / "s", [("a", jpeg_bytes(0), "cls", b"0")], labels="cls", num_classes=2)
    shard = d / "shard-000000.tar"
    with tarfile.open(shard, "a") as t:
        info = tarfile.TarInfo("b.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
        t.addfile(info)
    rc, out = verify(capsys, d)
    assert rc == 1 and "1 members skipped, not regular files: b.jpg (symbolic link to /etc/shadow)" in out, (
        out
    )


# ---- keys ----------------------------------------------------------------------------------------------------


def test_names_that_map_to_one_key_all_become_samples_and_non_ascii_names_are_kept(capsys, tmp_path):
    root = tmp_path / "src"
    (root / "猫").mkdir(parents=True)
    names = [
        "a b.jpg",
        "a_b.jpg",
        "a.b.jpg",
        "写真 1.jpg",
        "写真_1.jpg",
        "🐱.jpg",
        "🐶.jpg",
        "x" * 200 + ".jpg",
    ]
    for i, name in enumerate(names):
        (root / "猫" / name).write_bytes(jpeg_bytes(i))
    rc, err = build(capsys, root, tmp_path / "out")
    assert rc == 0, err
    index = index_of(tmp_path / "out")
    assert index["num_samples"] == len(names) and index["skipped"] == []
    found = samples(tmp_path / "out")
    assert {json.loads(s["json"])["source"] for s in found.values()} == {f"猫/{n}" for n in names}
    assert all(len(k.encode()) <= 80 for k in found)
    assert "猫_a_b_jpg" not in found  # the colliding pair both carry hashed keys ...
    assert sum(k.startswith("猫_写真_1_jpg~") for k in found) == 2  # ... readable up to the hash
    assert make_key("猫/写真.jpg") == "猫_写真_jpg"
