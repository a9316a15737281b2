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
import os
import pickle
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vit_scale.config.tasks import VTAB_TASKS, canonical
from vit_scale.data.shards import make_key, unique_key
from vit_scale.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
FORMATS = ("imagefolder", "in21k", "cifar", "vtab", "csv")
VTAB_SPLITS = ("train800", "val200", "train800val200", "test")
# Beyond any real corpus (ImageNet-21k has 21,843 classes): a larger id is a typo or a hostile list, and
# the class table it implies would not fit in memory.
MAX_CLASSES = 10**6
FOLLOW_HINT = "--follow-links reads it"


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


def load_corpus(
    src: str | Path, fmt: str = "", split: str = "", *, multi_label: bool = False, follow_links: bool = False
) -> Corpus:
    """The corpus at `src`. Only regular files inside `src` are read unless `follow_links`: symbolic and
    hard links are listed as skipped, and list entries that lead outside the source are refused, so a
    corpus from someone else cannot make a build read (and publish in shards) files it does not hold."""
    src = Path(src)
    fmt = fmt or detect_format(src)
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not src.exists():
        raise UserError(f"source {src} does not exist")
    if multi_label and fmt != "csv":
        raise UserError(f"--multi-label applies to CSV lists; {src} is a {fmt} source")
    if fmt == "csv":
        corpus = csv_list(src, split, follow_links=follow_links, multi_label=multi_label)
    else:
        reader = {"imagefolder": image_folder, "in21k": in21k, "cifar": cifar, "vtab": vtab}[fmt]
        corpus = reader(src, split, follow_links=follow_links)
    _unique_keys(corpus.items)
    return corpus


def _unique_keys(items: list[Item]) -> None:
    """Give every input a key of its own: names that map to one key (`a b.jpg`, `a_b.jpg`, or two names in
    a script `make_key` drops) each get the hashed form instead of all but the first being lost."""
    counts: dict[str, int] = {}
    for it in items:
        counts[it.key] = counts.get(it.key, 0) + 1
    for it in items:
        if counts[it.key] > 1:
            it.key = unique_key(it.key, it.source)


# ---- files: what is read, what is listed as skipped ------------------------------------------------------


def _special_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISDIR, "directory"),
    ):
        if test(mode):
            return kind
    return "" if stat.S_ISREG(mode) else "special file"


def skip_reason(path: Path, follow_links: bool) -> str:
    """Why the input at `path` is not read ('' when it is): links unless followed, and anything that is
    not a regular file (reading a FIFO blocks for ever, a device never ends)."""
    try:
        st = os.lstat(path)
    except OSError:
        return ""  # missing: reading it reports that
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        if not follow_links:
            return f"symbolic link (to {target}; not followed, {FOLLOW_HINT})"
        try:
            st = os.stat(path)
        except OSError:
            return f"broken symbolic link (to {target})"
    kind = _special_kind(st.st_mode)
    if kind:
        return f"{kind} (not a regular file)"
    if st.st_nlink > 1 and not follow_links:
        return f"hard link (one of {st.st_nlink} names of one file; not followed, {FOLLOW_HINT})"
    return ""


def _check_inside(root: Path, path: Path, where: str, follow_links: bool) -> None:
    """Refuse a list entry that resolves outside the source directory, unless links are followed."""
    if follow_links:
        return
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(os.path.realpath(root)):
        raise UserError(
            f"{where}: {path} resolves to {real}, outside the source directory {root}; a list from someone "
            f"else could point at your files: move it inside, or pass --follow-links to read it"
        )


def _tree(root: Path, follow_links: bool) -> list[Path]:
    """Every entry below `root` that is not a directory being descended: files, and links to directories
    when links are not followed (so they are listed as skipped). Directory cycles are walked once."""
    out, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_links):
        if follow_links:
            real = os.path.realpath(dirpath)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
        out += [
            Path(dirpath, d)
            for d in dirnames
            if not follow_links and os.path.islink(os.path.join(dirpath, d))
        ]
        out += [Path(dirpath, f) for f in filenames]
    return sorted(out)


# ---- ImageFolder --------------------------------------------------------------------------------------------


