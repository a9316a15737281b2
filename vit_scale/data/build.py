"""`vit-scale shards build`: a corpus in, tar shards and index.json out, in parallel, resumable.

The main process lists and reads inputs in a fixed order; a process pool checks, converts and resizes them;
results are written back in input order, so the shards are the same whatever the worker count, and a
re-run after an interruption continues from the last completed shard.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from vit_scale.config.tasks import VTAB_TASKS, canonical
from vit_scale.data.shards import INDEX_NAME, PROGRESS_NAME, ShardWriter
from vit_scale.data.sources import load_corpus, read_items, select
from vit_scale.errors import UserError
from vit_scale.io import writable_dir

JPEG_QUALITY = 90
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class SkipInput(Exception):
    """An input that cannot become a sample; the message is the reason listed in index.json."""


def convert(data: bytes | None, max_side: int, quality: int = JPEG_QUALITY) -> tuple[bytes, str, dict]:
    """(encoded RGB image, extension, metadata) for one input, or SkipInput with the reason.

    Original bytes are kept when the image is RGB, in a format the pipeline decodes, and small enough;
    anything else (grayscale, CMYK, palette, PNG data in a .JPEG file that must shrink, too large) is
    decoded, converted to RGB, resized so the longer side is at most `max_side`, and re-encoded as JPEG.
    """
    if data is None:
        raise SkipInput("unreadable")
    if not data:
        raise SkipInput("zero-byte file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, size = im.format, im.mode, im.size
            im.load()  # a truncated file fails here, not at training time
            too_big = max_side > 0 and max(size) > max_side
            meta = {"width": size[0], "height": size[1], "format": fmt, "mode": mode}
            if not too_big and mode == "RGB" and fmt in _KEEP_FORMATS:
                return data, _KEEP_FORMATS[fmt], meta
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                # Transparent pixels over white, not over whatever colour the encoder left in them.
                rgba = im.convert("RGBA")
                rgb = Image.new("RGB", rgba.size, (255, 255, 255))
                rgb.paste(rgba, mask=rgba.getchannel("A"))
            else:
                rgb = im.convert("RGB")
    except SkipInput:
        raise
    except Exception as e:  # PIL raises many types for broken or foreign files; all mean "skip it"
        text = str(e).split("\n")[0][:120]
        if isinstance(e, Image.UnidentifiedImageError):
            raise SkipInput("not an image (undecodable)") from None
        raise SkipInput(f"undecodable image ({type(e).__name__}: {text})") from None
    if too_big:
        scale = max_side / max(size)
        new = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        rgb = rgb.resize(new, Image.BICUBIC, reducing_gap=3.0)
        meta["resized"] = list(new)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), "jpg", meta


def _convert_task(args):
    data, max_side, quality = args
    try:
        return convert(data, max_side, quality), ""
    except SkipInput as e:
        return None, str(e)


def build(
    source: str,
    out: str,
    *,
    fmt: str = "",
    split: str = "",
    max_side: int = 0,
    quality: int = JPEG_QUALITY,
    shard_size: int = 1000,
    shard_bytes: int | None = None,
    workers: int = 1,
    holdout: int = 0,
    part: int = 0,
    parts: int = 1,
    force: bool = False,
    progress: bool = True,
    multi_label: bool = False,
    follow_links: bool = False,
    task: str = "",
) -> dict:
    """Build shards; returns the index. A complete build with the same options is left as it is.

    `multi_label` declares a CSV list multi-label (an empty label is then an image of no class);
    `follow_links` reads links and list entries that lead outside the source (see `sources.load_corpus`).
    `task` (a VTAB-1k task name; for `--format vtab` by default the source folder's name when it is one)
    goes into index.json, where validation finds which augmentations would change the labels."""
    if parts < 1 or not 0 <= part < parts:
        raise UserError(f"--array-index {part} must be in 0..{parts - 1} for --array-count {parts}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    writable_dir(out, "--out")  # listing a large corpus takes minutes: refuse an unwritable --out first
    corpus = load_corpus(source, fmt, split, multi_label=multi_label, follow_links=follow_links)
    task = dataset_task(source, corpus.format, task)
    options = {
        "source": str(Path(source).resolve()),
        "format": corpus.format,
        "task": task,
        "split": split,
        "max_side": max_side,
        "quality": quality,
        "val_holdout": holdout,
        "array_index": part,
        "array_count": parts,
        "multi_label": multi_label,
        "follow_links": follow_links,
    }
    out_dir = Path(out)
    if parts > 1:
        out_dir = out_dir / f"part-{part:05d}"
    index_path = out_dir / INDEX_NAME
    if index_path.exists() and not (out_dir / PROGRESS_NAME).exists() and not force:
        done = json.loads(index_path.read_text())
        if done.get("build") == options and done.get("shard_size") == shard_size:
            return done
        raise UserError(f"{out_dir} already holds shards built with other options; use --force to rebuild")
    if force:
        index_path.unlink(missing_ok=True)
    items = select(corpus.items, holdout=holdout, split=split, part=part, parts=parts)
    extra = {"build": options, "shard_size": shard_size, "empty_classes": corpus.empty_classes}
    if task:
        extra["task"] = task
    with ShardWriter(
        out_dir,
        shard_size=shard_size,
        shard_bytes=shard_bytes,
        classes=corpus.classes,
        split=split,
        resume=not force,
        extra=extra,
        progress_key=options,
    ) as writer:
        if writer.resume_inputs == 0:
            # Inputs unusable at listing time (non-images, unreadable synset tars) are recorded once.
            for u in corpus.unusable if part == 0 else []:
                writer.skipped.append(u)
        todo = items[writer.resume_inputs :]
        _write_all(writer, todo, max_side, quality, workers, progress, resumed=writer.resume_inputs)
        index = writer.close()
    return index


def dataset_task(source: str, fmt: str, task: str) -> str:
    """The task to record: the one named (which must be a VTAB-1k task), else for a VTAB-1k folder its name
    when that names a task, else none."""
    if task:
        if canonical(task) not in VTAB_TASKS:
            known = ", ".join(VTAB_TASKS)
            raise UserError(f"--task {task!r} is not a VTAB-1k task; the 19 tasks are: {known}")
        return canonical(task)
    folder = canonical(Path(source).resolve().name)
    return folder if fmt == "vtab" and folder in VTAB_TASKS else ""


def _write_all(writer, items, max_side, quality, workers, progress, resumed) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]shards build"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>7.1f} images/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("build", total=len(items) + resumed, completed=resumed, rate=0.0)
        results = _converted(items, max_side, quality, workers)
        for n, (item, result, reason) in enumerate(results, 1):
            if result is None:
                writer.skip(item.source, reason)
            else:
                image, ext, meta = result
                writer.write(item.key, image, ext, item.label, {"source": item.source, **item.meta, **meta})
            elapsed = bar.tasks[0].elapsed or 0.0
            bar.update(task, advance=1, rate=n / elapsed if elapsed > 0 else 0.0)


def _converted(items, max_side, quality, workers):
    """(item, (bytes, ext, meta) or None, reason) in input order, converting up to `workers` at a time."""
    reads = read_items(items)
    if workers == 1:
        for item, data, error in reads:
            if error:
                yield item, None, error
                continue
            result, reason = _convert_task((data, max_side, quality))
            yield item, result, reason
        return
    # A bounded window of futures: inputs are read only as fast as they are converted (memory stays flat).
    window = 8 * workers
    pending: deque = deque()
    # Spawned, not forked: the progress bar's thread may hold a lock at fork time, and a worker needs only
    # PIL and this module (about 0.1 s to import).
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for item, data, error in reads:
            fut = None if error else pool.submit(_convert_task, (data, max_side, quality))
            pending.append((item, fut, error))
            if len(pending) >= window:
                yield _settle(pending.popleft())
        while pending:
            yield _settle(pending.popleft())


def _settle(entry):
    item, fut, error = entry
    if fut is None:
        return item, None, error
    result, reason = fut.result()
    return item, result, reason


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
