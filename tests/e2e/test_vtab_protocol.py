"""The VTAB-1k protocol through the real command: a fine-tune on a task whose label a crop or a flip would
change trains on the stored images resized whole to the fine-tune resolution, and on nothing else."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transfer_helpers import official_npz_arrays

from vit_scale.cli import main as cli
from vit_scale.data.shards import read_index
from vit_scale.data.tar import tar_samples
from vit_scale.data.transforms import decode_rgb, resize_transform

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
SIZE = 32  # the fine-tune resolution (4x4 patches of 8 pixels)


def write_task_folder(root: Path, task: str, classes: int, seed: int = 0) -> Path:
    """A VTAB-1k task folder whose images are 56 wide and 40 high, with a bright blob left of centre: a flip,
    a crop or a centre crop each give an image that no plain resize of a stored one equals."""
    rng = np.random.default_rng(seed)
    d = root / task
    (d / "images").mkdir(parents=True)
    lists: dict[str, list[str]] = {"train800": [], "val200": [], "test": []}
    for split, per_class in (("train800", 3), ("val200", 1), ("test", 2)):
        for label in range(classes):
            for j in range(per_class):
                img = rng.integers(0, 80, (40, 56, 3), dtype=np.uint8)
                x = 4 + 6 * label
                img[10:30, x : x + 12] = 230
                rel = f"images/{split}_{label}_{j}.jpg"
                Image.fromarray(img).save(d / rel, quality=95)
                lists[split].append(f"{rel} {label}")
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for split, lines in lists.items():
        (d / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return d


def stored_jpegs(shards: Path) -> list[bytes]:
    out = []
    for entry in read_index(shards)["shards"]:
        with open(shards / entry["name"], "rb") as f:
            out += [sample["jpg"] for sample in tar_samples(f)]
    return out


def test_vtab_fine_tune_trains_on_the_stored_images_resized_whole(tmp_path):
    folder = write_task_folder(tmp_path / "raw", "dsprites_loc", classes=3)
    root = tmp_path / "vtab"
    for split in ("train800val200", "test"):
        out = root / "dsprites_loc" / split
        args = [str(folder), "--out", str(out), "--format", "vtab", "--split", split, "--shard-size", "4"]
        assert cli(["shards", "build", *args, "--workers", "1", "--no-progress"]) == 0
    weights = tmp_path / "w.npz"
    np.savez(weights, **official_npz_arrays(np.random.default_rng(0), img=SIZE, classes=5))

    steps, batch = 4, 4
    seen_file = tmp_path / "seen.pt"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("capture_inputs.py")), str(seen_file),
         "vtab", str(weights), "--data", str(root), "--task", "dsprites_loc", "--run-dir", str(tmp_path / "run"),
         f"model.img_size={SIZE}", f"train.steps={steps}", f"train.global_batch={batch}", "eval.batch_size=8",
         "data.workers=0", "precision.dtype=fp32", "logging.wandb=disabled", "logging.progress=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dsprites_loc: top-1" in proc.stdout

    seen = torch.load(seen_file)
    assert len(seen) == steps and all(x.shape == (batch, 3, SIZE, SIZE) for x in seen)
    # What the model saw, back in pixels: to_model_input maps uint8 p to p / 127.5 - 1 in fp32.
    pixels = [img for x in seen for img in ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)]
    stored = [decode_rgb(j) for j in stored_jpegs(root / "dsprites_loc" / "train800val200")]
    assert len(stored) == 12 and all(img.shape == (3, 40, 56) for img in stored)
    resized = {resize_transform(img, SIZE).numpy().tobytes() for img in stored}
    flipped = {resize_transform(img, SIZE).flip(-1).numpy().tobytes() for img in stored}
    assert not resized & flipped  # the images are asymmetric, so a flip would be caught
    for img in pixels:
        assert img.numpy().tobytes() in resized
    assert len({img.numpy().tobytes() for img in pixels}) == 12  # 16 inputs: every stored image, some twice
