"""A formula-driven pretraining corpus in the style of FractalDB (Kataoka et al., ACCV 2020).

One category is one random iterated function system (IFS): a few contractive 2-D affine maps. Its
instances are drawn by the chaos game with the maps' parameters jittered, and with their own colours,
background, rotation, flip, scale and placement, so a model has to learn the shape of the attractor,
not one picture. Categories whose attractor is degenerate (a line, a point, a few dots) are rejected
with FractalDB's fill-rate filter, measured at a fixed resolution whatever the output size.

Everything is a pure function of (seed, class, instance): the bytes do not depend on the number of
worker processes, and the corpus can be made as large as a throughput test needs.

    vit-scale shards synth fractals --classes 100 --per-class 100 --size 64 --out data/fractals
    vit-scale shards synth glyphs --per-class 300 --size 24 --out data/glyphs   (see vit_scale.data.glyphs)
    vit-scale shards synth digits --size 32 --out data/digits      (see vit_scale.data.digits)
"""

from __future__ import annotations

import io
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vit_scale.errors import UserError

# FractalDB keeps an IFS when its points cover at least this fraction of the image (their "filling rate").
MIN_FILL = 0.12
FILL_GRID = 64  # resolution at which the fill rate is measured, so the filter does not depend on --size
MAPS = (2, 4)  # maps per IFS, inclusive; FractalDB draws 2..8, fewer maps give more distinct shapes
CHAINS = 512  # chaos-game chains advanced together (the vectorised dimension)
BURN_IN = 12  # steps before a chain's points lie on the attractor (contraction < 1 makes this enough)
JITTER = 0.08  # relative perturbation of each map parameter per instance (FractalDB's "weight" variation)
JPEG_QUALITY = 90
SHARD_SIZE = 1000


@dataclass(frozen=True)
class IFS:
    """Affine maps x -> A x + b with their choice probabilities (proportional to |det A|, as FractalDB)."""

    A: np.ndarray  # [m, 2, 2]
    b: np.ndarray  # [m, 2]
    p: np.ndarray  # [m]


def _probabilities(A: np.ndarray) -> np.ndarray:
    det = np.abs(np.linalg.det(A)) + 1e-3  # a map of zero area still gets picked now and then
    return det / det.sum()


