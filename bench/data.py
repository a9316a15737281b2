"""Decoded and augmented images/s: our shard pipeline vs torchvision ImageFolder + DataLoader.

Both read the same ImageNet-like JPEGs (500×375, cut from the photos that ship with scikit-learn), apply
the same 224-px training transform (inception crop with area 0.05..1, horizontal flip, uint8 tensor out)
with the same worker count and batch size, in one run each on this machine.

    .venv/bin/python bench/data.py --images 1024 --workers 2
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def make_image_folder(root: Path, n: int, classes: int = 4) -> None:
    """n distinct 500×375 JPEGs (quality 90): random crops, scales and flips of the sklearn photos."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    for i in range(n):
        pic = photos[i % len(photos)]
        scale = rng.uniform(1.0, 1.25)
        big = pic.resize((round(pic.width * scale), round(pic.height * scale)), Image.BICUBIC)
        x, y = int(rng.integers(0, big.width - 500)), int(rng.integers(0, big.height - 375))
        img = big.crop((x, y, x + 500, y + 375))
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
    wall = (seen - skip) / (time.perf_counter() - start)
    del batches
    gc.collect()  # shuts the DataLoader workers down, so their CPU time is counted
    return wall, seen / (cpu_seconds() - cpu0)


def bench_ours(shards: Path, images: int, workers: int, batch: int) -> float:
    from vit_scale.config.schema import DataConfig
    from vit_scale.data.loader import make_loader

    cfg = DataConfig(workers=workers, shuffle_buffer=256)
    return rate(lambda: make_loader(str(shards), cfg, train=True, img_size=224, batch_size=batch), images)


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
    p.add_argument("--measure", type=int, default=0, help="images to time per loader (default: 2 epochs)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dir", default="", help="work directory (default: a temporary one)")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from vit_scale.data.build import build

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.dir or tmp)
        root, shards = work / "imagefolder", work / "shards"
        if not root.exists():
            make_image_folder(root, a.images)
        shard_size = max(1, a.images // (4 * max(1, a.workers)))
        build(str(root), str(shards), shard_size=shard_size, workers=max(1, a.workers), progress=False)
        measure = a.measure or 2 * a.images
        tv = bench_torchvision(root, measure, a.workers, a.batch)
        ours = bench_ours(shards, measure, a.workers, a.batch)
    print(
        f"corpus: {a.images} JPEGs 500x375 q90, 224-px inception crop + flip, batch {a.batch}, "
        f"{a.workers} workers, {measure} images timed per loader, {os.cpu_count()} CPUs visible, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"torchvision ImageFolder+DataLoader: {tv[0]:8.1f} images/s wall, {tv[1]:7.1f} images per CPU-second"
    )
    print(
        f"vit-scale shards pipeline:          {ours[0]:8.1f} images/s wall, {ours[1]:7.1f} images per CPU-second"
    )
    print(f"ratio: {ours[0] / tv[0]:.2f}x wall, {ours[1] / tv[1]:.2f}x per CPU-second")
    return 0


if __name__ == "__main__":
    sys.exit(main())
