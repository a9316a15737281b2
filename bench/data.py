"""Decoded and augmented images/s: our shard pipeline vs torchvision ImageFolder + DataLoader.

Both read the same JPEGs (500×375 by default, ImageNet-like; --size 1024x768 for larger photos), cut from the
photos that ship with scikit-learn, apply the same 224-px training transform (inception crop with area
0.05..1, horizontal flip, uint8 tensor out) with the same worker count and batch size, in one run each on
this machine.

    .venv/bin/python bench/data.py --images 1024 --workers 2
    .venv/bin/python bench/data.py --images 1024 --workers 2 --size 1024x768

--compare-decode instead times our pipeline with data.decode=cpu against data.decode=gpu on the same shards
(bench/gpu.sh runs it on a GPU; `--device cpu` runs the GPU path's code on the CPU, to test this script).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def sample_photos() -> list[Image.Image]:
    """The two photos (640×427) that ship inside scikit-learn, found without importing it (a GPU machine may
    have its files unpacked from the wheel but not its dependencies)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench/data.py: the corpus is cut from scikit-learn's sample photos; install scikit-learn")
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "images"
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.jpg"))]


def make_image_folder(root: Path, n: int, classes: int = 4, size: tuple[int, int] = (500, 375)) -> None:
    """n distinct JPEGs of `size` (quality 90): random crops, scales and flips of the sklearn photos. Sizes
    above the photos' own 640×427 are upscaled, so they hold less fine detail per pixel than real photos."""
    photos = sample_photos()
    rng = np.random.default_rng(0)
    width, height = size
    for i in range(n):
        pic = photos[i % len(photos)]
        scale = rng.uniform(1.0, 1.25) * max(1.0, width / pic.width, height / pic.height)
        big = pic.resize((round(pic.width * scale), round(pic.height * scale)), Image.BICUBIC)
        x, y = int(rng.integers(0, big.width - width + 1)), int(rng.integers(0, big.height - height + 1))
        img = big.crop((x, y, x + width, y + height))
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        d = root / f"class_{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"img_{i:05d}.jpg", quality=90)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers, once shut down)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def rate(make_batches, total: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) over `total` images.

    The CPU figure is the per-core rate, and unlike wall time it holds on a machine shared with other
    work; it includes worker start-up, so it slightly understates steady state for both loaders alike.
    """
    cpu0 = cpu_seconds()
    batches = make_batches()
    seen, start = 0, None
    for images, _ in batches:
        if start is None:  # wall time from the first batch: worker start-up is not throughput
            start, skip = time.perf_counter(), images.shape[0]
        seen += images.shape[0]
        if seen >= total:
            break
    if images.is_cuda:  # the GPU decode path returns before its kernels finish
        import torch

        torch.cuda.synchronize()
    wall = (seen - skip) / (time.perf_counter() - start)
    del batches
    gc.collect()  # shuts the DataLoader workers down, so their CPU time is counted
    return wall, seen / (cpu_seconds() - cpu0)


def bench_ours(
    shards: Path, images: int, workers: int, batch: int, decode: str = "cpu", device=None
) -> float:
    from vit_scale.config.schema import DataConfig
    from vit_scale.data.loader import make_loader

    cfg = DataConfig(workers=workers, shuffle_buffer=256, decode=decode)
    return rate(
        lambda: make_loader(str(shards), cfg, train=True, img_size=224, batch_size=batch, device=device),
        images,
    )


def bench_torchvision(root: Path, images: int, workers: int, batch: int) -> float:
    import itertools

    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.RandomResizedCrop(224, scale=(0.05, 1.0)), T.RandomHorizontalFlip(), T.PILToTensor()])
    ds = ImageFolder(str(root), transform=tf)

    def batches():
        loader = DataLoader(
            ds,
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            persistent_workers=workers > 0,
        )
        return itertools.chain.from_iterable(itertools.repeat(loader))  # endless, like the training loader

    return rate(batches, images)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1024, help="distinct JPEGs in the corpus")
    p.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the corpus's JPEGs")
    p.add_argument("--measure", type=int, default=0, help="images to time per loader (default: 2 epochs)")
    p.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of the two loaders; medians count"
    )
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dir", default="", help="work directory (default: a temporary one)")
    p.add_argument(
        "--compare-decode", action="store_true", help="data.decode=cpu vs gpu instead of torchvision"
    )
    p.add_argument("--device", default="cuda", help="where --compare-decode's GPU path decodes")
    a = p.parse_args(argv)
    width, height = (int(v) for v in a.size.split("x"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from vit_scale.data.build import build

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.dir or tmp)
        root, shards = work / "imagefolder", work / "shards"
        if not root.exists():
            make_image_folder(root, a.images, size=(width, height))
        shard_size = max(1, a.images // (4 * max(1, a.workers)))
        build(str(root), str(shards), shard_size=shard_size, workers=max(1, a.workers), progress=False)
        measure = a.measure or 2 * a.images
        if a.compare_decode:
            import torch

            names = ["vit-scale data.decode=cpu:", f"vit-scale data.decode=gpu ({a.device}):"]
            loaders = [
                lambda: bench_ours(shards, measure, a.workers, a.batch),
                lambda: bench_ours(shards, measure, a.workers, a.batch, "gpu", torch.device(a.device)),
            ]
        else:
            names = ["torchvision ImageFolder+DataLoader:", "vit-scale shards pipeline:"]
            loaders = [
                lambda: bench_torchvision(root, measure, a.workers, a.batch),
                lambda: bench_ours(shards, measure, a.workers, a.batch),
            ]
        # Alternating rounds: on a shared machine the load drifts within minutes, and a ratio taken inside
        # one round, both loaders under about the same load, is far steadier than either rate.
        rounds = [[run() for run in loaders] for _ in range(max(1, a.rounds))]
    print(
        f"corpus: {a.images} JPEGs {width}x{height} q90, 224-px inception crop + flip, batch {a.batch}, "
        f"{a.workers} workers, {measure} images timed per loader, {len(rounds)} rounds, {os.cpu_count()} CPUs "
        f"visible, load average {load:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    for i, name in enumerate(names):
        wall, per_cpu = (statistics.median(r[i][j] for r in rounds) for j in (0, 1))
        print(f"{name:36s}{wall:8.1f} images/s wall, {per_cpu:7.1f} images per CPU-second  (median)")
    ratios = [(r[1][0] / r[0][0], r[1][1] / r[0][1]) for r in rounds]
    each = ", ".join(f"{cpu:.2f}" for _, cpu in ratios)
    print(
        f"ratio: {statistics.median(w for w, _ in ratios):.2f}x wall, "
        f"{statistics.median(c for _, c in ratios):.2f}x per CPU-second (median of rounds; per round: {each})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
