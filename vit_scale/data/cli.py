"""`vit-scale shards build | merge-index | verify | stats | synth`."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
from collections import Counter
from pathlib import Path

from vit_scale.data.build import JPEG_QUALITY, build, default_workers
from vit_scale.data.shards import INDEX_NAME, make_index, parse_labels, read_index
from vit_scale.data.sources import FORMATS
from vit_scale.data.tar import tar_samples
from vit_scale.errors import UserError
from vit_scale.io import atomic_write_json

USAGE = """usage: vit-scale shards {build,merge-index,verify,stats,synth} ...

  build SOURCE --out DIR     write WebDataset tar shards and DIR/index.json from an image corpus
  merge-index DIR            join the indexes of a SLURM array build (DIR/part-*/index.json)
  verify DIR                 re-read every shard: counts, sha256, every image decodes
  stats DIR                  counts per class, image sizes, bytes
  synth ...                  embedded synthetic corpora (fractals, digits)
"""


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vit-scale shards build", description="Write tar shards from an image corpus."
    )
    p.add_argument(
        "source", help="ImageFolder dir, IN-21k tar or dir of synset tars, CIFAR dir, VTAB-1k dir, CSV"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="", choices=("",) + FORMATS, help="source format (default: detected)")
    p.add_argument(
        "--split", default="", help="split to write (CIFAR train/test, VTAB lists, val with holdout)"
    )
    p.add_argument("--max-side", type=int, default=0, help="resize so the longer side is at most N (0: keep)")
    p.add_argument("--quality", type=int, default=JPEG_QUALITY, help="JPEG quality when re-encoding")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--shard-bytes", type=int, default=None, help="also cap each shard's size in bytes")
    p.add_argument("--workers", type=int, default=default_workers(), help="conversion processes")
    p.add_argument(
        "--val-holdout", type=int, default=0, help="hold out a fixed N images (--split val writes them)"
    )
    p.add_argument("--array-index", type=int, default=0, help="this SLURM array task's part")
    p.add_argument("--array-count", type=int, default=1, help="number of parts")
    p.add_argument(
        "--force", action="store_true", help="rebuild instead of resuming or keeping a complete build"
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def cmd_build(argv: list[str]) -> int:
    a = _build_parser().parse_args(argv)
    index = build(
        a.source,
        a.out,
        fmt=a.format,
        split=a.split,
        max_side=a.max_side,
        quality=a.quality,
        shard_size=a.shard_size,
        shard_bytes=a.shard_bytes,
        workers=a.workers,
        holdout=a.val_holdout,
        part=a.array_index,
        parts=a.array_count,
        force=a.force,
        progress=not a.no_progress,
    )
    reasons = Counter(s["reason"].split(" (")[0] for s in index["skipped"])
    print(
        f"{index['num_samples']} samples in {index['num_shards']} shards ({index['num_bytes'] / 2**20:.1f} MiB), "
        f"{index['num_classes']} classes, {index['num_skipped']} inputs skipped"
    )
    for reason, n in reasons.most_common():
        print(f"  skipped {n:>6}  {reason}")
    if index.get("empty_classes"):
        print(f"  empty classes: {', '.join(index['empty_classes'][:10])}")
    return 0


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


def cmd_merge(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="vit-scale shards merge-index")
    p.add_argument("dir", help="the --out directory the array tasks wrote part-* folders into")
    p.add_argument("parts", nargs="*", help="part directories (default: every DIR/*/index.json)")
    a = p.parse_args(argv)
    index = merge_index(a.dir, a.parts or None)
    print(f"{index['num_samples']} samples in {index['num_shards']} shards from {len(index['parts'])} parts")
    return 0


def verify_shard(path: Path, entry: dict) -> list[str]:
    """Problems with one shard: size, sha256, sample count, and every image decoding."""
    from vit_scale.data.transforms import IMAGE_EXTS, decode_rgb

    if not path.exists():
        return ["missing"]
    data = path.read_bytes()
    problems = []
    if len(data) != entry["bytes"]:
        problems.append(f"size {len(data)} != {entry['bytes']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        problems.append("sha256 mismatch")
    samples = []
    try:
        for sample in tar_samples(io.BytesIO(data)):
            samples.append(sample)
    except ValueError as e:
        problems.append(f"unreadable tar ({e})")
    if len(samples) != entry["samples"]:
        problems.append(f"{len(samples)} samples != {entry['samples']}")
    bad = 0
    for s in samples:
        ext = next((e for e in IMAGE_EXTS if e in s), None)
        try:
            if ext is None or ("cls" not in s and "labels" not in s):
                raise ValueError
            decode_rgb(s[ext])
        except ValueError:
            bad += 1
    if bad:
        problems.append(f"{bad} samples do not decode")
    return problems


def cmd_verify(argv: list[str]) -> int:
    from rich.console import Console
    from rich.progress import track

    p = argparse.ArgumentParser(prog="vit-scale shards verify")
    p.add_argument("dir")
    a = p.parse_args(argv)
    directory = Path(a.dir)
    index = read_index(directory)
    console = Console(highlight=False)
    failed = 0
    rows = []
    for entry in track(index["shards"], description="verifying", console=console, transient=True):
        problems = verify_shard(directory / entry["name"], entry)
        failed += bool(problems)
        rows.append((entry["name"], entry["samples"], "; ".join(problems) or "ok"))
    for name, n, status in rows:
        console.print(f"{name:<40} {n:>8} samples  {status}")
    total = index["num_samples"]
    if failed:
        console.print(f"FAILED: {failed} of {len(rows)} shards do not match {INDEX_NAME}")
        return 1
    console.print(f"ok: {len(rows)} shards, {total} samples, every image decodes")
    return 0


def shard_stats(directory: Path) -> dict:
    """Samples per class, image sizes (from the metadata the builder wrote, else the image) and bytes.

    A shard that cannot be read to its end counts with the samples before the break and is listed under
    `unreadable`; `verify` says what is wrong with it.
    """
    from PIL import Image

    from vit_scale.data.transforms import IMAGE_EXTS

    index = read_index(directory)
    per_class: Counter = Counter()
    sizes: list[tuple[int, int]] = []
    image_bytes = 0
    unreadable = []
    for entry in index["shards"]:
        for s in _readable_samples(directory, entry["name"], unreadable):
            if "cls" in s:
                per_class[int(s["cls"])] += 1
            elif "labels" in s:
                per_class.update(parse_labels(s["labels"]))
            ext = next((e for e in IMAGE_EXTS if e in s), None)
            if ext is None:
                continue
            image_bytes += len(s[ext])
            meta = json.loads(s["json"]) if "json" in s else {}
            if "width" in meta and "resized" not in meta:
                sizes.append((meta["width"], meta["height"]))
                continue
            try:
                with Image.open(io.BytesIO(s[ext])) as im:
                    sizes.append(im.size)
            except Exception:  # a broken image has no size; `verify` reports it
                pass
    return {
        "index": index,
        "per_class": per_class,
        "sizes": sizes,
        "image_bytes": image_bytes,
        "unreadable": unreadable,
    }


def _readable_samples(directory: Path, name: str, unreadable: list[str]):
    """The samples of a shard up to where it breaks; a broken or missing shard's name goes to `unreadable`."""
    try:
        with open(directory / name, "rb") as f:
            yield from tar_samples(f)
    except (ValueError, OSError):
        unreadable.append(name)


