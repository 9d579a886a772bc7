"""Statistics over finished runs: per-review correctness read back from a run folder, McNemar's exact test on two
runs scored on the same reviews, a paired bootstrap over seeds and reviews for rows of several runs, the share of a
run's most frequent answer, and the mean and spread over seeds."""
import math
import os
import statistics

import numpy as np
import torch
from safetensors import safe_open

from harness import errors, files, scoring

# these choose the test reviews (the same at every seed) and their answers
SAME_SPLIT_KEYS = ("csv_dir", "test_limit", "labels")


def load_run(run_dir: str) -> tuple[dict, dict]:
    """A run folder's config and its per-review predictions."""
    path = os.path.join(run_dir, "predictions.safetensors")
    if not os.path.isfile(path):
        raise errors.UserError(f"{run_dir} has no predictions.safetensors: give the folder of a finished run")
    with safe_open(path, "pt") as f:
        predictions = {k: f.get_tensor(k) for k in f.keys()}
    return files.read_json(os.path.join(run_dir, "config.json")), predictions


def correctness(predictions: dict) -> dict[str, torch.Tensor]:
    """Per review, right or wrong by the strict metric and by the label-restricted one."""
    return dict(zip(("score", "label-restricted"), scoring.right(predictions["label_ids"], predictions)))


def _test_reviews(config: dict, predictions: dict) -> tuple:
    """What identifies the test reviews a run was scored on: SAME_SPLIT_KEYS, and the labels in order."""
    return tuple(config.get(k) for k in SAME_SPLIT_KEYS) + (tuple(predictions["label"].tolist()),)


def check_same_reviews(runs: dict[str, tuple[dict, dict]]) -> None:
    """A one-line error unless every run {folder: (config, predictions)} was scored on the same test reviews."""
    (first, (config, predictions)), *rest = runs.items()
    want = _test_reviews(config, predictions)
    for other, (other_config, other_predictions) in rest:
        if _test_reviews(other_config, other_predictions) != want:
            differ = [k for k in SAME_SPLIT_KEYS if config.get(k) != other_config.get(k)]
            raise errors.UserError(f"{first} and {other} were not scored on the same test reviews (their "
                                   f"{', '.join(differ) or 'labels'} differ): compare runs with the same --csv_dir, "
                                   f"--test_limit and --labels")


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the discordant reviews split as a fair coin would split them."""
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def paired(right_a: torch.Tensor, right_b: torch.Tensor) -> tuple[int, int, float]:
    """McNemar's exact test on per-review correctness [seeds, reviews] of two methods on the same reviews: the
    reviews A gets right more often than B (over its seeds), those B gets right more often, and the p-value. With
    one seed each this is McNemar's test on the two runs; with several, the review stays the unit, so a review
    scored by three seeds is not counted three times."""
    a, b = right_a.float().mean(0), right_b.float().mean(0)
    only_a, only_b = int((a > b).sum()), int((b > a).sum())
    return only_a, only_b, mcnemar_exact(only_a, only_b)


BOOTSTRAP_RESAMPLES = 10_000  # the smallest two-sided p it can give is 2 / 10,001, about 2e-4
BOOTSTRAP_SEED = 0  # the same resamples for every pair of rows: a table's p-values do not move between prints


def _resampled_scores(right: np.ndarray, review_weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A row's mean score [resamples] under resampled reviews (weights [resamples, reviews], counts summing to the
    review count) and its seeds [seeds, reviews] drawn with replacement: the seed is a source of noise as the test
    review is, so a row's score is not treated as that of one fixed classifier. The seeds' draw is widened by
    sqrt(seeds / (seeds - 1)) about their mean: a mean of 3 seeds redrawn from themselves varies 2/3 as much as
    one of 3 new seeds would (the n - 1 of a sample variance), and a row has few seeds."""
    seeds, reviews = right.shape
    per_seed = right.astype(np.float32) @ review_weights.T.astype(np.float32) / reviews  # [seeds, resamples]
    seed_weights = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=len(review_weights))  # [resamples, seeds]
    every = per_seed.mean(0)
    widen = math.sqrt(seeds / (seeds - 1)) if seeds > 1 else 1.0
    return every + widen * ((seed_weights * per_seed.T).sum(1) / seeds - every)


Rights = torch.Tensor | np.ndarray  # per-review correctness [seeds, reviews]


def bootstrap_difference(right_a: Rights, right_b: Rights, resamples: int = BOOTSTRAP_RESAMPLES,
                         seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float, float]:
    """A's mean score minus B's from per-review correctness [seeds, reviews] on the same reviews, its 95% percentile
    interval and a two-sided p-value, by a hierarchical paired bootstrap: each resample draws the seeds of A and of B
    (with replacement, independently: they are different runs) and one draw of test reviews for both (the reviews
    are shared, so the pairing cancels how hard a review is). A row of one seed leaves only the reviews' noise: for
    a text prompt that is all there is, for a single search run its seed's noise is not counted. The p-value is
    twice the share of resampled differences on the far side of zero, (k + 1) / (resamples + 1) per side, at most
    1: below 0.05 about where the 95% interval leaves out zero."""
    a, b = np.asarray(right_a, dtype=bool), np.asarray(right_b, dtype=bool)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"rows scored on {a.shape[1]} and {b.shape[1]} reviews: a paired test needs the same reviews")
    rng = np.random.default_rng(seed)
    reviews = a.shape[1]
    review_weights = rng.multinomial(reviews, np.full(reviews, 1 / reviews), size=resamples)  # [resamples, reviews]
    diff = _resampled_scores(a, review_weights, rng) - _resampled_scores(b, review_weights, rng)
    below, above = int((diff <= 0).sum()), int((diff >= 0).sum())
    p = min(1.0, 2 * (min(below, above) + 1) / (resamples + 1))
    low, high = np.quantile(diff, [0.025, 0.975])
    return float(a.mean() - b.mean()), float(low), float(high), p


def label_bias(predictions: dict) -> tuple[float, float]:
    """The share of the test reviews given the run's most frequent answer, of the strict answer (any vocabulary
    token) and of the label-restricted one: 1.0 is a constant classifier, whose score is then the share of that
    label (or 0 for a token that is no label), however high or low it looks."""
    strict = torch.unique(predictions["answer"], return_counts=True)[1].max()
    restricted = torch.bincount(predictions["logprobs"].argmax(-1)).max()
    total = len(predictions["label"])
    return int(strict) / total, int(restricted) / total


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1) over seeds; the std is NaN for a single seed."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan
