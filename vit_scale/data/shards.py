"""Writing WebDataset tar shards and their `index.json`.

Every producer of shards (the `vit-scale shards build` sources, the fractal synth, the digits corpus) goes
through `ShardWriter`, so every shard set on disk has the same layout:

    DIR/shard-000000.tar ...   samples `KEY.jpg` (or the original encoding), `KEY.cls` or `KEY.labels`, `KEY.json`
    DIR/index.json             format version, classes, per-shard counts and sha256, totals, skipped inputs

A shard is written as `NAME.tar.tmp` and renamed when complete; tar headers carry fixed owners and times so
the same inputs give byte-identical shards (and so the same sha256) on every run. After each completed
shard the writer records its progress in `DIR/.progress.json`, which lets an interrupted build resume at the
first incomplete shard instead of starting over. `merge_index` joins the indexes that the parts of a SLURM
array build wrote into one for the whole set.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from vit_scale.data.tar import TAR_END, member_bytes
from vit_scale.errors import UserError
from vit_scale.io import atomic_write_json, disk_full_error, fsync_dir, is_disk_full

INDEX_NAME = "index.json"
PROGRESS_NAME = ".progress.json"
FORMAT = "vit-scale-shards"
FORMAT_VERSION = 1
# Letters and digits of any script, '_' and '-'; a '~' only before the hash that `make_key` and
# `unique_key` append, so a key carrying one never equals a name kept as it is.
_KEY_OK = re.compile(r"^[\w\-]+(~[0-9a-f]{16})?$")
_PREFIX_OK = re.compile(r"^[A-Za-z0-9_\-]+$")
MAX_KEY_BYTES = 80  # ustar keeps 100 bytes of a member name: the key, a dot and the longest extension fit


def _key_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def make_key(text: str) -> str:
    """A WebDataset key from a path or name: no dots (WebDataset splits the extension at the first one).

    Letters of any script are kept (`猫/写真.jpg` -> `猫_写真_jpg`); every other run of characters becomes
    `_`. A key too long for a tar header is cut and made unique again by a hash of the whole text.
    """
    key = re.sub(r"[^\w\-]+", "_", text).strip("_") or "sample"
    if len(key.encode()) > MAX_KEY_BYTES:
        cut = key.encode()[: MAX_KEY_BYTES - 17].decode("utf-8", "ignore")
        key = f"{cut}~{_key_hash(text)}"
    return key


def unique_key(key: str, text: str) -> str:
    """A key for `text` that cannot collide with readable keys: two names that `make_key` maps alike
    (`a b.jpg` and `a_b.jpg`) both get one, told apart by a hash of the whole text."""
    base = key.split("~")[0].encode()[: MAX_KEY_BYTES - 17].decode("utf-8", "ignore")
    return f"{base}~{_key_hash(text)}"


def label_text(label: int | list[int]) -> tuple[str, bytes]:
    """(`cls` or `labels`, the member's bytes) for one sample's label."""
    if isinstance(label, (list, tuple)):
        return "labels", ";".join(str(int(x)) for x in label).encode()
    return "cls", str(int(label)).encode()


def parse_labels(data: bytes) -> list[int]:
    text = data.decode().strip()
    return [int(x) for x in text.split(";")] if text else []


def normalise_classes(classes) -> list[dict]:
    """Classes as `[{"id": 0, "name": ..., (wnid)}, ...]` from names or from such dicts."""
    out = []
    for i, c in enumerate(classes or []):
        if isinstance(c, dict):
            entry = {"id": int(c.get("id", i)), "name": str(c["name"])}
            entry.update({k: v for k, v in c.items() if k not in ("id", "name")})
        else:
            entry = {"id": i, "name": str(c)}
        out.append(entry)
    return out


def sample_bytes(key: str, image: bytes, ext: str, label, meta: dict) -> bytes:
    """One sample's members as tar bytes (headers and padding included), in a fixed member order."""
    kind, label_bytes = label_text(label)
    return b"".join(
        member_bytes(f"{key}.{suffix}", data)
        for suffix, data in (
            (ext, image),
            (kind, label_bytes),
            ("json", json.dumps(meta, sort_keys=True).encode()),
        )
    )


class ShardWriter:
    """Writes samples into numbered tar shards in `out_dir` and an `index.json` on close.

    Use as a context manager. `shard_size` caps samples per shard; `shard_bytes`, when given, also caps a
    shard's size (a single larger sample still gets a shard of its own). `classes` is a list of names or of
    `{"id", "name", ...}` dicts (e.g. with `wnid`). `resume=True` continues an interrupted run in the same
    directory: completed shards are kept and `resume_inputs` says how many inputs they consumed, so the
    caller skips that many and feeds the rest in the same order. `extra` goes into index.json as is.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        shard_size: int = 1000,
        shard_bytes: int | None = None,
        prefix: str = "shard",
        classes=None,
        split: str = "",
        resume: bool = False,
        extra: dict | None = None,
        progress_key: dict | None = None,
    ):
        if shard_size < 1:
            raise UserError(f"shard size must be at least 1 sample, got {shard_size}")
        if shard_bytes is not None and shard_bytes < 1:
            raise UserError(f"shard bytes must be positive, got {shard_bytes}")
        if not _PREFIX_OK.match(prefix):
            raise UserError(f"shard prefix {prefix!r} may hold only letters, digits, '_' and '-'")
        self.out_dir = Path(out_dir)
        self.shard_size = shard_size
        self.shard_bytes = shard_bytes
        self.prefix = prefix
        self.classes = normalise_classes(classes)
        self.split = split
        self.extra = dict(extra or {})
        # What must match for a resume to be safe: same layout options and the caller's own description.
        self.progress_key = {
            "shard_size": shard_size,
            "shard_bytes": shard_bytes,
            "prefix": prefix,
            **(progress_key or {}),
        }
        self.shards: list[dict] = []
        self.skipped: list[dict] = []
        self.inputs_done = 0  # inputs consumed by completed shards (samples and skips alike)
        self.labels_kind: str | None = None
        self._keys: set[str] = set()
        self._file = None
        self._tmp_path: Path | None = None
        self._hash = None
        self._count = 0
        self._bytes = 0
        self._pending_inputs = 0
        self._pending_skips: list[dict] = []
        self._closed = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_progress()
        else:
            self._clear_previous()

    # ---- resume -------------------------------------------------------------------------------------

    @property
    def resume_inputs(self) -> int:
        return self.inputs_done

    def _clear_previous(self) -> None:
        # A stale index.json beside new shards would describe the wrong files if this run is interrupted.
        (self.out_dir / INDEX_NAME).unlink(missing_ok=True)
        for p in self.out_dir.glob(f"{self.prefix}-*.tar*"):
            p.unlink()
        (self.out_dir / PROGRESS_NAME).unlink(missing_ok=True)

    def _load_progress(self) -> None:
        path = self.out_dir / PROGRESS_NAME
        if not path.exists():
            self._clear_previous()
            return
        state = json.loads(path.read_text())
        if state.get("key") != self.progress_key:
            raise UserError(
                f"{self.out_dir} holds an interrupted build made with other options ({state.get('key')}); "
                "use the same command to resume, or a fresh --out directory"
            )
        for shard in state["shards"]:
            if not (self.out_dir / shard["name"]).exists():
                raise UserError(
                    f"{self.out_dir}: shard {shard['name']} recorded as complete is missing; "
                    "delete the directory and build again"
                )
        self.shards = state["shards"]
        self.skipped = state["skipped"]
        self.inputs_done = state["inputs_done"]
        self.labels_kind = state.get("labels_kind")
        self._keys = set(state["keys"])
        for p in self.out_dir.glob(f"{self.prefix}-*.tar.tmp"):
            p.unlink()
        done = {s["name"] for s in self.shards}
        for p in self.out_dir.glob(f"{self.prefix}-*.tar"):
            if p.name not in done:
                p.unlink()

    def _save_progress(self) -> None:
        atomic_write_json(
            self.out_dir / PROGRESS_NAME,
            {
                "key": self.progress_key,
                "shards": self.shards,
                "skipped": self.skipped,
                "inputs_done": self.inputs_done,
                "labels_kind": self.labels_kind,
                "keys": sorted(self._keys),
            },
        )

    # ---- writing ------------------------------------------------------------------------------------

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open_shard(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp_path = self.out_dir / f"{name}.tmp"
        self._file = open(self._tmp_path, "wb")  # noqa: SIM115 - closed in _finish_shard / abort
        self._hash = hashlib.sha256()
        self._count = 0
        self._bytes = 0

    def _finish_shard(self) -> None:
        self._file.write(TAR_END)
        self._hash.update(TAR_END)
        self._bytes += len(TAR_END)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        final = self._tmp_path.with_suffix("")
        os.replace(self._tmp_path, final)
        fsync_dir(self.out_dir)
        self.shards.append(
            {
                "name": final.name,
                "samples": self._count,
                "bytes": self._bytes,
                "sha256": self._hash.hexdigest(),
            }
        )
        self.inputs_done += self._pending_inputs
        self.skipped.extend(self._pending_skips)
        self._pending_inputs = 0
        self._pending_skips = []
        self._save_progress()

    def write(self, key: str, image: bytes, ext: str, label: int | list[int], meta: dict) -> bool:
        """Add one sample; returns False (and records a skip) when the key was already written."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not _KEY_OK.match(key):
            raise ValueError(f"sample key {key!r} may hold only letters, digits, '_' and '-' (see make_key)")
        ext = ext.lower().lstrip(".")
        if key in self._keys:
            self.skip(meta.get("source", key), f"duplicate key {key}")
            return False
        kind = "labels" if isinstance(label, (list, tuple)) else "cls"
        if self.labels_kind is None:
            self.labels_kind = kind
        elif self.labels_kind != kind:
            raise ValueError(f"sample {key}: {kind} label in a shard set of {self.labels_kind} labels")
        data = sample_bytes(key, image, ext, label, meta)
        with self._space_for(len(data)):
            if self._file is not None and (
                self._count >= self.shard_size
                or (
                    self.shard_bytes is not None and self._bytes + len(data) + len(TAR_END) > self.shard_bytes
                )
            ):
                self._finish_shard()
            if self._file is None:
                self._open_shard()
            self._file.write(data)
        self._hash.update(data)
        self._bytes += len(data)
        self._count += 1
        self._keys.add(key)
        self._pending_inputs += 1
        return True

    def skip(self, source: str, reason: str) -> None:
        """Record an input that produced no sample; it counts as consumed for resume."""
        entry = {"source": str(source), "reason": reason}
        if self._file is None:
            # No open shard: nothing written since the last completed one, so the skip is settled now.
            self.skipped.append(entry)
            self.inputs_done += 1
        else:
            self._pending_skips.append(entry)
            self._pending_inputs += 1

    @contextlib.contextmanager
    def _space_for(self, more: int):
        """A full disk becomes one line with the shard's path, the free space and what it needed; the
        incomplete shard is dropped (completed ones and the progress file stay, so the build resumes)."""
        try:
            yield
        except OSError as e:
            needed = self._bytes + more + len(TAR_END)
            if not is_disk_full(e, self.out_dir, needed):
                raise
            where = self._tmp_path if self._file is not None else self.out_dir
            err = disk_full_error(
                where, needed, "shard",
                f"the {len(self.shards)} completed shards are kept: free space, then run the same command to resume",
            )  # fmt: skip
            self.abort()
            raise err from None

    def abort(self) -> None:
        """Drop the incomplete shard; completed ones and the progress file stay for a resume."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                self._file.close()
            self._file = None
            self._tmp_path.unlink(missing_ok=True)
        self._closed = True

    def close(self) -> dict:
        """Finish the last shard and write index.json; returns the index."""
        if self._closed:
            return self.index()
        with self._space_for(0):
            if self._file is not None:
                self._finish_shard()
            self.skipped.extend(self._pending_skips)
            self.inputs_done += self._pending_inputs
            self._pending_skips, self._pending_inputs = [], 0
            index = self.index()
            atomic_write_json(self.out_dir / INDEX_NAME, index)
        self._closed = True
        (self.out_dir / PROGRESS_NAME).unlink(missing_ok=True)
        return index

    def index(self) -> dict:
        return make_index(
            self.shards,
            classes=self.classes,
            skipped=self.skipped,
            split=self.split,
            labels=self.labels_kind or "cls",
            extra=self.extra,
        )


def make_index(shards, *, classes, skipped, split="", labels="cls", extra=None) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "split": split,
        "labels": labels,
        "num_classes": len(classes),
        "classes": classes,
        "num_samples": sum(s["samples"] for s in shards),
        "num_bytes": sum(s["bytes"] for s in shards),
        "num_shards": len(shards),
        "shards": list(shards),
        "num_skipped": len(skipped),
        "skipped": list(skipped),
        **(extra or {}),
    }


def read_index(directory: str | os.PathLike) -> dict:
    """index.json of a shard directory, with a clear error when it is missing or not ours."""
    directory = Path(directory)
    path = directory / INDEX_NAME
    if not directory.is_dir():
        raise UserError(f"shard directory {directory} does not exist; build it with `vit-scale shards build`")
    if not path.exists():
        raise UserError(
            f"{directory} has no {INDEX_NAME}; build shards with `vit-scale shards build` "
            "or name the shard files with a brace pattern"
        )
    return read_index_file(path)


def read_index_file(path: Path) -> dict:
    """A shard index (an index.json, or a shard list from `vit-scale shards count`) read from its file."""
    return parse_index(path.read_text(), path)


def parse_index(text: str, path) -> dict:
    """A shard index from its JSON text; `path` names where it came from in errors."""
    try:
        index = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); rebuild the shards") from None
    if index.get("format") != FORMAT or "shards" not in index:
        raise UserError(f"{path} is not a vit-scale shard index")
    if index.get("version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} has format version {index['version']}; upgrade vit-scale to read it")
    return index


def merge_index(directory: str | Path, parts: list[str] | None = None) -> dict:
    """Join the index.json of each part directory into DIR/index.json (shard names become part/shard)."""
    directory = Path(directory)
    part_dirs = (
        [Path(p) for p in parts] if parts else sorted(p.parent for p in directory.glob("*/" + INDEX_NAME))
    )
    if not part_dirs:
        raise UserError(
            f"{directory} has no part directories with an {INDEX_NAME}; run the array builds first"
        )
    indexes = [read_index(d) for d in part_dirs]
    counts = {i["build"]["array_count"] for i in indexes if "build" in i}
    if len(counts) == 1 and (n := counts.pop()) != len(indexes):
        raise UserError(
            f"{len(indexes)} parts are complete but the build had --array-count {n}; finish the rest"
        )
    classes = indexes[0]["classes"]
    for d, i in zip(part_dirs, indexes):
        if i["classes"] != classes:
            raise UserError(f"{d} has different classes from {part_dirs[0]}; the parts are not of one build")
    kinds = {i["labels"] for i in indexes if i["num_samples"]}
    if len(kinds) > 1:
        raise UserError(f"the parts in {directory} mix single labels and multi-labels; rebuild them alike")
    shards, skipped = [], []
    for d, i in zip(part_dirs, indexes):
        if not d.resolve().is_relative_to(directory.resolve()):
            raise UserError(
                f"part {d} is not inside {directory}; the merged index names shards relative to it"
            )
        rel = d.resolve().relative_to(directory.resolve())
        shards += [{**s, "name": f"{rel.as_posix()}/{s['name']}"} for s in i["shards"]]
        skipped += i["skipped"]
    extra = {"empty_classes": indexes[0].get("empty_classes", []), "parts": [d.name for d in part_dirs]}
    tasks = {i.get("task", "") for i in indexes}
    if len(tasks) > 1:
        raise UserError(f"the parts in {directory} name different tasks ({', '.join(sorted(tasks))})")
    if task := tasks.pop():
        extra["task"] = task  # its augmentation rules hold for the whole set
    index = make_index(
        shards,
        classes=classes,
        skipped=skipped,
        split=indexes[0]["split"],
        labels=kinds.pop() if kinds else "cls",
        extra=extra,
    )
    atomic_write_json(directory / INDEX_NAME, index)
    return index
