"""How the bench saves a figure (a PNG that carries what a reader sees of it), and the figures of one run: training
loss against step, probes against layer, rate grids, steering and prompt-search curves. The comparison's figures, of
many runs, are tableplots'; scripts read their files and pass the frames to these two, nothing else draws."""
import json
import math
import os
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only: training machines have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, StrMethodFormatter  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from harness import files  # noqa: E402
from harness import ledger  # noqa: E402
from harness import parallel  # noqa: E402

SMOOTH_POINTS = 50  # a loss curve is averaged over windows of 1/SMOOTH_POINTS of its steps: batches of 6 are noisy


def _window(steps: int) -> int:
    return max(1, steps // SMOOTH_POINTS)


def smooth(loss: pd.Series) -> pd.Series:
    return loss.rolling(_window(len(loss)), min_periods=1).mean()


def loss_axis(ax: plt.Axes, ylabel: str, title: str) -> None:
    """Log scale, since a loss falls by orders of magnitude, but with plain numbers on the ticks (minor ones as
    _minor_label says); whole steps."""
    ax.set(yscale="log", xlabel="training step (batch)", ylabel=ylabel, title=title)
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda at, _: _minor_label(at, ax.get_ylim())))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _minor_label(at: float, limits: tuple[float, float]) -> str:
    """A log axis's minor tick label: every one where the view spans at most half a decade (else too few labels),
    those at 2 and 5 of a decade up to 3 decades, none beyond: labelling all of them crowds (10, 9, 8, ... 1, 0.9)."""
    decades = abs(math.log10(limits[1] / limits[0]))
    mantissa = round(at / 10 ** math.floor(math.log10(at)), 6)
    return f"{at:g}" if decades <= 0.5 or (decades <= 3 and mantissa in (2, 5)) else ""


def _described(fig: plt.Figure) -> dict:
    """What a reader sees of each axes: title, axis labels, the tick labels in view, the legend's entries."""
    fig.canvas.draw()  # so the tick labels are the ones drawn
    def ticks(axis, low_high):  # the labelled ticks in view, major and minor, in axis order
        low, high = sorted(low_high)
        places = {False: axis.get_majorticklocs(), True: axis.get_minorticklocs()}
        shown = [(at, label.get_text()) for minor in (False, True)
                 for label, at in zip(axis.get_ticklabels(minor=minor), places[minor])
                 if low <= at <= high and label.get_text()]
        return [text for _, text in sorted(shown)]
    return {"suptitle": fig._suptitle.get_text() if fig._suptitle else "",
            "axes": [{"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                      "xticks": ticks(ax.xaxis, ax.get_xlim()), "yticks": ticks(ax.yaxis, ax.get_ylim()),
                      "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []}
                     for ax in fig.axes]}


def save(fig: plt.Figure, path: str) -> str:
    """Write the figure to path atomically (under accelerate the main process alone writes) and close it. The PNG
    carries _described(fig) as JSON in its "Description" text, so a reader (or a test) can check it without pixels."""
    fig.tight_layout()
    if parallel.is_main():
        with files.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, metadata={"Description": json.dumps(_described(fig))})
    plt.close(fig)
    return path


def description(path: str) -> dict:
    """The _described() JSON a PNG of save() carries."""
    from PIL import Image
    with Image.open(path) as image:
        return json.loads(image.text["Description"])


def mark_epochs(ax: plt.Axes, log: pd.DataFrame, color: str, label: Optional[str] = None) -> None:
    """A dotted line where each epoch after the first starts, as its learning rate changes there (the first labeled)."""
    for i, step in enumerate(log.groupby("epoch")["step"].min().iloc[1:]):
        ax.axvline(step - 0.5, color=color, ls=":", lw=1, label=label if i == 0 else None)


def model_name(model_id: str) -> str:
    """A model id as a reader knows it: a hub id whole, a .gguf file's name, a local folder's last two parts."""
    path = os.path.normpath(model_id)
    if path.endswith(".gguf"):
        return os.path.basename(path).removesuffix(".gguf")
    if os.path.isdir(path):
        return "/".join(path.split(os.sep)[-2:])
    return model_id