def image_folder(root: Path, split: str = "", *, follow_links: bool = False) -> Corpus:
    if not root.is_dir():
        raise UserError(f"ImageFolder source {root} is not a directory")
    items, empty, unusable, class_dirs = [], [], [], []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not p.is_dir():
            continue
        if p.is_symlink() and not follow_links:
            unusable.append(
                {
                    "source": p.name,
                    "reason": f"symbolic link (to {os.readlink(p)}; not followed, {FOLLOW_HINT})",
                }
            )
        else:
            class_dirs.append(p)
    if not class_dirs:
        raise UserError(f"{root} has no class directories; an ImageFolder tree is ROOT/CLASS/IMAGE")
    for cid, d in enumerate(class_dirs):
        images = []
        for p in _tree(d, follow_links):
            reason = skip_reason(p, follow_links)
            if not reason and p.suffix.lower() not in IMAGE_SUFFIXES:
                reason = f"not an image file ({p.suffix or 'no suffix'})"
            if reason:
                unusable.append({"source": str(p), "reason": reason})
            else:
                images.append(p)
        if not images:
            empty.append(d.name)
        for p in images:
            rel = p.relative_to(root)
            items.append(Item(key=make_key(str(rel)), label=cid, source=str(rel), path=str(p)))
    classes = [{"id": i, "name": d.name} for i, d in enumerate(class_dirs)]
    return Corpus("imagefolder", items, classes, empty, unusable)


# ---- ImageNet-21k release tars ----------------------------------------------------------------------------


def in21k(src: Path, split: str = "", *, follow_links: bool = False) -> Corpus:
    """`fall11_whole.tar`-style release (a tar of `nXXXXXXXX.tar` synset tars) or a directory of synset tars.

    Tar members are listed by seeking over their data (an uncompressed tar on disk), so listing a
    1.3 TB release reads only its headers; image bytes are streamed later without unpacking to disk.
    """
    items, empty, unusable = [], [], []
    with _Tars() as tars:
        if src.is_file():
            try:
                outer = tars.outer_members(str(src))
            except tarfile.TarError as e:
                raise UserError(f"{src} is not a readable tar archive ({e})") from None
            synsets = [(Path(n).stem, str(src), n) for n in outer if n.endswith(".tar")]
            unusable += tars.skipped.pop(str(src), [])
        else:
            synsets = []
            for p in sorted(src.glob("*.tar")):
                reason = skip_reason(p, follow_links)
                if reason:
                    unusable.append({"source": p.name, "reason": reason})
                else:
                    synsets.append((p.stem, "", str(p)))
        if not synsets:
            raise UserError(f"{src} holds no synset tars (members like n01440764.tar)")
        synsets.sort()
        classes = [{"id": i, "name": wnid, "wnid": wnid} for i, (wnid, _, _) in enumerate(synsets)]
        for cid, (wnid, outer_path, where) in enumerate(synsets):
            try:
                members = sorted(tars.synset(outer_path, where))
            except tarfile.TarError as e:
                unusable.append({"source": f"{wnid}.tar", "reason": f"unreadable synset tar ({e})"})
                empty.append(wnid)
                continue
            unusable += [
                {"source": f"{wnid}/{u['source']}", "reason": u["reason"]} for u in tars.synset_skipped
            ]
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
        self.skipped: dict[str, list[dict]] = {}  # per release tar: members that are not regular files
        self.synset_skipped: list[dict] = []  # the same for the synset tar opened last

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
            members, self.skipped[path] = _regular_members(tar)
            self._outer[path] = (tar, members)
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
            members, self.synset_skipped = _regular_members(t)
            self._synset = ((outer, where), t, members)
        return self._synset[2]

    def read(self, item: Item) -> bytes:
        where = item.outer_member if item.outer else item.path
        members = self.synset(item.outer, where)
        return self._synset[1].extractfile(members[item.member]).read()


def _regular_members(tar: tarfile.TarFile) -> tuple[dict[str, tarfile.TarInfo], list[dict]]:
    """(regular members by name, [{source, reason}] for links, devices and FIFOs); directories are
    structure, not inputs. A link member is never resolved: it could name anything on the build host."""
    members, skipped = {}, []
    for m in tar.getmembers():
        if m.isfile():
            members[m.name] = m
        elif m.issym():
            skipped.append(
                {"source": m.name, "reason": f"symbolic link member (to {m.linkname}; not a regular file)"}
            )
        elif m.islnk():
            skipped.append(
                {"source": m.name, "reason": f"hard link member (to {m.linkname}; not a regular file)"}
            )
        elif not m.isdir():
            kind = "FIFO" if m.isfifo() else "device" if m.isdev() else f"type {m.type!r}"
            skipped.append({"source": m.name, "reason": f"{kind} member (not a regular file)"})
    return members, skipped


