"""Few-shot linear probe: exact closed form, exact leave-one-out choice of the penalty, bounded
standardisation, perfect on separable features, chance on random labels."""

import numpy as np
import pytest
import torch

from vit_scale.errors import UserError
from vit_scale.evaluate.fewshot import (
    BIAS_CONSTANT,
    L2_GRID,
    VAR_FLOOR,
    fewshot_scores,
    linear_fewshot_fit,
    linear_fewshot_predict,
    sample_shots,
    source_pairs,
)


def _separable(rng, k=5, per_class=40, dim=16):
    centres = rng.standard_normal((k, dim)) * 5
    y = np.repeat(np.arange(k), per_class)
    x = centres[y] + rng.standard_normal((y.size, dim)) * 0.3
    return torch.from_numpy(x).float(), torch.from_numpy(y)


def test_separable_features_reach_100_percent_at_every_shot_count():
    rng = np.random.default_rng(0)
    x_train, y_train = _separable(rng)
    x_test, y_test = _separable(np.random.default_rng(0), per_class=30)
    scores = fewshot_scores(x_train, y_train, x_test, y_test, [1, 5, 10, 25], seeds=3, l2=1.0)
    assert {s: mean for s, (mean, _) in scores.items()} == {1: 1.0, 5: 1.0, 10: 1.0, 25: 1.0}


def test_random_labels_give_chance():
    rng = np.random.default_rng(1)
    k = 10
    x_train = torch.from_numpy(rng.standard_normal((600, 32))).float()
    y_train = torch.from_numpy(rng.integers(0, k, 600))
    x_test = torch.from_numpy(rng.standard_normal((3000, 32))).float()
    y_test = torch.from_numpy(rng.integers(0, k, 3000))
    scores = fewshot_scores(x_train, y_train, x_test, y_test, [5, 25], seeds=3, l2=1.0)
    for mean, _ in scores.values():
        assert abs(mean - 1 / k) < 0.03


def _standardised(x, xt):
    var = x.var(0)
    std = np.sqrt(var + VAR_FLOOR * var.mean())
    mean = x.mean(0)
    a = np.hstack([(x - mean) / std, np.full((len(x), 1), BIAS_CONSTANT)])
    at = np.hstack([(xt - mean) / std, np.full((len(xt), 1), BIAS_CONSTANT)])
    return a, at


@pytest.mark.parametrize("n", [12, 80])  # the dual (n < d) and the primal (n >= d) solve
def test_closed_form_matches_the_normal_equations(n):
    rng = np.random.default_rng(2)
    d, k, l2 = 30, 4, 0.5
    x = rng.standard_normal((n, d))
    y = rng.integers(0, k, n)
    xt = rng.standard_normal((200, d))
    a, at = _standardised(x, xt)
    targets = 2 * np.eye(k)[y] - 1
    w = np.linalg.solve(a.T @ a + l2 * np.eye(d + 1), a.T @ targets)
    expected = (at @ w).argmax(1)
    got = linear_fewshot_predict(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xt), k, l2)
    assert np.array_equal(got.numpy(), expected)


@pytest.mark.parametrize("n", [15, 60])  # the dual (n < d) and the primal (n >= d) eigendecomposition
def test_penalty_is_the_one_brute_force_leave_one_out_picks(n):
    # Refit without each point in turn, for every candidate: the closed form must pick the same penalty,
    # the one whose held-out predictions are right most often, then the least squared error, then the larger.
    rng = np.random.default_rng(3)
    d, k = 24, 3
    centres = rng.standard_normal((k, d))
    y = np.arange(n) % k
    x = centres[y] + rng.standard_normal((n, d)) * 1.5
    a, _ = _standardised(x, x[:1])
    targets = 2 * np.eye(k)[y] - 1
    scale = (a[:, :-1] ** 2).sum(1).mean()
    scores = {}
    for rel in sorted(L2_GRID, reverse=True):
        right, press = 0, 0.0
        for i in range(n):
            keep = np.arange(n) != i
            w = np.linalg.solve(a[keep].T @ a[keep] + rel * scale * np.eye(d + 1), a[keep].T @ targets[keep])
            right += int((a[i] @ w).argmax() == y[i])
            press += ((a[i] @ w - targets[i]) ** 2).sum()
        scores[rel * scale] = (-right, press)
    expected = min(scores, key=lambda l2: (*scores[l2], -l2))
    _, chosen = linear_fewshot_fit(torch.from_numpy(x), torch.from_numpy(y), k)
    assert chosen == pytest.approx(expected, rel=1e-12)
    # Not a grid edge: the choice is made by the data, not by where the grid stops.
    assert min(scores) < chosen < max(scores)


def test_a_feature_constant_across_the_shots_cannot_dominate_the_scores():
    # A feature that is (nearly) constant in the shots but moves in the test set, such as a background
    # pixel or JPEG noise: dividing by its tiny spread would blow it up and override the real features.
    rng = np.random.default_rng(4)
    x_train, y_train = _separable(rng, per_class=5)
    x_test, y_test = _separable(np.random.default_rng(4), per_class=30)
    still = torch.cat([x_train, 1e-7 * torch.randn(len(x_train), 1, dtype=x_train.dtype)], dim=1)
    moving = torch.cat([x_test, torch.randn(len(x_test), 1, dtype=x_test.dtype)], dim=1)
    for l2 in (1.0, None):
        pred = linear_fewshot_predict(still, y_train, moving, 5, l2)
        assert (pred == y_test).double().mean().item() == 1.0


def test_shot_sampling_is_per_class_and_seeded():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    idx = sample_shots(labels, 5, seed=4)
    assert np.bincount(labels[idx]).tolist() == [5, 3, 5]
    assert np.array_equal(idx, sample_shots(labels, 5, seed=4))
    assert not np.array_equal(idx, sample_shots(labels, 5, seed=5))


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="one test source per train source"):
        source_pairs("a;b", "c")
    multi = torch.zeros(4, 3)
    with pytest.raises(UserError, match="single-label"):
        fewshot_scores(torch.zeros(4, 2), multi, torch.zeros(4, 2), multi, [1], 1, 1.0)
