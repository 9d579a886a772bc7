"""Every figure of the bench, as PNG files: scores against primer length, parameters and training reviews, training loss
against step, probes against layer, rate grids, steering and prompt-search curves. Scripts read their files and pass
the frames here; nothing else draws."""
import json
import math
import os
import re
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
SCORE_LIMITS = (-3, 103)  # a score axis's view (%): a line at 0% or 100% (a hard primer that never answers) stays in
# sight above the frame, not on it


def _window(steps: int) -> int:
    return max(1, steps // SMOOTH_POINTS)


def _smooth(loss: pd.Series) -> pd.Series:
    return loss.rolling(_window(len(loss)), min_periods=1).mean()


def _loss_axis(ax: plt.Axes, ylabel: str, title: str) -> None:
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


def _save(fig: plt.Figure, path: str) -> str:
    """Write the figure to path atomically (under accelerate the main process alone writes) and close it. The PNG
    carries _described(fig) as JSON in its "Description" text, so a reader (or a test) can check it without pixels."""
    fig.tight_layout()
    if parallel.is_main():
        with files.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, metadata={"Description": json.dumps(_described(fig))})
    plt.close(fig)
    return path


def description(path: str) -> dict:
    """The _described() JSON a PNG of _save() carries."""
    from PIL import Image
    with Image.open(path) as image:
        return json.loads(image.text["Description"])


def _mark_epochs(ax: plt.Axes, log: pd.DataFrame, color: str, label: Optional[str] = None) -> None:
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
        ax.plot(log["step"], _smooth(log["loss"]), lw=2, label=f"running mean over {span} steps", zorder=2)
    _mark_epochs(ax, log, "grey", "epoch boundary (the rate changes)")
    what = ", ".join(part for part in (method, f"{tokens} tokens" if tokens else "") if part)
    _loss_axis(ax, "cross-entropy loss of the label token",
              f"Training loss: {what + ' on ' if what else ''}{model_name(cfg.get('model_id', '?'))}\n"
              f"rates by epoch [{rates}]{unit}; run {os.path.basename(os.path.normpath(run_dir))}")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8)
    return _save(fig, os.path.join(run_dir, "loss.png"))


