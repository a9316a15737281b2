"""Few-shot linear evaluation: the paper's cheap metric (Section 4.1).

Frozen representations of `shots` training images per class are mapped by regularised least
squares onto {-1, 1}^K targets; the closed form is exact, so there is nothing to tune but the L2
weight. As in big_vision, features are standardised on the few-shot set and a constant column
(large, so the bias is barely regularised) is appended.

`vit-scale fewshot WEIGHTS --train SHARDS --test SHARDS [--shots 1,5,10,25] [--seeds 3]` evaluates
weights from the command line; during training `fewshot_metrics` runs on all ranks every
`eval.fewshot_every_steps` steps, as a hook of the loop (`vit_scale.evaluate.hooks`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vit_scale.config.schema import Config, DataConfig
from vit_scale.errors import UserError

BIAS_CONSTANT = 100.0


def linear_fewshot_predict(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, num_classes: int, l2: float
) -> torch.Tensor:
    """Predicted classes of x_test under the ridge regression fitted on (x_train, y_train)."""
    x = x_train.double()
    mean = x.mean(0, keepdim=True)
    std = x.std(0, unbiased=False, keepdim=True) + 1e-5

    def prep(f: torch.Tensor) -> torch.Tensor:
        f = (f.double() - mean) / std
        return torch.cat([f, torch.full((f.shape[0], 1), BIAS_CONSTANT, dtype=f.dtype)], dim=1)

    x = prep(x)
    y = 2.0 * torch.nn.functional.one_hot(y_train.long(), num_classes).double() - 1.0
    n, d = x.shape
    if n >= d:
        w = torch.linalg.solve(x.T @ x + l2 * torch.eye(d, dtype=x.dtype), x.T @ y)
    else:  # few points in many dimensions: the dual form solves an n × n system instead of d × d
        w = x.T @ torch.linalg.solve(x @ x.T + l2 * torch.eye(n, dtype=x.dtype), y)
    return (prep(x_test) @ w).argmax(1)


def sample_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` examples of every class present (all of a class that has fewer)."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picks.append(rng.choice(idx, size=min(shots, idx.size), replace=False))
    return np.sort(np.concatenate(picks))


def fewshot_scores(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    shots: list[int],
    seeds: int,
    l2: float,
    num_classes: int | None = None,
) -> dict[int, tuple[float, float]]:
    """{shots: (mean accuracy, std over seeds)} of the few-shot linear probe."""
    if y_train.ndim != 1:
        raise UserError("few-shot evaluation needs single-label (data.labels=int) shards")
    k = num_classes or int(max(y_train.max(), y_test.max())) + 1
    labels = y_train.numpy()
    out = {}
    for n in shots:
        accs = []
        for seed in range(seeds):
            idx = torch.from_numpy(sample_shots(labels, n, seed))
            pred = linear_fewshot_predict(x_train[idx], y_train[idx], x_test, k, l2)
            accs.append((pred == y_test).double().mean().item())
        out[n] = (float(np.mean(accs)), float(np.std(accs)))
    return out


# ---------------------------------------------------------------- representations of a shard set


def extract(
    model: nn.Module,
    source: str,
    data_cfg: DataConfig,
    *,
    img_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every sample of `source`, gathered from all ranks."""
    from vit_scale.data.transforms import to_model_input
    from vit_scale.evaluate.common import eval_loader, features, gather_rows

    loader = eval_loader(
        source, data_cfg, img_size=img_size, batch_size=batch_size, rank=rank, world_size=world_size
    )
    feats, labels = [], []
    for images, y in loader:
        feats.append(features(model, to_model_input(images.to(device))).float().cpu())
        labels.append(y.cpu())
    width = getattr(model, "num_features", 0)
    x = torch.cat(feats) if feats else torch.zeros(0, width)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    return gather_rows(x), gather_rows(y)


def source_pairs(train: str, test: str) -> list[tuple[str, str]]:
    """(train, test) shard sources: `;` separates several datasets, paired in order."""
    trains = [s.strip() for s in train.split(";") if s.strip()]
    tests = [s.strip() for s in test.split(";") if s.strip()]
    if len(trains) != len(tests):
        raise UserError(
            f"few-shot needs one test source per train source; got {len(trains)} train and {len(tests)} "
            "test (separate several with ';')"
        )
    return list(zip(trains, tests))


def fewshot_metrics(model: nn.Module, cfg: Config, rank: int, world_size: int) -> dict[str, float]:
    """Few-shot accuracies of the model being trained, `fewshot/<dataset>_<shots>shot`, seed-averaged.

    Called on every rank at once. A ZeRO-3-partitioned module is gathered into an fp32 copy first,
    so ranks may run different numbers of batches; features are all-gathered, and every rank
    computes the same numbers.
    """
    from vit_scale.dist import device as rank_device
    from vit_scale.evaluate.common import dataset_name, plain_copy

    e = cfg.eval
    device = rank_device()
    copy = plain_copy(model, cfg.model, device)
    # Few-shot sets are single-label even when pretraining is multi-label (JFT-style data.labels=multi).
    data_cfg = dataclasses.replace(cfg.data, mode="exact", augment="center", labels="int", weights=[])
    img_size = e.img_size or cfg.model.img_size
    out: dict[str, float] = {}
    for train, test in source_pairs(e.fewshot_train, e.fewshot_test):
        kw = dict(img_size=img_size, batch_size=e.batch_size, rank=rank, world_size=world_size, device=device)
        x_train, y_train = extract(copy, train, data_cfg, **kw)
        x_test, y_test = extract(copy, test, data_cfg, **kw)
        scores = fewshot_scores(
            x_train, y_train, x_test, y_test, e.fewshot_shots, e.fewshot_seeds, e.fewshot_l2
        )
        name = dataset_name(train)
        for shots, (mean, _) in scores.items():
            out[f"fewshot/{name}_{shots}shot"] = mean
    del copy
    return out


# ---------------------------------------------------------------- vit-scale fewshot


def fewshot_run(
    weights: str,
    train: str,
    test: str,
    run_dir: str | Path,
    *,
    shots: list[int],
    seeds: int,
    l2: float,
    img_size: int | None = None,
    batch_size: int = 256,
) -> dict:
    """Few-shot linear evaluation of the frozen representation of `weights` on each `train`/`test` pair
    (';'-separated), in this process; writes and returns RUN_DIR/results.json."""
    from vit_scale.checkpoint.weights import build_pretrained, load_pretrained
    from vit_scale.dist import device as rank_device
    from vit_scale.evaluate.common import dataset_name
    from vit_scale.models import set_resolution
    from vit_scale.observe.results import weights_label, write_results

    pre = load_pretrained(weights)
    model = build_pretrained(pre)
    img_size = img_size or pre.model.img_size
    if img_size != pre.model.img_size:
        try:
            set_resolution(model, img_size)
        except ValueError as e:
            raise UserError(f"image size {img_size}: {e}") from None
    device = rank_device()
    model = model.to(device).eval()
    data_cfg = DataConfig(workers=0, augment="center")
    rows, details = {}, {}
    for train_source, test_source in source_pairs(train, test):
        kw = dict(img_size=img_size, batch_size=batch_size, rank=0, world_size=1, device=device)
        x_train, y_train = extract(model, train_source, data_cfg, **kw)
        x_test, y_test = extract(model, test_source, data_cfg, **kw)
        if not len(x_train) or not len(x_test):
            raise UserError(f"few-shot sources {train_source} / {test_source} hold no samples")
        name = dataset_name(train_source)
        for n, (mean, std) in fewshot_scores(x_train, y_train, x_test, y_test, shots, seeds, l2).items():
            rows[f"{name} {n}-shot"] = {"top1": mean, "top1_std": std, "n": len(x_test)}
        details[name] = {"train": train_source, "test": test_source, "train_samples": len(x_train)}
    results = {
        "kind": "fewshot",
        "model": weights_label(weights),
        "metric": "top1",
        "datasets": rows,
        "details": {"weights": str(weights), "seeds": seeds, "l2": l2, "img_size": img_size, "sources": details},
    }
    write_results(run_dir, results)
    return results
