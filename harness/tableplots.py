"""The comparison's figures, of many runs: scores against primer length (a sweep), training losses of a results
folder, and table.py's rows against trainable parameters and against training reviews."""
import json
import os
import re

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd

from harness import plots

SCORE_LIMITS = (-3, 103)  # a score axis's view (%): a line at 0% or 100% (a hard primer that never answers) stays in
# sight above the frame, not on it


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
    return plots.save(fig, path)


def losses_plot(rows: list[dict], results_dir: str, path: str) -> str:
    """Running-mean training loss against step, one line per trained run, its epoch boundaries dotted in its color."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        losses = os.path.join(results_dir, r["run_id"], "losses.csv")
        if os.path.exists(losses):  # text prompts and re-scored primers have no training
            log = pd.read_csv(losses)
            label = f"{r['method']}, {int(r['tokens'])} tokens, lr {r['lr_schedule']}"
            (line,) = ax.plot(log["step"], plots.smooth(log["loss"]), label=label)
            plots.mark_epochs(ax, log, line.get_color(), None if any(l.get_linestyle() == ":" for l in ax.lines) else
                        "epoch boundary (dotted, in the run's color)")
    plots.loss_axis(ax, "cross-entropy loss (running mean)", "Training loss of each run in the ledger")
    if ax.lines:
        ax.legend(fontsize=8)
    return plots.save(fig, path)


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
    return plots.save(fig, path)


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
    return plots.save(fig, path)
