"""Few-shot linear evaluation: the paper's cheap metric (Section 4.1).

Frozen representations of `shots` training images per class are mapped by regularised least
squares onto {-1, 1}^K targets, in closed form. As in big_vision, features are standardised on the
few-shot set and a constant column (large, so the bias is barely regularised) is appended.

Two choices differ from big_vision's evaluator, because its fixed settings fail on some features:

- The L2 penalty is chosen per fit by exact leave-one-out cross-validation within the shots: the
  candidate on `L2_GRID` whose leave-one-out predictions classify the shots best (ties: the least
  leave-one-out squared error, PRESS, as scikit-learn's RidgeCV). Every candidate costs one pass over
  an eigendecomposition made once. The grid is relative to the mean squared norm of the standardised
  features (about their width), so it means the same for any width; big_vision's fixed 2^10 on
  768-1024-wide ViT features is about 1x that norm. A fixed penalty is either too weak near n = d,
  where the fit interpolates and accuracy dips as shots grow (32 px digit pixels with l2 = 1: 71.9% at
  5 shots, 63.9% at 10), or too strong for correlated features (a random-init ViT's at 5 shots: 58%
  with l2 = 1, 32% with 1024). Choosing by PRESS alone picked too strong a penalty there (45%).
  With one shot the held-out example's class is absent from the rest, every candidate misclassifies
  it, and PRESS decides. `l2=` fixes the penalty instead (big_vision: 1024).
- A feature's variance is floored at `VAR_FLOOR` of the mean feature variance before dividing by its
  square root. A feature that barely moves across the shots (a background pixel, JPEG noise) would
  otherwise be blown up to unit scale by a 1e-5 guard and dominate; now no feature is amplified more
  than 1/sqrt(VAR_FLOOR), about 3x, beyond a typical one.

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
VAR_FLOOR = 0.1
# Candidate penalties, times the mean squared norm of the standardised features. Wide, because the
# right penalty follows the spectrum: about 1 on pixels, 2^-6 to 2^-16 on the strongly correlated
# features of a randomly initialised ViT (measured on the demo's digits).
L2_GRID = tuple(2.0**k for k in range(-20, 9))


def _standardise(x_train: torch.Tensor):
    """The map feature -> standardised feature + bias column, fitted on the shots (float64)."""
    x = x_train.double()
    mean = x.mean(0, keepdim=True)
    var = x.var(0, unbiased=False, keepdim=True)
    std = (var + VAR_FLOOR * var.mean()).sqrt()
    if not bool((std > 0).all()):  # every feature constant across the shots: nothing to scale by
        std = torch.ones_like(std)

    def prep(f: torch.Tensor) -> torch.Tensor:
        f = (f.double() - mean) / std
        return torch.cat([f, torch.full((f.shape[0], 1), BIAS_CONSTANT, dtype=f.dtype)], dim=1)

    return prep


def _loo_l2(a: torch.Tensor, y: torch.Tensor, scale: float) -> float:
    """The penalty on L2_GRID * scale whose leave-one-out predictions classify the shots best; among
    equals, the one with the least leave-one-out squared error (PRESS), then the larger.

    With Z (n x r) such that a a^T = Z Z^T and Z^T Z = diag(e), the hat matrix of penalty l2 is
    Z diag(1/(e + l2)) Z^T, and the prediction for row i of a fit without row i is
    y_i - (y_i - yhat_i) / (1 - h_ii): exact, with no refit (the standardisation stays the one fitted
    on all shots).
    """
    n, d = a.shape
    if n >= d:
        e, v = torch.linalg.eigh(a.T @ a)
        z = a @ v
    else:
        e, q = torch.linalg.eigh(a @ a.T)
        z = q * e.clamp_min(0.0).sqrt()
    e = e.clamp_min(0.0)  # a Gram matrix's eigenvalues, negative only by rounding
    zy = z.T @ y
    truth = y.argmax(1)
    best, best_key = None, None
    for rel in sorted(L2_GRID, reverse=True):
        l2 = rel * scale
        g = 1.0 / (e + l2)
        fit = z @ (g[:, None] * zy)
        h = (z * z) @ g
        loo = y - (y - fit) / (1.0 - h).clamp_min(1e-12)[:, None]
        key = (-int((loo.argmax(1) == truth).sum()), float(((loo - y) ** 2).sum()))
        if best_key is None or key < best_key:  # strict: from the largest down, ties keep the larger
            best, best_key = l2, key
    return best


def linear_fewshot_fit(
    x_train: torch.Tensor, y_train: torch.Tensor, num_classes: int, l2: float | None = None
):
    """(predict, l2): a function from features to class scores fitted on the shots, and the penalty used
    (chosen by leave-one-out when `l2` is None)."""
    prep = _standardise(x_train)
    x = prep(x_train)
    y = 2.0 * torch.nn.functional.one_hot(y_train.long(), num_classes).double() - 1.0
    n, d = x.shape
    if l2 is None:
        scale = float((x[:, :-1] ** 2).sum(1).mean()) or 1.0
        l2 = _loo_l2(x, y, scale)
    if n >= d:
        w = torch.linalg.solve(x.T @ x + l2 * torch.eye(d, dtype=x.dtype), x.T @ y)
    else:  # few points in many dimensions: the dual form solves an n × n system instead of d × d
        w = x.T @ torch.linalg.solve(x @ x.T + l2 * torch.eye(n, dtype=x.dtype), y)
    return (lambda f: prep(f) @ w), l2


def linear_fewshot_predict(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    num_classes: int,
    l2: float | None = None,
) -> torch.Tensor:
    """Predicted classes of x_test under the ridge regression fitted on (x_train, y_train)."""
    predict, _ = linear_fewshot_fit(x_train, y_train, num_classes, l2)
    return predict(x_test).argmax(1)


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
    l2: float | None = None,
    num_classes: int | None = None,
) -> dict[int, tuple[float, float]]:
    """{shots: (mean accuracy, std over seeds)} of the few-shot linear probe; `l2` None: cross-validated."""
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
    l2: float | None = None,
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
        "details": {"weights": str(weights), "seeds": seeds, "l2": "leave-one-out" if l2 is None else l2, "img_size": img_size, "sources": details},
    }
    write_results(run_dir, results)
    return results