def loss_curve(run_dir: str, method: str = "", tokens: int = 0) -> str:
    """Write run_dir/loss.png from run_dir/losses.csv: each step's loss, its running mean (where there are enough steps
    to average), the epoch boundaries; the title names the model, method, length and rates (from config.json)."""
    log = pd.read_csv(os.path.join(run_dir, "losses.csv"))
    cfg = files.read_json(os.path.join(run_dir, "config.json"))
    rates = ", ".join(f"{r:g}" for r in cfg.get("rate_by_epoch", []))
    unit = " x embedding std" if cfg.get("rate_scale") == "embedding" else ""
    fig, ax = plt.subplots(figsize=(7, 4))
    span = _window(len(log))
    ax.plot(log["step"], log["loss"], lw=0.8, alpha=0.5 if span > 1 else 1.0, marker="." if len(log) <= 200 else None,
            label="loss of each step", zorder=3)
    if span > 1:  # with one step per window the running mean is the per-step line itself
        ax.plot(log["step"], smooth(log["loss"]), lw=2, label=f"running mean over {span} steps", zorder=2)
    mark_epochs(ax, log, "grey", "epoch boundary (the rate changes)")
    what = ", ".join(part for part in (method, f"{tokens} tokens" if tokens else "") if part)
    loss_axis(ax, "cross-entropy loss of the label token",
              f"Training loss: {what + ' on ' if what else ''}{model_name(cfg.get('model_id', '?'))}\n"
              f"rates by epoch [{rates}]{unit}; run {os.path.basename(os.path.normpath(run_dir))}")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8)
    return save(fig, os.path.join(run_dir, "loss.png"))


def probe_layers(results_dir: str, model_id: str, run_dir: str) -> str:
    """Validation accuracy of the best probe at each layer, one line per pooling and condition (the latest probe run
    of each condition and probe kind for model_id), with the latest test score of each text prompt and primer run
    of that model as horizontal lines."""
    tables = {}
    for run in sorted(os.listdir(results_dir)):  # run folders are named by their start time: later ones win
        layers = os.path.join(results_dir, run, "probe_layers.csv")
        if (os.path.exists(layers)
                and files.read_json(os.path.join(results_dir, run, "config.json"))["model_id"] == model_id):
            table = pd.read_csv(layers)
            tables[table["condition"][0], table["probe"][0]] = table
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (condition, probe), table in tables.items():
        for pooling, rows in table.groupby("pooling"):
            ax.plot(rows["layer"], 100 * rows["val_score"], marker="o" if pooling == "last" else "s", ms=4, lw=1.5,
                    zorder=3,
                    label=f"{probe} probe, {'review alone' if condition == 'none' else condition + ' prompt'}, "
                          f"{pooling} pooling")
    latest = {r["script"]: r for r in ledger.rows(results_dir) if r["model_id"] == model_id and r["script"] != "probe"}
    probes = len(ax.lines)
    for i, (script, r) in enumerate(sorted(latest.items())):  # thin and under the probes, so no probe line hides
        ax.axhline(100 * float(r["score"]), color=f"C{probes + i}", ls="--", lw=1, zorder=2,
                   label=f"{script} test score ({r['method']})")
    lowest = min([100 * float(r["score"]) for r in latest.values()] + [50.0])  # chance, or a reference line below it
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="layer (0: embeddings)", ylabel="validation reviews right (%)", ylim=(max(0.0, lowest - 5), 100),
           title=f"Review sentiment read out of each layer of {model_name(model_id)} by a probe\n"
                 "(the best probe per layer, on validation reviews; dashed: other methods' test scores)")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=7)
    return save(fig, os.path.join(run_dir, "probe_layers.png"))


