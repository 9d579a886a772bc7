"""Statistics over finished runs: per-review correctness read back from a run folder, McNemar's exact test on runs
scored on the same reviews, and the mean and spread over seeds."""
import math
import os
import statistics

import torch
from safetensors import safe_open

from harness import errors, files, scoring

SAME_SPLIT_KEYS = ("csv_dir", "test_limit", "labels")  # these choose the test reviews (the same at every seed) and their answers


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


def test_reviews(config: dict, predictions: dict) -> tuple:
    """What identifies the test reviews a run was scored on: SAME_SPLIT_KEYS, and the labels in order."""
    return tuple(config.get(k) for k in SAME_SPLIT_KEYS) + (tuple(predictions["label"].tolist()),)


def check_same_reviews(runs: dict[str, tuple[dict, dict]]) -> None:
    """A one-line error unless every run {folder: (config, predictions)} was scored on the same test reviews."""
    (first, (config, predictions)), *rest = runs.items()
    want = test_reviews(config, predictions)
    for other, (other_config, other_predictions) in rest:
        if test_reviews(other_config, other_predictions) != want:
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


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1) over seeds; the std is NaN for a single seed."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan
