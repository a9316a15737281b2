"""One tar reader for every user: the pipeline, `shards verify`, `shards stats` and the writer's own shards
agree with WebDataset on what the samples of a tar are, and damaged tars give the same clear errors."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from data_helpers import jpeg_bytes
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from vit_scale.config.schema import DataConfig
from vit_scale.data.loader import make_loader
from vit_scale.data.shards import ShardWriter, make_index
from vit_scale.data.stats import shard_stats
from vit_scale.data.streams import BAD, read_shard
from vit_scale.data.tar import split_key, tar_members, tar_samples
from vit_scale.data.verify import verify_shard
from vit_scale.io import atomic_write_json

LONG = "sub/" + "l" * 120  # past ustar's 100-byte name field: a GNU long-name or pax record


def other_writers_members() -> list[tuple[str, bytes]]:
    """Names another WebDataset writer may use: dotted directories, multi-part and upper-case extensions,
    metadata, members with no extension; the labels are 0..4 in order."""
    return [
        ("__meta__", b"skipped: top-level metadata"),
        ("__info__/x.json", b"skipped: a metadata directory"),
        ("d.x/a.jpg", jpeg_bytes(0)),
        ("d.x/a.cls", b"0"),
        ("d.x/b.JPG", jpeg_bytes(1)),
        ("d.x/b.cls", b"1"),
        ("c.jpg", jpeg_bytes(2)),
        ("c.cls", b"2"),
        ("c.seg.png", b"a second member of sample c"),
        ("README", b"no extension: no sample"),
        (LONG + ".jpg", jpeg_bytes(3)),
        (LONG + ".cls", b"3"),
        ("e.jpg", jpeg_bytes(4)),
        ("e.cls", b"4"),
    ]


def write_tar(path: Path, files, fmt=tarfile.GNU_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as t:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("a_directory")
        d.type = tarfile.DIRTYPE
        t.addfile(d)


def shard_dir(directory: Path, files, fmt=tarfile.GNU_FORMAT) -> tuple[Path, dict]:
    """A shard directory holding one tar of `files` and an index.json that describes it."""
    directory.mkdir()
    path = directory / "shard-000000.tar"
    write_tar(path, files, fmt)
    data = path.read_bytes()
    entry = {"name": path.name, "samples": 5, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    index = make_index([entry], classes=[f"c{i}" for i in range(5)], skipped=[])
    atomic_write_json(directory / "index.json", index)
    return path, entry


def as_webdataset_reads(path: Path) -> list[tuple[str, dict]]:
    with open(path, "rb") as f:
        samples = group_by_keys(tar_file_expander([{"url": str(path), "stream": f}]))
        return [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in samples]


def plain(samples) -> list[tuple[str, dict]]:
    return [(s["__key__"], {k: v for k, v in s.items() if k != "__key__"}) for s in samples]


def keys(samples) -> list:
    return [s if s is BAD else s["__key__"] for s in samples]


def test_the_key_rule_is_webdatasets():
    names = [
        "a.jpg", "a.seg.png", "dir/a.jpg", "d.x/a.jpg", "d.x/a.b.c", "a/b.c/d.e.f", "README", "dir/README",
        "d.x/README", ".jpg", "x/.jpg", "a..b", "a.", "a/b/", "__meta__", "UPPER.JPG", "sp ace.j pg",
    ]  # fmt: skip
    for name in names:
        assert split_key(name) == base_plus_ext(name), name
    assert split_key("d.x/a.seg.png") == ("d.x/a", "seg.png")


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_every_reader_sees_the_samples_webdataset_sees(tmp_path, fmt):
    path, entry = shard_dir(tmp_path / "shards", other_writers_members(), fmt)
    expected = as_webdataset_reads(path)
    assert [k for k, _ in expected] == ["d.x/a", "d.x/b", "c", LONG, "e"]
    assert set(expected[1][1]) == {"jpg", "cls"} and set(expected[2][1]) == {"jpg", "cls", "seg.png"}

    with open(path, "rb") as f:
        assert plain(tar_samples(f)) == expected
    assert plain(read_shard(str(path), None)) == expected
    assert plain(read_shard(f"pipe:cat {path}", 5)) == expected
    assert verify_shard(path, entry) == []  # counts 5 samples, as the index says, all decoding
    stats = shard_stats(tmp_path / "shards")
    assert stats["per_class"] == Counter(range(5)) and stats["unreadable"] == []
    assert stats["image_bytes"] == sum(len(s["jpg"]) for _, s in expected)
    loader = make_loader(
        str(tmp_path / "shards"), DataConfig(workers=0), train=False, img_size=8, batch_size=8
    )
    assert [y for _, ys in loader for y in ys.tolist()] == [0, 1, 2, 3, 4]


def test_the_writers_shards_read_back_as_written(tmp_path):
    written = [(f"k{i}", jpeg_bytes(i), i % 3, {"source": f"f{i}"}) for i in range(5)]
    with ShardWriter(tmp_path, shard_size=5, classes=["a", "b", "c"]) as w:
        for key, image, label, meta in written:
            w.write(key, image, "jpg", label, meta)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard) as t:  # an independent reader: every member is where tarfile finds it
        from_tarfile = [(m.name, t.extractfile(m).read()) for m in t]
    assert list(tar_members(io.BytesIO(shard.read_bytes()))) == from_tarfile
    got = plain(tar_samples(io.BytesIO(shard.read_bytes())))
    assert [(k, s["jpg"], int(s["cls"])) for k, s in got] == [(k, im, lab) for k, im, lab, _ in written]
    assert all(set(s) == {"jpg", "cls", "json"} for _, s in got)
    assert plain(read_shard(str(shard), 5)) == got == as_webdataset_reads(shard)


def test_a_truncated_or_damaged_tar_reads_the_same_to_every_user(tmp_path):
    path, entry = shard_dir(tmp_path / "shards", other_writers_members())
    good = path.read_bytes()
    with tarfile.open(path) as t:
        cut = t.getmember("c.jpg").offset_data + 10  # inside the third sample's image
    # Sample d.x/b is lost with it: no reader can tell whether more of its members were coming.
    path.write_bytes(good[:cut])
    with open(path, "rb") as f, pytest.raises(ValueError, match="tar stream ends inside a member"):
        list(tar_samples(f))
    problems = verify_shard(path, entry)
    assert "unreadable tar (tar stream ends inside a member)" in problems
    assert "1 samples != 5" in problems and "sha256 mismatch" in problems
    stats = shard_stats(tmp_path / "shards")
    assert stats["per_class"] == Counter([0]) and stats["unreadable"] == [path.name]
    # The pipeline keeps the index's positions: the samples it lost are counted bad.
    assert keys(read_shard(str(path), 5)) == ["d.x/a", BAD, BAD, BAD, BAD]
    assert keys(read_shard(str(path), None)) == ["d.x/a", BAD]

    flipped = bytearray(good)
    flipped[3] ^= 1  # inside the first header's name
    path.write_bytes(bytes(flipped))
    assert "unreadable tar (tar header checksum mismatch)" in verify_shard(path, entry)
    assert list(read_shard(str(path), 5)) == [BAD] * 5


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile_on_other_writers_archives(fmt):
    files = [
        ("a.jpg", jpeg_bytes(0)),
        ("sub/" + "d" * 90 + "/b.cls", b"3"),
        ("__meta__", b"skip"),
        ("c.json", b"{}"),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("a_directory")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
    raw = buf.getvalue()
    assert list(tar_members(io.BytesIO(raw))) == [f for f in files if f[0] != "__meta__"]
    with pytest.raises(ValueError, match="ends inside"):
        list(tar_members(io.BytesIO(raw[:2000])))
    flipped = bytearray(raw)
    flipped[3] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(flipped))))
