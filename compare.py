"""Paired comparison of two runs scored on the same reviews: McNemar's exact test on their per-review correctness.

    python compare.py results/<run A> results/<run B>

Prints each run's strict and label-restricted scores, how many reviews one run gets right and the other wrong, and
the two-sided exact p-value (a binomial test on those discordant reviews), for each metric.
"""
import math
import os
from types import SimpleNamespace

import torch
from safetensors import safe_open

from harness import cli, errors, files, scoring

SAME_SPLIT_KEYS = ("csv_dir", "test_limit", "seed", "labels")  # these choose the test reviews and their answers


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


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the discordant reviews split as a fair coin would split them."""
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def compare(run_a: str, run_b: str) -> None:
    (config_a, predictions_a), (config_b, predictions_b) = load_run(run_a), load_run(run_b)
    differ = [k for k in SAME_SPLIT_KEYS if config_a.get(k) != config_b.get(k)]
    if differ or not torch.equal(predictions_a["label"], predictions_b["label"]):
        raise errors.UserError(f"{run_a} and {run_b} were not scored on the same test reviews (their {', '.join(differ) or 'labels'} "
                            f"differ): compare runs with the same --csv_dir, --test_limit, --seed and --labels")
    right_a, right_b = correctness(predictions_a), correctness(predictions_b)
    total = len(predictions_a["label"])
    print(f"A: {run_a}\nB: {run_b}\n{total:,} test reviews")
    print("| Metric | A | B | A right, B wrong | B right, A wrong | McNemar exact p |\n|---|---|---|---|---|---|")
    for metric in right_a:
        a, b = right_a[metric], right_b[metric]
        only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
        print(f"| {metric} | {100 * a.float().mean():.1f}% ({int(a.sum()):,}) | {100 * b.float().mean():.1f}% ({int(b.sum()):,}) "
              f"| {only_a:,} | {only_b:,} | {mcnemar_exact(only_a, only_b):.3g} |")


def parse(argv: list[str]) -> SimpleNamespace:
    """The two run folders of the command line (compare.py takes no settings)."""
    if len(argv) != 2 or any(arg.startswith("--") for arg in argv):
        raise errors.UserError("give two run folders: python compare.py results/<run A> results/<run B>")
    return SimpleNamespace(RUN_A=argv[0], RUN_B=argv[1])


if __name__ == "__main__":
    cli.main(lambda cfg: compare(cfg.RUN_A, cfg.RUN_B), parse=parse, shared=())