# ---- CIFAR --------------------------------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR's python release holds: dicts, lists, str, bytes, ints and numpy arrays.

    A pickle names the functions it calls; anything outside the few that rebuild a numpy array (and the
    latin-1 decoding protocol 2 uses for bytes) is refused before it runs, so a planted file cannot run code.
    """

    # numpy's array rebuilders, wherever this numpy keeps them: protocols 2-4, and 5's buffer form
    _RECONSTRUCT = np.zeros(0).__reduce__()[0]
    _FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # pickled by numpy 1 (the release itself)
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # pickled by numpy 2
        ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
        ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}") from None


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"it asks for _codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _plain(obj) -> bool:
    """True for CIFAR's kinds of values: dicts, lists, str, bytes, ints, numeric numpy arrays."""
    if isinstance(obj, dict):
        return all(isinstance(k, (str, bytes)) and _plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.dtype.kind in "biuf"
    return isinstance(obj, (str, bytes, int))


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path}: refused to read this pickle ({e}); CIFAR files hold only dicts, lists, str, bytes, ints "
            "and numpy arrays, so this one is not from the official release and may be hostile"
        ) from None
    except Exception as e:  # truncated or foreign files: say which one
        detail = " ".join(str(e).split())[:200]
        raise UserError(f"{path} is not a CIFAR python pickle ({type(e).__name__}: {detail})") from None
    if not isinstance(d, dict) or not _plain(d):
        raise UserError(
            f"{path} is not a CIFAR python pickle: it holds values other than dicts, lists, str, bytes, ints "
            "and numeric numpy arrays"
        )
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def cifar(src: Path, split: str = "", *, follow_links: bool = False) -> Corpus:
    """CIFAR-10 (`data_batch_*`, `test_batch`, `batches.meta`) or CIFAR-100 (`train`, `test`, `meta`).

    Images are stored as PNG (the originals are raw pixels; PNG keeps them exact). CIFAR-100 keeps the
    fine label as the class and the coarse label as metadata.
    """
    root = src
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if (src / sub).is_dir():
            src = src / sub
    split = split or "train"
    if split in HOLDOUT_SPLITS:  # a dev split is held out of train (the paper: 2% of CIFAR's training set)
        split = "train"
    if split not in ("train", "test"):
        raise UserError(f"--split {split!r}: CIFAR has 'train' and 'test' (and 'val' with --val-holdout N)")
    if (src / "meta").exists():
        meta = _unpickle(_cifar_file(root, src / "meta", follow_links))
        files, label_key = [src / split], "fine_labels"
        names = _cifar_names(src / "meta", meta, "fine_label_names")
        coarse_names = _cifar_names(src / "meta", meta, "coarse_label_names")
        kind = "cifar100"
    elif (src / "batches.meta").exists():
        meta = _unpickle(_cifar_file(root, src / "batches.meta", follow_links))
        files = sorted(src.glob("data_batch_*")) if split == "train" else [src / "test_batch"]
        label_key, coarse_names, kind = "labels", None, "cifar10"
        names = _cifar_names(src / "batches.meta", meta, "label_names")
    else:
        raise UserError(f"{src} is not a CIFAR python folder (no meta or batches.meta)")
    items = []
    for f in files:
        if not f.exists():
            raise UserError(f"CIFAR file {f} is missing; the folder should be the official python release")
        d = _unpickle(_cifar_file(root, f, follow_links))
        data, labels, coarse, filenames = _cifar_batch(f, d, label_key, len(names), coarse_names)
        for i in range(len(labels)):
            buf = io.BytesIO()
            Image.fromarray(data[i]).save(buf, format="PNG")
            meta_i = {"index": i, "batch": f.name}
            if filenames is not None:
                meta_i["filename"] = filenames[i].decode("utf-8", "replace")
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


def _cifar_file(root: Path, path: Path, follow_links: bool) -> Path:
    """A CIFAR batch file, refused when it is a link or lies outside the folder (a whole batch cannot be
    skipped quietly)."""
    _check_inside(root, path, str(root), follow_links)
    reason = skip_reason(path, follow_links)
    if reason:
        raise UserError(f"CIFAR file {path}: {reason}")
    return path


def _cifar_names(path: Path, meta: dict, key: str) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or not names or not all(isinstance(n, bytes) for n in names):
        raise UserError(
            f"{path}: {key} is missing or not a list of names; is this the official python release?"
        )
    return [n.decode("utf-8", "replace") for n in names]