def score_plot(rows: list[dict], path: str) -> str:
    """Strict and label-restricted test score against primer length, one line per method (which names the primer's
    position) and LR schedule, with error bars of their 95% Wilson intervals; text prompts as horizontal reference
    lines in a band of their interval."""
    columns = ["method", "tokens", "lr_schedule", "score", "score_low", "score_high", "restricted_score",
               "restricted_low", "restricted_high"]
    primers = pd.DataFrame([r for r in rows if r["script"] == "experiment"], columns=columns)
    prompts = [r for r in rows if r["script"] != "experiment"]
    lengths = sorted(primers["tokens"].unique())
    lines = len(primers.groupby(["method", "lr_schedule"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (metric, interval), title in zip(axes, (("score", "score"), ("restricted_score", "restricted")),
                                             ("Score (argmax over the vocabulary)",
                                              "Label-restricted (argmax over the labels)")):
        for (method, schedule), runs in primers.groupby(["method", "lr_schedule"], sort=False):
            runs = runs.sort_values("tokens")
            share, low, high = 100 * runs[metric], 100 * runs[f"{interval}_low"], 100 * runs[f"{interval}_high"]
            ax.errorbar(runs["tokens"], share, yerr=[share - low, high - share], marker="o", capsize=3,
                        label=f"{method}, lr {schedule}" if schedule else method)
        for i, r in enumerate(prompts):
            color = f"C{lines + i}"
            ax.axhline(100 * r[metric], color=color, ls="--", label=f"{r['script']} ({int(r['tokens'])} tokens)")
            ax.axhspan(100 * r[f"{interval}_low"], 100 * r[f"{interval}_high"], color=color, alpha=0.15, lw=0)
        if lengths:  # primer lengths double from point to point
            ax.set_xscale("log", base=2)
            ax.set_xticks(lengths, [str(int(t)) for t in lengths])
        ax.set(title=title, xlabel="primer length (vectors)", ylim=(0, 100))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test reviews right (%), 95% interval")
    return _save(fig, path)


def losses_plot(rows: list[dict], results_dir: str, path: str) -> str:
    """Running-mean training loss against step, one line per trained run, its epoch boundaries dotted in its color."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        losses = os.path.join(results_dir, r["run_id"], "losses.csv")
        if os.path.exists(losses):  # text prompts and re-scored primers have no training
            log = pd.read_csv(losses)
            label = f"{r['method']}, {int(r['tokens'])} tokens, lr {r['lr_schedule']}"
            (line,) = ax.plot(log["step"], _smooth(log["loss"]), label=label)
            _mark_epochs(ax, log, line.get_color(), None if any(l.get_linestyle() == ":" for l in ax.lines) else
                        "epoch boundary (dotted, in the run's color)")
    _loss_axis(ax, "cross-entropy loss (running mean)", "Training loss of each run in the ledger")
    if ax.lines:
        ax.legend(fontsize=8)
    return _save(fig, path)


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
    return _save(fig, os.path.join(run_dir, "probe_layers.png"))


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
    return _save(fig, path)


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
    return _save(fig, os.path.join(run_dir, "generation.png"))


def search_curve(candidates: pd.DataFrame, path: str) -> str:
    """The best validation score so far against the reviews run through forward passes so far, every candidate a dot."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(candidates["forwards"], 100 * candidates["val_score"], s=8, alpha=0.4, label="candidate")
    ax.step(candidates["forwards"], 100 * candidates["val_score"].cummax(), where="post", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="reviews through forward passes", ylabel="validation reviews right (%)",
           title="Prompt search: validation score of each candidate prompt, and the best so far")
    ax.legend()
    return _save(fig, path)


def search_curves(runs: list[tuple[str, pd.DataFrame]], path: str) -> str:
    """The best validation score so far against CPU minutes spent, one line per search run (its label and its
    candidates.csv), in one figure."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in runs:
        ax.step(rows["cpu_minutes"], 100 * rows["val_score"].cummax(), where="post", marker=".", label=label)
    ax.set(xlabel="CPU minutes spent (one core)", ylabel="best validation score so far (%), strict",
           title="Prompt search")
    ax.legend()
    return _save(fig, path)


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
    return _save(fig, path)


def _seed_spread(ax: plt.Axes, x: pd.Series, rows: pd.DataFrame, label: str, color: str):
    """Each row of table.py's table: its mean score with its seeds' standard deviation as an error bar (returned, for
    the legend), each seed's score a dot."""
    bars = ax.errorbar(x, 100 * rows["score_mean"], yerr=100 * rows["score_std"].fillna(0), marker="o", capsize=3,
                       label=label, color=color)
    for xi, scores in zip(x, rows["scores"]):
        ax.scatter([xi] * len(scores), [100 * s for s in scores], s=10, alpha=0.5, color=color)
    return bars


def _family(method: str) -> str:
    """A ledger method's name less what one run chose: "IA3 (k_proj, v_proj)" and "linear probe (layer 3, last); ..."
    are "IA3" and "linear probe"."""
    return re.split(r"\s*[(:;]", method, maxsplit=1)[0]


def _method_label(method: str) -> str:
    """A ledger method as a legend names it: without the prompt a search found and the budget it spent."""
    method = re.sub(r": '.*$", "", method)
    return re.sub(r"[;,]? ?[\d.]+ CPU min[^)]*", "", method).replace(" ()", "")


def table_params(table: pd.DataFrame, path: str) -> str:
    """table.py's rows: strict score against trainable parameters (log scale), one color per method (its family: a
    line joins the primer's lengths at one training-set size), methods with none as dashed lines, each legend entry
    its own color."""
    fig, ax = plt.subplots(figsize=(8, 5))
    trained, fixed = table[table["trainable_params"] > 0], table[table["trainable_params"] == 0]
    series, shown = list(trained.groupby(trained["method"].map(_family), sort=False)), []
    for i, (name, rows) in enumerate(series):
        for j, (_, size) in enumerate(rows.sort_values("trainable_params").groupby("samples")):
            bars = _seed_spread(ax, size["trainable_params"], size, name if j == 0 else "_nolegend_", _color_of(i))
            shown += [bars] if j == 0 else []
    for i, (_, r) in enumerate(fixed.iterrows(), len(series)):
        shown.append(ax.axhline(100 * r["score_mean"], color=_color_of(i), ls=("--", "-.", ":")[i % 3], lw=1.2,
                                label=_method_label(r["method"])))
    sizes = sorted(set(trained["samples"]))
    where = f"{sizes[0]:,} training reviews" if len(sizes) == 1 else f"{len(sizes)} training-set sizes, a line each"
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="test reviews right (%), mean ± std over seeds",
           title=f"Score against trainable parameters ({where})" if sizes else "Score against trainable parameters",
           ylim=SCORE_LIMITS)
    # beside the axes: it hides no line
    ax.legend(handles=shown, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def _color_of(i: int) -> str:
    """The i-th legend entry's color: matplotlib's ten, then Dark2's eight (saturated, so a thin line shows)."""
    return f"C{i}" if i < 10 else matplotlib.colormaps["Dark2"].colors[(i - 10) % 8]


def _curve_label(rows: pd.DataFrame) -> str:
    """A data curve's name: its method's family and the settings that tell it from the other rows of its script, and
    where each size chose its own rate on validation, those rates size by size (not the schedule of one size)."""
    settings = re.sub(r"^\S+( \([^)]*\))?", "", rows["run"].iloc[0])  # the run's name less its script and family
    settings = re.sub(r" method=\S+", "", settings)  # the family names it
    label = ", ".join([_family(rows["method"].iloc[0])] + re.sub(r" rate_by_epoch=\[[^]]*\]", "", settings).split())
    if not rows["rate_chosen"].all():
        return ", ".join([_family(rows["method"].iloc[0])] + settings.split())
    schedules = [json.loads(r["config"]).get("RATE_BY_EPOCH") for _, r in rows.iterrows()]
    if not all(schedules):  # a grid of peak rates: each seed chose its own (its run's rate_grid.csv)
        return f"{label}, peak rate chosen per seed on validation"
    rates = "; ".join(f"{int(r['samples']):,}: " + ",".join(f"{rate:g}" for rate in schedule)
                      for (_, r), schedule in zip(rows.iterrows(), schedules))
    return f"{label}, rate chosen at each size ({rates})"


def table_data(table: pd.DataFrame, path: str) -> str:
    """table.py's rows: strict score against training reviews (log scale), one line per method configuration with two
    sizes or more, its rate left out where each size chose its own on validation (each size's rate in its legend)."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    curves = [rows.sort_values("samples") for _, rows in table.groupby("curve", sort=False)
              if rows["samples"].nunique() > 1]
    for i, rows in enumerate(curves):
        _seed_spread(ax, rows["samples"], rows, _curve_label(rows), _color_of(i))
    ax.set(xscale="log", xlabel="training reviews", ylabel="test reviews right (%), mean ± std over seeds",
           title="Score against training reviews", ylim=SCORE_LIMITS)
    if curves:
        sizes = sorted({int(n) for rows in curves for n in rows["samples"]})
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])  # the sizes run, in plain numbers
        ax.minorticks_off()
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.13))  # below the axes: long entries hide no point
    return _save(fig, path)
