"""The sweep's figures, as PNG files: test scores against primer length, and training loss against step."""
import os

import matplotlib

matplotlib.use("Agg")  # files only: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import StrMethodFormatter  # noqa: E402
import pandas as pd  # noqa: E402

import cli  # noqa: E402

SMOOTH_POINTS = 50  # a loss curve is averaged over windows of 1/SMOOTH_POINTS of its steps: batches of 6 are noisy


def smooth(loss: pd.Series) -> pd.Series:
    return loss.rolling(max(1, len(loss) // SMOOTH_POINTS), min_periods=1).mean()


def loss_axis(ax: plt.Axes, ylabel: str, title: str) -> None:
    """Log scale, since a loss falls by orders of magnitude, but with plain numbers on the ticks."""
    ax.set(yscale="log", xlabel="step", ylabel=ylabel, title=title)
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.yaxis.set_minor_formatter(StrMethodFormatter("{x:g}"))


def save(fig: plt.Figure, path: str) -> str:
    fig.tight_layout()
    with cli.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def loss_curve(run_dir: str) -> str:
    """Write run_dir/loss.png from run_dir/losses.csv: each step's loss, its running mean, the epoch boundaries."""
    log = pd.read_csv(os.path.join(run_dir, "losses.csv"))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(log["step"], log["loss"], lw=0.5, alpha=0.4, label="per step")
    ax.plot(log["step"], smooth(log["loss"]), label="running mean")
    for step in log.groupby("epoch")["step"].min().iloc[1:]:
        ax.axvline(step - 0.5, color="grey", ls=":", lw=1)
    loss_axis(ax, "cross-entropy loss", os.path.basename(os.path.normpath(run_dir)))
    ax.legend()
    return save(fig, os.path.join(run_dir, "loss.png"))


def score_plot(rows: list[dict], path: str) -> str:
    """Strict and label-restricted test score against primer length, one line per LR schedule; text prompts as
    horizontal reference lines."""
    primers = pd.DataFrame([r for r in rows if r["script"] == "experiment"], columns=["tokens", "lr_schedule", "score", "restricted_score"])
    prompts = [r for r in rows if r["script"] != "experiment"]
    lengths = sorted(primers["tokens"].unique())
    schedules = primers["lr_schedule"].nunique()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, metric, title in zip(axes, ("score", "restricted_score"), ("Score (argmax over the vocabulary)", "Label-restricted (argmax over the labels)")):
        for schedule, runs in primers.groupby("lr_schedule", sort=False):
            runs = runs.sort_values("tokens")
            ax.plot(runs["tokens"], 100 * runs[metric], marker="o", label=f"primer, lr {schedule}")
        for i, r in enumerate(prompts):
            ax.axhline(100 * r[metric], color=f"C{schedules + i}", ls="--", label=f"{r['script']} ({int(r['tokens'])} tokens)")
        if lengths:  # primer lengths double from point to point
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(int(t)) for t in lengths])
        ax.set(title=title, xlabel="primer length (vectors)", ylim=(0, 100))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test reviews right (%)")
    return save(fig, path)


def losses_plot(rows: list[dict], results_dir: str, path: str) -> str:
    """Running-mean training loss against step, one line per trained run."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        losses = os.path.join(results_dir, r["run_id"], "losses.csv")
        if os.path.exists(losses):  # text prompts and re-scored primers have no training
            log = pd.read_csv(losses)
            ax.plot(log["step"], smooth(log["loss"]), label=f"{int(r['tokens'])} tokens, lr {r['lr_schedule']}")
    loss_axis(ax, "cross-entropy loss (running mean)", "Training loss")
    if ax.lines:
        ax.legend(fontsize=8)
    return save(fig, path)