def cmd_stats(argv: list[str]) -> int:
    import statistics

    p = argparse.ArgumentParser(prog="vit-scale shards stats")
    p.add_argument("dir")
    a = p.parse_args(argv)
    s = shard_stats(Path(a.dir))
    index = s["index"]
    names = {c["id"]: c["name"] for c in index["classes"]}
    print(
        f"{index['num_samples']} samples, {index['num_shards']} shards, {index['num_bytes'] / 2**20:.2f} MiB"
    )
    print(
        f"image bytes: {s['image_bytes'] / 2**20:.2f} MiB ({s['image_bytes'] / max(1, index['num_samples']):.0f} per image)"
    )
    if s["sizes"]:
        ws, hs = [w for w, _ in s["sizes"]], [h for _, h in s["sizes"]]
        print(
            f"image size (w×h): median {statistics.median(ws):.0f}×{statistics.median(hs):.0f}, "
            f"min {min(ws)}×{min(hs)}, max {max(ws)}×{max(hs)}"
        )
    print(f"classes: {index['num_classes']} ({len(s['per_class'])} with samples)")
    for cid in sorted(names):
        print(f"  {cid:>6}  {names[cid]:<30} {s['per_class'].get(cid, 0):>8}")
    print(f"skipped inputs: {index['num_skipped']}")
    if s["unreadable"]:
        print(
            f"unreadable shards: {len(s['unreadable'])}, counted up to where they break "
            f"({', '.join(s['unreadable'][:5])}); run `vit-scale shards verify {a.dir}`"
        )
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "synth":
        try:
            synth = importlib.import_module("vit_scale.data.synth")
        except ModuleNotFoundError as e:
            if e.name != "vit_scale.data.synth":
                raise
            raise UserError("`shards synth` is not available in this installation") from None
        return int(synth.main(rest) or 0)
    commands = {"build": cmd_build, "merge-index": cmd_merge, "verify": cmd_verify, "stats": cmd_stats}
    if cmd not in commands:
        raise UserError(f"unknown subcommand {cmd!r}; use one of build, merge-index, verify, stats, synth")
    return commands[cmd](rest)