def _cifar_batch(path: Path, d: dict, label_key: str, num_classes: int, coarse_names: list[str] | None):
    """(images N×32×32×3, labels, coarse labels or None, file names or None) of one batch, every label
    checked against the class count: a label out of range would train a class that does not exist."""
    data, labels = d.get("data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: `data` is not an N×3072 array of 32×32 RGB images")
    if not isinstance(labels, list) or len(labels) != len(data):
        raise UserError(f"{path}: `{label_key}` is not a list of {len(data)} labels, one per image")

    def check(values: list, bound: int, what: str) -> None:
        for i, v in enumerate(values):
            if not isinstance(v, int) or not 0 <= v < bound:
                raise UserError(f"{path}: {what} of image {i} is {v!r}, not a class id in [0, {bound})")

    check(labels, num_classes, label_key)
    coarse = d.get("coarse_labels")
    if coarse_names is not None and coarse is not None:
        if not isinstance(coarse, list) or len(coarse) != len(data):
            raise UserError(f"{path}: `coarse_labels` is not a list of {len(data)} labels, one per image")
        check(coarse, len(coarse_names), "coarse_labels")
    filenames = d.get("filenames")
    if filenames is not None and (
        not isinstance(filenames, list)
        or len(filenames) != len(data)
        or not all(isinstance(n, bytes) for n in filenames)
    ):
        raise UserError(f"{path}: `filenames` is not a list of {len(data)} names, one per image")
    images = data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels, coarse, filenames


# ---- VTAB-1k ------------------------------------------------------------------------------------------------


_CLASS_ID = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+[.]?[0-9]*|[.][0-9]+)([eE][+-]?[0-9]+)?|[+-]?0[xXbBoO][0-9a-fA-F]+")


def _class_id(text: str, where: str) -> int:
    """A class id written as a non-negative integer below MAX_CLASSES; anything else a one-line error."""
    if not _CLASS_ID.fullmatch(text):
        raise UserError(f"{where}: label {text!r} is not a class id (a non-negative integer)")
    value = int(text)
    if value >= MAX_CLASSES:
        raise UserError(
            f"{where}: class id {value} is past the limit of {MAX_CLASSES:,} classes; the label is mistyped"
        )
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None


def _read_list(path: Path) -> list[tuple[int, str, str]]:
    """(line number, relative path, label) of each entry of a VTAB-1k list file."""
    rows = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise UserError(f"{path}:{n}: expected `relative/path label`, got {line!r}")
        rows.append((n, parts[0], parts[1]))
    return rows


def vtab(src: Path, split: str = "", *, follow_links: bool = False) -> Corpus:
    """A VTAB-1k task folder: images plus train800.txt, val200.txt, train800val200.txt, test.txt.

    Labels are class ids; in a folder named after one of the 19 tasks none may reach that task's class count.
    """
    split = split or "train800val200"
    if split not in VTAB_SPLITS:
        raise UserError(f"--split {split!r}: VTAB-1k splits are {', '.join(VTAB_SPLITS)}")
    lst = src / f"{split}.txt"
    if not lst.exists():
        raise UserError(
            f"{lst} is missing; a VTAB-1k task folder has {', '.join(s + '.txt' for s in VTAB_SPLITS)}"
        )
    task = canonical(src.resolve().name)
    bound = VTAB_TASKS[task][1] if task in VTAB_TASKS else None
    # Class ids over every list of the task, so all splits agree on the number of classes.
    all_labels = set()
    for s in VTAB_SPLITS:
        path = src / f"{s}.txt"
        if not path.exists():
            continue
        for n, _, lab in _read_list(path):
            cid = _class_id(lab, f"{path}:{n}")
            if bound is not None and cid >= bound:
                raise UserError(
                    f"{path}:{n}: label {cid} is not a class of VTAB-1k {task}, which has {bound}"
                )
            all_labels.add(cid)
    items, unusable = [], []
    for n, rel, lab in _read_list(lst):
        path = src / rel
        _check_inside(src, path, f"{lst}:{n}", follow_links)
        reason = skip_reason(path, follow_links)
        if reason:
            unusable.append({"source": rel, "reason": reason})
            continue
        items.append(Item(key=make_key(rel), label=int(lab), source=rel, path=str(path)))
    classes = [{"id": i, "name": str(i)} for i in range(max(all_labels) + 1)] if all_labels else []
    return Corpus("vtab", items, classes, unusable=unusable)


