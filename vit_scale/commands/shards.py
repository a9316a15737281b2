"""`vit-scale shards build | merge-index | verify | stats | count | synth`."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from vit_scale.commands.args import Parser, at_least, between
from vit_scale.data import glyphs, synth
from vit_scale.data.build import JPEG_QUALITY, build, default_workers
from vit_scale.data.shards import INDEX_NAME, merge_index, read_index
from vit_scale.data.sources import FORMATS
from vit_scale.errors import UserError

USAGE = """usage: vit-scale shards {build,merge-index,verify,stats,count,synth} ...

  build SOURCE --out DIR     write WebDataset tar shards and DIR/index.json from an image corpus
  merge-index DIR            join the indexes of a SLURM array build (DIR/part-*/index.json)
  verify DIR                 re-read every shard: counts, sha256, every image decodes, every label in range
  stats DIR                  counts per class, image sizes, bytes
  count SOURCE --out FILE    count the samples of shards without an index.json (pipe:, http, a pattern)
                             into a shard list that data.train=FILE trains on in exact mode
  synth ...                  embedded synthetic corpora (fractals, glyphs, digits)
"""


def _build_parser() -> argparse.ArgumentParser:
    p = Parser(
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
    p.add_argument(
        "--task",
        default="",
        help="the VTAB-1k task, recorded in index.json so that augmentations which change its labels are "
        "refused (default for --format vtab: the source folder's name when it names a task)",
    )
    p.add_argument("--max-side", type=at_least(0), default=0, help="resize so the longer side is at most N (0: keep)")
    p.add_argument("--quality", type=between(1, 100), default=JPEG_QUALITY, help="JPEG quality when re-encoding")
    p.add_argument("--shard-size", type=at_least(1), default=1000, help="samples per shard")
    p.add_argument("--shard-bytes", type=at_least(1), default=None, help="also cap each shard's size in bytes")
    p.add_argument("--workers", type=at_least(1), default=default_workers(), help="conversion processes")
    p.add_argument(
        "--val-holdout", type=at_least(0), default=0, help="hold out a fixed N images (--split val writes them)"
    )
    p.add_argument("--array-index", type=at_least(0), default=0, help="this SLURM array task's part")
    p.add_argument("--array-count", type=at_least(1), default=1, help="number of parts")
    p.add_argument(
        "--force", action="store_true", help="rebuild instead of resuming or keeping a complete build"
    )
    p.add_argument(
        "--multi-label",
        action="store_true",
        help="CSV lists: every label is a set of classes (`3;17`), and an empty label means no class",
    )
    p.add_argument(
        "--follow-links",
        action="store_true",
        help="read symbolic and hard links, and list entries outside the source folder (skipped or refused "
        "by default: a corpus from someone else could point at your files)",
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
        multi_label=a.multi_label,
        follow_links=a.follow_links,
        task=a.task,
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


def cmd_merge(argv: list[str]) -> int:
    p = Parser(prog="vit-scale shards merge-index")
    p.add_argument("dir", help="the --out directory the array tasks wrote part-* folders into")
    p.add_argument("parts", nargs="*", help="part directories (default: every DIR/*/index.json)")
    a = p.parse_args(argv)
    index = merge_index(a.dir, a.parts or None)
    print(f"{index['num_samples']} samples in {index['num_shards']} shards from {len(index['parts'])} parts")
    return 0


def cmd_verify(argv: list[str]) -> int:
    from rich.console import Console
    from rich.progress import track

    from vit_scale.data.verify import verify_shard  # decodes images: torch loads for this command only

    p = Parser(prog="vit-scale shards verify")
    p.add_argument("dir")
    a = p.parse_args(argv)
    directory = Path(a.dir)
    index = read_index(directory)
    kind, num_classes = index.get("labels", "cls"), index.get("num_classes")
    if kind not in ("cls", "labels") or not isinstance(num_classes, int) or num_classes < 0:
        raise UserError(
            f"{directory / INDEX_NAME} declares labels={kind!r} and num_classes={num_classes!r}; "
            "expected labels 'cls' or 'labels' and a class count: rebuild the shards"
        )
    # Shard names and problems quote files as they are; one line per shard, whatever the terminal's width.
    console = Console(highlight=False, markup=False, soft_wrap=True)
    failed = 0
    rows = []
    for entry in track(index["shards"], description="verifying", console=console, transient=True):
        problems = verify_shard(directory / entry["name"], entry, labels=kind, num_classes=num_classes)
        failed += bool(problems)
        rows.append((entry["name"], entry["samples"], "; ".join(problems) or "ok"))
    for name, n, status in rows:
        console.print(f"{name:<40} {n:>8} samples  {status}")
    total = index["num_samples"]
    if failed:
        console.print(f"FAILED: {failed} of {len(rows)} shards do not match {INDEX_NAME}")
        return 1
    console.print(
        f"ok: {len(rows)} shards, {total} samples, every image decodes, every label a {kind} label in [0, {num_classes})"
    )
    return 0


def cmd_stats(argv: list[str]) -> int:
    import statistics

    from vit_scale.data.stats import shard_stats  # reads image formats: torch loads for this command only

    p = Parser(prog="vit-scale shards stats")
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


def cmd_count(argv: list[str]) -> int:
    from vit_scale.data.shardset import count_shards
    from vit_scale.io import atomic_write_json

    p = Parser(
        prog="vit-scale shards count",
        description="Read every shard of SOURCE once and write a shard list with their sample counts: "
        "data.train=FILE then trains on SOURCE in exact mode, every rank the same number of batches.",
    )
    p.add_argument(
        "source",
        help="brace pattern, pipe: command or http(s) URL of tar shards, e.g. "
        "'pipe:aws s3 cp s3://bucket/train-{000000..000999}.tar -'",
    )
    p.add_argument("--out", required=True, help="the shard list to write (a .json file)")
    p.add_argument("--threads", type=at_least(1), default=8, help="shards read at once (default 8)")
    a = p.parse_args(argv)
    if not a.out.endswith(".json"):
        raise UserError(f"--out {a.out}: a shard list is a .json file; name it so")
    index = count_shards(a.source, threads=a.threads)
    atomic_write_json(Path(a.out), index)
    print(
        f"{index['num_samples']} samples in {index['num_shards']} shards, {index['num_classes']} classes "
        f"(largest label + 1); train on data.train={a.out}"
    )
    return 0


def _synth_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="vit-scale shards synth",
        description="Build an embedded corpus as shards: formula-driven fractals or font-drawn glyphs "
        "(pretraining), or scikit-learn's handwritten digits (transfer). Deterministic from the seed.",
    )
    sub = p.add_subparsers(dest="corpus", required=True)
    f = sub.add_parser("fractals", help="FractalDB-style IFS fractals, one class per random IFS")
    f.add_argument("--classes", type=int, required=True, help="number of categories (random IFS)")
    f.add_argument("--per-class", type=int, required=True, help="instances per category")
    f.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    f.add_argument("--out", required=True, help="output directory for the shards and index.json")
    f.add_argument("--seed", type=int, default=0, help="corpus seed: same seed, same bytes (default 0)")
    f.add_argument("--workers", type=at_least(1), default=None, help="processes (default: all cores)")
    f.add_argument("--shard-size", type=at_least(1), default=synth.SHARD_SIZE, help="samples per shard")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = sub.add_parser("glyphs", help="letters and symbols (no digits) drawn from fonts as optdigits scans")
    g.add_argument(
        "--classes",
        type=between(2, len(glyphs.CHARS)),
        default=len(glyphs.CHARS),
        help=f"characters, at most {len(glyphs.CHARS)} (default all)",
    )
    g.add_argument("--per-class", type=at_least(1), required=True, help="instances per character")
    g.add_argument(
        "--size", type=at_least(8), default=32, help="image side after upsampling the 8x8 counts (default 32)"
    )
    g.add_argument("--out", required=True, help="output directory for the shards and index.json")
    g.add_argument("--seed", type=int, default=0, help="corpus seed: same seed, same bytes (default 0)")
    g.add_argument("--workers", type=at_least(1), default=None, help="processes (default: all cores)")
    g.add_argument("--shard-size", type=at_least(1), default=glyphs.SHARD_SIZE, help="samples per shard")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = sub.add_parser("digits", help="scikit-learn's 1,797 handwritten digits, fixed train/test split")
    d.add_argument("--size", type=int, default=32, help="image side after upsampling (default 32)")
    d.add_argument("--out", required=True, help="output directory; gets train/ and test/")
    return p


def cmd_synth(argv: list[str]) -> int:
    args = _synth_parser().parse_args(argv)
    if args.corpus == "digits":
        from vit_scale.data.digits import write_digits

        write_digits(args.out, size=args.size)
        return 0
    write = glyphs.write_glyphs if args.corpus == "glyphs" else synth.write_fractals
    write(
        args.out,
        classes=args.classes,
        per_class=args.per_class,
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        shard_size=args.shard_size,
        progress=not args.no_progress,
    )
    return 0


COMMANDS = {
    "build": cmd_build,
    "merge-index": cmd_merge,
    "verify": cmd_verify,
    "stats": cmd_stats,
    "count": cmd_count,
    "synth": cmd_synth,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        raise UserError(f"unknown subcommand {cmd!r}; use one of {', '.join(COMMANDS)}")
    return COMMANDS[cmd](rest)
