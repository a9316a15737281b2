"""Few-shot linear probe: exact closed form, perfect on separable features, chance on random labels."""

import numpy as np
import pytest
import torch

from vit_scale.errors import UserError
from vit_scale.evaluate.fewshot import (
    BIAS_CONSTANT,
    fewshot_scores,
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


@pytest.mark.parametrize("n", [12, 80])  # the dual (n < d) and the primal (n >= d) solve
def test_closed_form_matches_the_normal_equations(n):
    rng = np.random.default_rng(2)
    d, k, l2 = 30, 4, 0.5
    x = rng.standard_normal((n, d))
    y = rng.integers(0, k, n)
    xt = rng.standard_normal((200, d))
    mean, std = x.mean(0), x.std(0) + 1e-5
    a = np.hstack([(x - mean) / std, np.full((n, 1), BIAS_CONSTANT)])
    at = np.hstack([(xt - mean) / std, np.full((200, 1), BIAS_CONSTANT)])
    targets = 2 * np.eye(k)[y] - 1
    w = np.linalg.solve(a.T @ a + l2 * np.eye(d + 1), a.T @ targets)
    expected = (at @ w).argmax(1)
    got = linear_fewshot_predict(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xt), k, l2)
    assert np.array_equal(got.numpy(), expected)


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