def steer_heatmap(table: pd.DataFrame, path: str) -> str:
    """Validation score of each steering layer (rows) and coefficient (columns), the numbers written in the cells."""
    grid = table.pivot(index="layer", columns="coefficient", values="val_score") * 100
    fig, ax = plt.subplots(figsize=(1.2 * len(grid.columns) + 2, 0.45 * len(grid) + 1.5))
    image = ax.imshow(grid.to_numpy(), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), value in np.ndenumerate(grid.to_numpy()):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="white" if value < 60 else "black", fontsize=8)
    ax.set_xticks(range(len(grid.columns)), [f"{c:g}" for c in grid.columns])
    ax.set_yticks(range(len(grid)), [str(layer) for layer in grid.index])
    ax.set(xlabel="coefficient (x mean residual norm at the layer)", ylabel="layer",
           title="Validation score (%), steered")
    fig.colorbar(image, ax=ax)
    return save(fig, path)


def generation_curve(summary: pd.DataFrame, run_dir: str) -> str:
    """Share of answers judged positive, and their fluency, against the steering coefficient; the text prompts that
    ask for a positive or a negative answer as horizontal lines."""
    steered = summary[summary["coefficient"].notna()]
    prompted = summary[summary["coefficient"].isna()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, column, label in zip(axes, ("share_positive", "fluency"),
                                 ("answers judged positive", "mean token log-prob, unsteered model")):
        ax.plot(steered["coefficient"], steered[column], marker="o", label=steered["steering"].iloc[0])
        for i, (_, r) in enumerate(prompted.iterrows()):
            ax.axhline(r[column], color=f"C{i + 1}", ls="--", label=r["steering"])
        ax.set(xlabel="coefficient (x mean residual norm)", ylabel=label)
        ax.legend(fontsize=8)
    axes[0].set_ylim(-0.05, 1.05)
    fig.suptitle("Steered answers: how positive and how fluent, against the steering coefficient", fontsize=10)
    return save(fig, os.path.join(run_dir, "generation.png"))


def search_curve(candidates: pd.DataFrame, path: str) -> str:
    """The best validation score so far against the reviews run through forward passes so far, every candidate a dot."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(candidates["forwards"], 100 * candidates["val_score"], s=8, alpha=0.4, label="candidate")
    ax.step(candidates["forwards"], 100 * candidates["val_score"].cummax(), where="post", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="reviews through forward passes", ylabel="validation reviews right (%)",
           title="Prompt search: validation score of each candidate prompt, and the best so far")
    ax.legend()
    return save(fig, path)


def search_curves(runs: list[tuple[str, pd.DataFrame]], path: str) -> str:
    """The best validation score so far against CPU minutes spent, one line per search run (its label and its
    candidates.csv), in one figure."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in runs:
        ax.step(rows["cpu_minutes"], 100 * rows["val_score"].cummax(), where="post", marker=".", label=label)
    ax.set(xlabel="CPU minutes spent (one core)", ylabel="best validation score so far (%), strict",
           title="Prompt search")
    ax.legend()
    return save(fig, path)


def rate_grid(grids: list[pd.DataFrame], path: str) -> str:
    """The best validation score against the first rate of each schedule, one line per rate_grid.csv in `grids` (its
    method), the chosen schedule circled, one panel per training-set size, one color per method across panels."""
    size = lambda table: int(table["train_reviews"].iloc[0]) if "train_reviews" in table else 0  # 0: not recorded
    sizes = sorted({size(t) for t in grids}) or [0]
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes) + 2.5, 4.5), sharex=True, sharey=True,
                             squeeze=False)
    panels = dict(zip(sizes, axes[0]))
    # across panels
    colors = {method: f"C{i}" for i, method in enumerate(dict.fromkeys(t["method"].iloc[0] for t in grids))}
    for table in grids:
        ax, color = panels[size(table)], colors[table["method"].iloc[0]]
        ax.plot(table["first_rate"], table["val_score"], marker="o", label=table["method"].iloc[0], color=color)
        chosen = table[table["chosen"]]
        ax.scatter(chosen["first_rate"], chosen["val_score"], s=120, facecolors="none", edgecolors=color)
    for n, ax in panels.items():
        ax.set(xscale="log", xlabel="first epoch's learning rate", title=f"{n:,} training reviews" if n else "")
        ax.legend(fontsize=6)
    panels[sizes[0]].set_ylabel("validation score (strict)")
    fig.suptitle("each method across its learning rates (circled: chosen on validation)")
    return save(fig, path)
