"""The paired bootstrap over seeds and reviews that table.py's p-values come from, and the label bias beside it:
checked on rows built by hand, against McNemar's pooled test where the two must disagree, and against the
normal approximation of a paired difference where one seed leaves only the reviews' noise."""
import math

import numpy as np
import pytest
import torch

from harness import stats

REVIEWS = 400


def right_on(*spans: tuple[int, int]) -> np.ndarray:
    """Per review, right on the reviews of the given [start, stop) spans and wrong elsewhere."""
    row = np.zeros(REVIEWS, dtype=bool)
    for start, stop in spans:
        row[start:stop] = True
    return row


def test_identical_rows_differ_by_nothing():
    one = right_on((0, 230))[None]
    assert stats.bootstrap_difference(one, one)[0] == 0 and stats.bootstrap_difference(one, one)[3] == 1.0
    three = np.stack([right_on((0, 230)), right_on((0, 180)), right_on((50, 300))])
    difference, low, high, p = stats.bootstrap_difference(three, three)  # the seeds of each side drawn apart
    assert difference == 0 and low < 0 < high and p > 0.9


def test_a_clear_difference_is_called_real_at_the_floor():
    better = np.stack([right_on((0, 320)), right_on((0, 310)), right_on((10, 330))])  # about 80% at every seed
    worse = np.stack([right_on((0, 200)), right_on((5, 205)), right_on((0, 190))])  # about 50%
    difference, low, high, p = stats.bootstrap_difference(better, worse)
    assert difference == pytest.approx(better.mean() - worse.mean()) and 0 < low < difference < high
    assert p == pytest.approx(2 / (stats.BOOTSTRAP_RESAMPLES + 1))
    assert stats.bootstrap_difference(worse, better)[3] == p  # two-sided


def test_seeds_that_disagree_in_direction_are_no_difference_though_pooled_mcnemar_calls_one():
    """One seed of A is 30 points above B, two are 5 below: pooled over seeds, A wins 120 reviews and loses 20, which
    McNemar's test on the reviews calls real; a third of the resamples draw no good seed, so the bootstrap does not."""
    b = np.stack([right_on((0, 200))] * 3)
    a = np.stack([right_on((0, 320)), right_on((0, 180)), right_on((0, 180))])
    assert stats.paired(torch.from_numpy(a), torch.from_numpy(b)) == (120, 20, pytest.approx(0, abs=1e-15))
    difference, low, high, p = stats.bootstrap_difference(a, b)
    assert difference == pytest.approx((0.30 - 0.05 - 0.05) / 3) and low < 0 < high and p > 0.3


def test_one_seed_each_is_a_paired_bootstrap_over_reviews():
    """With one run a side only the reviews vary: the interval is about the normal one of a paired difference,
    +-1.96 sqrt((discordant / n - d^2) / n), whatever the two runs' scores."""
    rng = np.random.default_rng(1)
    a, b = rng.random(REVIEWS) < 0.6, rng.random(REVIEWS) < 0.5
    difference, low, high, _ = stats.bootstrap_difference(a[None], b[None])
    d = a.mean() - b.mean()
    half = 1.96 * math.sqrt(((a != b).mean() - d ** 2) / REVIEWS)
    assert difference == pytest.approx(d) and (low, high) == pytest.approx((d - half, d + half), abs=0.006)


def test_the_same_seed_gives_the_same_answer_and_another_a_near_one():
    rng = np.random.default_rng(2)
    a, b = rng.random((3, REVIEWS)) < 0.58, rng.random((3, REVIEWS)) < 0.5
    first = stats.bootstrap_difference(a, b)
    assert stats.bootstrap_difference(torch.from_numpy(a), torch.from_numpy(b)) == first
    other = stats.bootstrap_difference(a, b, seed=7)
    assert other != first and other[1:] == pytest.approx(first[1:], abs=0.01)


def test_rows_on_different_reviews_are_refused():
    with pytest.raises(ValueError, match="the same reviews"):
        stats.bootstrap_difference(np.ones((3, REVIEWS), bool), np.ones((3, REVIEWS - 1), bool))


def test_label_bias_shows_a_constant_classifier():
    label_ids = torch.tensor([33, 34])
    label = torch.tensor([0, 1] * 50)
    constant = {"answer": label_ids[torch.zeros(100, dtype=torch.long)], "label": label,
                "logprobs": torch.tensor([[-0.1, -2.0]]).repeat(100, 1)}
    assert stats.label_bias(constant) == (1.0, 1.0)  # half right by either metric, and always the same answer
    mixed = {"answer": torch.tensor([33] * 70 + [34] * 20 + [504] * 10), "label": label,
             "logprobs": torch.tensor([[-0.1, -2.0]] * 60 + [[-2.0, -0.1]] * 40)}
    assert stats.label_bias(mixed) == (0.7, 0.6)