# ---- CSV / TSV lists ----------------------------------------------------------------------------------------


def csv_list(src: Path, split: str = "", *, follow_links: bool = False, multi_label: bool = False) -> Corpus:
    """`path,label` rows (tab-separated for .tsv); a label may be multi-label as `3;17;2041`.

    Labels are either all class ids (kept as given) or all class names (numbered in sorted order); a mix is
    an error, as is an empty label unless the list is declared multi-label (`--multi-label`: every row a
    possibly empty set of classes). Paths are relative to the list's folder and may not lead out of it.
    A first row whose label is not a label (a header) is skipped.
    """
    text = _read_text(src)
    delim = "\t" if src.suffix.lower() == ".tsv" or ("\t" in text and "," not in text) else ","
    reader = csv.reader(io.StringIO(text), delimiter=delim)
    rows: list[tuple[int, list[str]]] = []
    try:
        for r in reader:
            if r and any(c.strip() for c in r):
                rows.append((reader.line_num, r))
    except csv.Error as e:
        raise UserError(f"{src}:{reader.line_num}: not a readable CSV row ({e})") from None
    if rows and rows[0][1][0].strip().lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]
    if not rows:
        raise UserError(f"{src} lists no images; expected `path{delim}label` rows")
    parsed = []  # (line, path, label tokens)
    for line, r in rows:
        if len(r) < 2 or not r[0].strip():
            raise UserError(f"{src}:{line}: expected `path{delim}label`, got {delim.join(r)!r}")
        tokens = [x.strip() for x in r[1].split(";") if x.strip()]
        if not tokens and not multi_label:
            raise UserError(
                f"{src}:{line}: {r[0].strip()} has an empty label; give its class, or declare the list "
                "multi-label with --multi-label if an image may have no class"
            )
        parsed.append((line, r[0].strip(), tokens))
    if _names_not_ids(src, parsed):
        names = {x for _, _, tokens in parsed for x in tokens}
        lookup = {n: i for i, n in enumerate(sorted(names))}
        labels = [[lookup[x] for x in tokens] for _, _, tokens in parsed]
        classes = [{"id": i, "name": n} for n, i in lookup.items()]
    else:
        labels = [[_class_id(x, f"{src}:{line}") for x in tokens] for line, _, tokens in parsed]
        top = max((i for labs in labels for i in labs), default=-1)
        classes = [{"id": i, "name": str(i)} for i in range(top + 1)]
    multi = multi_label or any(len(labs) != 1 for labs in labels)
    items, unusable = [], []
    root = src.parent
    for (line, rel, _), labs in zip(parsed, labels):
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        _check_inside(root, path, f"{src}:{line}", follow_links)
        reason = skip_reason(path, follow_links)
        if reason:
            unusable.append({"source": rel, "reason": reason})
            continue
        items.append(Item(key=make_key(rel), label=labs if multi else labs[0], source=rel, path=str(path)))
    return Corpus("csv", items, classes, unusable=unusable)


def _names_not_ids(src: Path, parsed: list[tuple[int, str, list[str]]]) -> bool:
    """True when a list's labels are class names, False when they are class ids; a mix, or a number that
    is not a class id (`-1`, `2.5`, `1e3`), is a one-line error naming the line."""
    first: dict[str, tuple[int, str]] = {}
    for line, _, tokens in parsed:
        for x in tokens:
            if _CLASS_ID.fullmatch(x):
                first.setdefault("id", (line, x))
            elif _NUMBER.fullmatch(x):
                raise UserError(
                    f"{src}:{line}: label {x!r} is neither a class id (a non-negative integer) nor a class name"
                )
            else:
                first.setdefault("name", (line, x))
    if len(first) == 2:
        (a, x), (b, y) = first["id"], first["name"]
        raise UserError(
            f"{src}: labels mix class ids and class names (line {a}: {x!r}, line {b}: {y!r}); a list uses "
            "one kind: ids are kept as given, names are numbered in sorted order"
        )
    return "name" in first


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
                    yield it, _read_regular(it.path), ""
                except OSError as e:
                    yield it, None, f"unreadable file ({e.strerror or e})"


def _read_regular(path: str) -> bytes:
    """The bytes of a regular file. Opened without blocking and checked after opening, so a file swapped
    for a FIFO or a device after listing fails here instead of hanging or reading for ever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{_special_kind(os.fstat(fd).st_mode)}, not a regular file")
        return f.read()