def chaos_game(ifs: IFS, rng: np.random.Generator, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points on the attractor [CHAINS * steps, 2] and the index of the map that produced each."""
    x = rng.uniform(-1.0, 1.0, size=(CHAINS, 2))
    choices = rng.choice(len(ifs.p), size=(BURN_IN + steps, CHAINS), p=ifs.p)
    points = np.empty((steps, CHAINS, 2))
    for t in range(BURN_IN + steps):
        k = choices[t]
        x = np.einsum("cij,cj->ci", ifs.A[k], x) + ifs.b[k]
        if t >= BURN_IN:
            points[t - BURN_IN] = x
    return points.reshape(-1, 2), choices[BURN_IN:].reshape(-1)


def _normalise(points: np.ndarray) -> np.ndarray:
    """Points scaled into [0, 1]^2 with the aspect ratio kept and the shape centred."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    extent = float((hi - lo).max()) or 1.0
    return (points - (lo + hi) / 2) / extent + 0.5


def fill_rate(ifs: IFS, rng: np.random.Generator) -> float:
    pts, _ = chaos_game(ifs, rng, steps=40)
    if not np.isfinite(pts).all():
        return 0.0
    ij = np.clip((_normalise(pts) * FILL_GRID).astype(int), 0, FILL_GRID - 1)
    return len(np.unique(ij[:, 0] * FILL_GRID + ij[:, 1])) / FILL_GRID**2


def category(seed: int, label: int) -> IFS:
    """The IFS of one category: random contractive maps, redrawn until the attractor fills the frame."""
    rng = np.random.default_rng([seed, label, 0])
    while True:
        m = int(rng.integers(MAPS[0], MAPS[1] + 1))
        A = rng.uniform(-1.0, 1.0, size=(m, 2, 2))
        # Contractive maps (largest singular value < 1) have a bounded attractor the chaos game finds.
        sigma = np.linalg.norm(A, ord=2, axis=(1, 2))
        A = A / np.maximum(sigma / rng.uniform(0.5, 0.9, size=m), 1.0)[:, None, None]
        ifs = IFS(A, rng.uniform(-1.0, 1.0, size=(m, 2)), _probabilities(A))
        if fill_rate(ifs, rng) >= MIN_FILL:
            return ifs


def _rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def render(ifs: IFS, rng: np.random.Generator, size: int) -> np.ndarray:
    """One instance [size, size, 3] uint8: jittered maps, random pose, colours and background."""
    A = ifs.A * (1.0 + rng.uniform(-JITTER, JITTER, size=ifs.A.shape))
    b = ifs.b * (1.0 + rng.uniform(-JITTER, JITTER, size=ifs.b.shape))
    # About a dozen points per pixel gives solid shapes with visible density at any size.
    steps = max(8, (12 * size * size) // CHAINS)
    pts, which = chaos_game(IFS(A, b, _probabilities(A)), rng, steps)
    pts = pts[np.isfinite(pts).all(axis=1)]
    which = which[: len(pts)]

    pose = _rotation(rng.uniform(0, 2 * np.pi)) * np.array([rng.choice([-1.0, 1.0]), 1.0])
    pts = _normalise(pts @ pose.T) - 0.5
    scale = rng.uniform(0.55, 0.95)
    centre = 0.5 + rng.uniform(-1, 1, size=2) * (1 - scale) / 2
    ij = np.clip(((pts * scale + centre) * size).astype(int), 0, size - 1)
    flat = ij[:, 1] * size + ij[:, 0]

    # Each map gets its own colour: the texture shows which map drew which part, as in coloured FractalDB.
    palette = rng.uniform(0.25, 1.0, size=(len(A), 3))
    counts = np.bincount(flat, minlength=size * size).astype(np.float64)
    colour = (
        np.stack(
            [np.bincount(flat, weights=palette[which, ch], minlength=size * size) for ch in range(3)], axis=1
        )
        / np.maximum(counts, 1.0)[:, None]
    )
    alpha = np.clip(np.log1p(counts) / np.log1p(np.percentile(counts[counts > 0], 90)), 0.0, 1.0)[:, None]
    background = rng.uniform(0.0, 0.35, size=3)
    image = background * (1 - alpha) + colour * alpha
    return (image.reshape(size, size, 3) * 255).round().astype(np.uint8)


def encode_jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def sample(seed: int, label: int, instance: int, size: int, ifs: IFS | None = None) -> np.ndarray:
    """Instance `instance` of class `label`: the same pixels for the same arguments, on any machine."""
    ifs = ifs if ifs is not None else category(seed, label)
    return render(ifs, np.random.default_rng([seed, label, 1, instance]), size)


def class_name(label: int) -> str:
    return f"fractal_{label:05d}"


# ---------------------------------------------------------------- writing a corpus in parallel


# Each worker process builds a category's IFS once and reuses it for all its instances.
_CATEGORIES: dict[tuple[int, int], IFS] = {}


def _encode_batch(job: tuple[int, int, list[tuple[int, int]]]) -> list[tuple[str, bytes, int, dict]]:
    seed, size, items = job
    out = []
    for label, instance in items:
        ifs = _CATEGORIES.get((seed, label))
        if ifs is None:
            ifs = _CATEGORIES[(seed, label)] = category(seed, label)
        key = f"{class_name(label)}_{instance:06d}"
        meta = {"source": "fractals", "seed": seed, "instance": instance, "maps": len(ifs.p)}
        out.append((key, encode_jpeg(sample(seed, label, instance, size, ifs)), label, meta))
    return out


def order(classes: int, per_class: int) -> list[tuple[int, int]]:
    """Instance-major order: every shard holds all classes in equal numbers, so streaming needs no sort."""
    return [(label, i) for i in range(per_class) for label in range(classes)]


def write_fractals(
    out: str | os.PathLike,
    classes: int,
    per_class: int,
    size: int,
    seed: int = 0,
    workers: int | None = None,
    shard_size: int = SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Generate `classes * per_class` fractal images of `size` px into shards under `out`."""
    if classes < 2 or per_class < 1 or size < 16:
        raise UserError(
            f"fractals: need --classes >= 2, --per-class >= 1 and --size >= 16 (got {classes}, {per_class}, {size})"
        )
    recipe = {"corpus": "fractals", "seed": seed, "classes": classes, "per_class": per_class, "size": size}
    names = [class_name(c) for c in range(classes)]
    return write_generated(out, _encode_batch, recipe, names, workers, shard_size, progress)


def write_generated(
    out: str | os.PathLike,
    encode_batch,
    recipe: dict,
    names: list[str],
    workers: int | None,
    shard_size: int,
    progress: bool,
) -> Path:
    """Shards of a generated corpus: recipe["per_class"] instances of each class in `names`, made by
    `encode_batch((seed, size, [(label, instance), ...])) -> [(key, jpeg, label, meta), ...]` in
    `workers` processes; the recipe is recorded in index.json as its "generator"."""
    from vit_scale.data.shards import ShardWriter  # the data area's writer, shared by every producer

    workers = max(1, workers or os.cpu_count() or 1)
    items = order(len(names), recipe["per_class"])
    batch = max(1, min(64, len(items) // (4 * workers) or 1))
    jobs = [(recipe["seed"], recipe["size"], items[i : i + batch]) for i in range(0, len(items), batch)]
    out = Path(out)
    with (
        ShardWriter(
            out, shard_size=shard_size, classes=names, split="train", extra={"generator": recipe}
        ) as writer,
        _progress(progress) as bar,
    ):
        task = bar.add_task(
            f"{recipe['corpus']} {len(names)}x{recipe['per_class']} @{recipe['size']}px", total=len(items)
        )
        # A fork-free context: workers import only what they need and never inherit a process group.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers) if workers > 1 else _Inline() as pool:
            for results in pool.imap(encode_batch, jobs):
                for key, data, label, meta in results:
                    writer.write(key, data, "jpg", label, meta)
                bar.advance(task, len(results))
    return out


class _Inline:
    """The Pool interface in this process, for --workers 1 (no spawn cost, easy to debug)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, jobs):
        return map(fn, jobs)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


# ---------------------------------------------------------------- command line
