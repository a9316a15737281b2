"""Image corpora as they come: ImageFolder trees, ImageNet-21k synset tars, CIFAR pickles, VTAB-1k task
folders, CSV/TSV lists. Each becomes a list of `Item`s in a fixed order, with its classes.

Enumeration is cheap (names only; tar members are listed by seeking over their data), so the order can be
fixed up front: a held-out split, a SLURM array part and a resumed build all index into the same list.
Reading an item's bytes happens later, in order, in `read_items`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import pickle
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vit_scale.data.shards import make_key
from vit_scale.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
FORMATS = ("imagefolder", "in21k", "cifar", "vtab", "csv")
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")


@dataclass
class Item:
    """One input: where its bytes are (a file, a member of a synset tar, or in memory) and its label."""

    key: str
    label: int | list[int]
    source: str
    path: str = ""  # a file, or the synset tar holding `member`
    member: str = ""  # inside `path` (a synset tar) ...
    outer_member: str = ""  # ... which may itself be a member of the release tar `outer`
    outer: str = ""
    data: bytes | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Corpus:
    format: str
    items: list[Item]
    classes: list[dict]
    empty_classes: list[str] = field(default_factory=list)
    unusable: list[dict] = field(default_factory=list)  # inputs known bad at listing time: {source, reason}


def detect_format(src: Path) -> str:
    if not src.exists():
        raise UserError(f"source {src} does not exist")
    if src.is_file():
        if src.suffix == ".tar":
            return "in21k"
        if src.suffix.lower() in (".csv", ".tsv", ".txt"):
            return "csv"
        raise UserError(f"cannot tell the format of {src}; name it with --format ({', '.join(FORMATS)})")
    names = {p.name for p in src.iterdir()}
    if any(f"{s}.txt" in names for s in VTAB_SPLITS):
        return "vtab"
    if (
        {"cifar-10-batches-py", "cifar-100-python"} & names
        or "data_batch_1" in names
        or {"train", "meta"} <= names
    ):
        return "cifar"
    if any(n.endswith(".tar") for n in names) and not any(p.is_dir() for p in src.iterdir()):
        return "in21k"
    return "imagefolder"


def load_corpus(src: str | Path, fmt: str = "", split: str = "") -> Corpus:
    src = Path(src)
    fmt = fmt or detect_format(src)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not src.exists():
        raise UserError(f"source {src} does not exist")
    return {"imagefolder": image_folder, "in21k": in21k, "cifar": cifar, "vtab": vtab, "csv": csv_list}[fmt](
        src, split
    )


# ---- ImageFolder --------------------------------------------------------------------------------------------


def image_folder(root: Path, split: str = "") -> Corpus:
    if not root.is_dir():
        raise UserError(f"ImageFolder source {root} is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(f"{root} has no class directories; an ImageFolder tree is ROOT/CLASS/IMAGE")
    items, empty, unusable = [], [], []
    for cid, d in enumerate(class_dirs):
        files = sorted(p for p in d.rglob("*") if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        for p in files:
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                unusable.append(
                    {"source": str(p), "reason": f"not an image file ({p.suffix or 'no suffix'})"}
                )
        if not images:
            empty.append(d.name)
        for p in images:
            rel = p.relative_to(root)
            items.append(Item(key=make_key(str(rel)), label=cid, source=str(rel), path=str(p)))
    classes = [{"id": i, "name": d.name} for i, d in enumerate(class_dirs)]
    return Corpus("imagefolder", items, classes, empty, unusable)


# ---- ImageNet-21k release tars ----------------------------------------------------------------------------


def in21k(src: Path, split: str = "") -> Corpus:
    """`fall11_whole.tar`-style release (a tar of `nXXXXXXXX.tar` synset tars) or a directory of synset tars.

    Tar members are listed by seeking over their data (an uncompressed tar on disk), so listing a
    1.3 TB release reads only its headers; image bytes are streamed later without unpacking to disk.
    """
    with _Tars() as tars:
        if src.is_file():
            try:
                outer = tars.outer_members(str(src))
            except tarfile.TarError as e:
                raise UserError(f"{src} is not a readable tar archive ({e})") from None
            synsets = [(Path(n).stem, str(src), n) for n in outer if n.endswith(".tar")]
        else:
            synsets = [(p.stem, "", str(p)) for p in src.glob("*.tar")]
        if not synsets:
            raise UserError(f"{src} holds no synset tars (members like n01440764.tar)")
        synsets.sort()
        items, empty, unusable = [], [], []
        classes = [{"id": i, "name": wnid, "wnid": wnid} for i, (wnid, _, _) in enumerate(synsets)]
        for cid, (wnid, outer_path, where) in enumerate(synsets):
            try:
                members = sorted(tars.synset(outer_path, where))
            except tarfile.TarError as e:
                unusable.append({"source": f"{wnid}.tar", "reason": f"unreadable synset tar ({e})"})
                empty.append(wnid)
                continue
            names = [m for m in members if Path(m).suffix.lower() in IMAGE_SUFFIXES]
            unusable += [
                {"source": f"{wnid}/{m}", "reason": f"not an image file ({Path(m).suffix or 'no suffix'})"}
                for m in members
                if Path(m).suffix.lower() not in IMAGE_SUFFIXES
            ]
            if not names:
                empty.append(wnid)
            for m in names:
                item = Item(
                    key=make_key(Path(m).stem), label=cid, source=f"{wnid}/{m}", member=m, meta={"wnid": wnid}
                )
                if outer_path:
                    item.outer, item.outer_member = outer_path, where
                else:
                    item.path = where
                items.append(item)
    return Corpus("in21k", items, classes, empty, unusable)


class _Tars:
    """Tar files read in place with each member table built once: a release tar of 21k synset tars is
    scanned once, not once per synset, and only one synset tar is open at a time."""

    def __init__(self):
        self._outer: dict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}
        self._synset: tuple[tuple[str, str], tarfile.TarFile, dict[str, tarfile.TarInfo]] | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._synset is not None:
            self._synset[1].close()
        for tar, _ in self._outer.values():
            tar.close()

    def outer_members(self, path: str) -> list[str]:
        if path not in self._outer:
            tar = tarfile.open(path, "r:")
            self._outer[path] = (tar, {m.name: m for m in tar.getmembers() if m.isfile()})
        return list(self._outer[path][1])

    def synset(self, outer: str, where: str) -> dict[str, tarfile.TarInfo]:
        """Member table of a synset tar: `where` inside the release tar `outer`, or the file `where`."""
        if self._synset is None or self._synset[0] != (outer, where):
            if self._synset is not None:
                self._synset[1].close()
                self._synset = None
            if outer:
                self.outer_members(outer)
                tar, members = self._outer[outer]
                t = tarfile.open(fileobj=tar.extractfile(members[where]), mode="r:")
            else:
                t = tarfile.open(where, "r:")
            self._synset = ((outer, where), t, {m.name: m for m in t.getmembers() if m.isfile()})
        return self._synset[2]

    def read(self, item: Item) -> bytes:
        where = item.outer_member if item.outer else item.path
        members = self.synset(item.outer, where)
        return self._synset[1].extractfile(members[item.member]).read()


# ---- CIFAR --------------------------------------------------------------------------------------------------


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # truncated or foreign files: say which one
        raise UserError(f"{path} is not a CIFAR python pickle ({type(e).__name__}: {e})") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def cifar(src: Path, split: str = "") -> Corpus:
    """CIFAR-10 (`data_batch_*`, `test_batch`, `batches.meta`) or CIFAR-100 (`train`, `test`, `meta`).

    Images are stored as PNG (the originals are raw pixels; PNG keeps them exact). CIFAR-100 keeps the
    fine label as the class and the coarse label as metadata.
    """
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if (src / sub).is_dir():
            src = src / sub
    split = split or "train"
    if split in HOLDOUT_SPLITS:  # a dev split is held out of train (the paper: 2% of CIFAR's training set)
        split = "train"
    if split not in ("train", "test"):
        raise UserError(f"--split {split!r}: CIFAR has 'train' and 'test' (and 'val' with --val-holdout N)")
    if (src / "meta").exists():
        meta = _unpickle(src / "meta")
        files, label_key = [src / split], "fine_labels"
        names = [n.decode() for n in meta["fine_label_names"]]
        coarse_names = [n.decode() for n in meta["coarse_label_names"]]
        kind = "cifar100"
    elif (src / "batches.meta").exists():
        meta = _unpickle(src / "batches.meta")
        files = sorted(src.glob("data_batch_*")) if split == "train" else [src / "test_batch"]
        label_key, coarse_names, kind = "labels", None, "cifar10"
        names = [n.decode() for n in meta["label_names"]]
    else:
        raise UserError(f"{src} is not a CIFAR python folder (no meta or batches.meta)")
    items = []
    for f in files:
        if not f.exists():
            raise UserError(f"CIFAR file {f} is missing; the folder should be the official python release")
        d = _unpickle(f)
        data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = d[label_key]
        coarse = d.get("coarse_labels")
        filenames = d.get("filenames")
        for i in range(len(labels)):
            buf = io.BytesIO()
            Image.fromarray(data[i]).save(buf, format="PNG")
            meta_i = {"index": i, "batch": f.name}
            if filenames is not None:
                meta_i["filename"] = filenames[i].decode()
            if coarse is not None:
                meta_i["coarse_label"] = int(coarse[i])
                meta_i["coarse_name"] = coarse_names[coarse[i]]
            items.append(
                Item(
                    key=f"{kind}_{split}_{f.name.replace('_', '')}_{i:05d}",
                    label=int(labels[i]),
                    source=f"{f.name}[{i}]",
                    data=buf.getvalue(),
                    meta=meta_i,
                )
            )
    classes = [{"id": i, "name": n} for i, n in enumerate(names)]
    return Corpus(kind, items, classes)


# ---- VTAB-1k ------------------------------------------------------------------------------------------------


def _read_list(path: Path) -> list[tuple[str, str]]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise UserError(f"{path}:{n}: expected `relative/path label`, got {line!r}")
        rows.append((parts[0], parts[1]))
    return rows


def vtab(src: Path, split: str = "") -> Corpus:
    """A VTAB-1k task folder: images plus train800.txt, val200.txt, train800val200.txt, test.txt."""
    split = split or "train800val200"
    if split not in VTAB_SPLITS:
        raise UserError(f"--split {split!r}: VTAB-1k splits are {', '.join(VTAB_SPLITS)}")
    lst = src / f"{split}.txt"
    if not lst.exists():
        raise UserError(
            f"{lst} is missing; a VTAB-1k task folder has {', '.join(s + '.txt' for s in VTAB_SPLITS)}"
        )
    # Class ids over every list of the task, so all splits agree on the number of classes.
    all_labels = {
        int(lab)
        for s in VTAB_SPLITS
        if (src / f"{s}.txt").exists()
        for _, lab in _read_list(src / f"{s}.txt")
    }
    items = []
    for rel, lab in _read_list(lst):
        items.append(Item(key=make_key(rel), label=int(lab), source=rel, path=str(src / rel)))
    classes = [{"id": i, "name": str(i)} for i in range(max(all_labels) + 1)] if all_labels else []
    return Corpus("vtab", items, classes)


# ---- CSV / TSV lists ----------------------------------------------------------------------------------------


def csv_list(src: Path, split: str = "") -> Corpus:
    """`path,label` rows (tab-separated for .tsv); a label may be multi-label as `3;17;2041`.

    Integer labels are class ids; other labels are class names, numbered in sorted order. A first row whose
    label is not a label (a header) is skipped.
    """
    text = src.read_text()
    delim = "\t" if src.suffix.lower() == ".tsv" or ("\t" in text and "," not in text) else ","
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delim) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]
    if not rows:
        raise UserError(f"{src} lists no images; expected `path{delim}label` rows")
    for n, r in enumerate(rows, 1):
        if len(r) < 2:
            raise UserError(f"{src} row {n}: expected `path{delim}label`, got {delim.join(r)!r}")
    raw = [[x.strip() for x in r[1].split(";") if x.strip()] for r in rows]
    multi = any(len(x) != 1 for x in raw)
    numeric = all(x.lstrip("-").isdigit() for labs in raw for x in labs)
    if numeric:
        ids = [[int(x) for x in labs] for labs in raw]
        if any(i < 0 for labs in ids for i in labs):
            raise UserError(f"{src}: labels must be non-negative class ids")
        top = max((i for labs in ids for i in labs), default=-1)
        classes = [{"id": i, "name": str(i)} for i in range(top + 1)]
    else:
        names = sorted({x for labs in raw for x in labs})
        lookup = {n: i for i, n in enumerate(names)}
        ids = [[lookup[x] for x in labs] for labs in raw]
        classes = [{"id": i, "name": n} for i, n in enumerate(names)]
    items = []
    for r, labs in zip(rows, ids):
        rel = r[0].strip()
        p = Path(rel) if Path(rel).is_absolute() else src.parent / rel
        items.append(Item(key=make_key(rel), label=labs if multi else labs[0], source=rel, path=str(p)))
    return Corpus("csv", items, classes)


# ---- selection and reading ----------------------------------------------------------------------------------


def _rank_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


HOLDOUT_SPLITS = ("val", "validation", "holdout", "minival")


def select(items: list[Item], *, holdout: int, split: str, part: int, parts: int) -> list[Item]:
    """The items one build writes: a fixed held-out subset (or its complement), then one array part.

    The held-out set is the `holdout` items whose keys hash lowest: fixed for a corpus, spread over all
    classes, and independent of listing order (big_vision holds out a fixed 51,200 images of IN-21k).
    """
    if split in HOLDOUT_SPLITS and not holdout:
        raise UserError(f"--split {split} writes the held-out images: give their number with --val-holdout N")
    if holdout:
        if holdout >= len(items):
            raise UserError(f"--val-holdout {holdout} is not smaller than the corpus ({len(items)} images)")
        held = {id(it) for it in sorted(items, key=lambda it: _rank_key(it.key))[:holdout]}
        want_held = split in HOLDOUT_SPLITS
        items = [it for it in items if (id(it) in held) == want_held]
    if parts > 1:
        items = items[part::parts]
    return items


def read_items(items: list[Item]) -> Iterator[tuple[Item, bytes | None, str]]:
    """(item, bytes, error) in order; bytes is None and error says why when the input cannot be read.

    Synset tars are read member by member where they lie, never unpacked.
    """
    with _Tars() as tars:
        for it in items:
            if it.data is not None:
                yield it, it.data, ""
            elif it.member:
                try:
                    yield it, tars.read(it), ""
                except (tarfile.TarError, OSError, KeyError) as e:
                    yield it, None, f"unreadable tar member ({e})"
            else:
                try:
                    yield it, Path(it.path).read_bytes(), ""
                except OSError as e:
                    yield it, None, f"unreadable file ({e.strerror or e})"
