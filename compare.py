"""Paired comparison of two runs scored on the same reviews: McNemar's exact test on their per-review correctness.

    python compare.py results/<run A> results/<run B>

Prints each run's strict and label-restricted scores, how many reviews one run gets right and the other wrong, and
the two-sided exact p-value (a binomial test on those discordant reviews), for each metric.
"""
from types import SimpleNamespace

from harness import cli, errors, stats


def compare(run_a: str, run_b: str) -> None:
    loaded = {run: stats.load_run(run) for run in (run_a, run_b)}
    stats.check_same_reviews(loaded)
    right_a, right_b = (stats.correctness(predictions) for _, predictions in loaded.values())
    total = len(loaded[run_a][1]["label"])
    print(f"A: {run_a}\nB: {run_b}\n{total:,} test reviews")
    print("| Metric | A | B | A right, B wrong | B right, A wrong | McNemar exact p |\n|---|---|---|---|---|---|")
    for metric in right_a:
        a, b = right_a[metric], right_b[metric]
        only_a, only_b, p = stats.paired(a[None], b[None])
        print(f"| {metric} | {100 * a.float().mean():.1f}% ({int(a.sum()):,}) "
              f"| {100 * b.float().mean():.1f}% ({int(b.sum()):,}) "
              f"| {only_a:,} | {only_b:,} | {p:.3g} |")


def parse(argv: list[str]) -> SimpleNamespace:
    """The two run folders of the command line (compare.py takes no settings)."""
    if len(argv) != 2 or any(arg.startswith("--") for arg in argv):
        raise errors.UserError("give two run folders: python compare.py results/<run A> results/<run B>")
    return SimpleNamespace(RUN_A=argv[0], RUN_B=argv[1])


if __name__ == "__main__":
    cli.main(lambda cfg: compare(cfg.RUN_A, cfg.RUN_B), parse=parse, shared=())
