"""The comparison: one row per method configuration, its seeds pooled, with its cost and a paired test against the best.

    python table.py results/                       # any folder holding a ledger (results.csv) and its run folders
    python table.py results/published/table        # every row of the README's runs, from the run files committed there
    python table.py results/published/table --train_reviews=300 --against=primer_length=4   # the README's table

Runs whose config.json agree on every key that can change a result but the seed (ledger.result_config) form one
row, a rate grid's run counting as the run of the schedule it chose on validation (with that schedule's train
seconds) and a seed run twice once (its latest run): trainable parameters, training reviews, seeds, the strict
score and the label-restricted one as mean and standard deviation over seeds, the 95% Wilson interval one run of
that score would have on these test reviews (the test-sampling noise, beside the seed noise), train and score
seconds, the share of the best probe row's score, the label bias (the share of the most frequent answer, strict and
label-restricted, mean over seeds: 100% is a constant classifier), and the difference from the best row (or the best
row named like AGAINST) with its 95% interval and p by a paired bootstrap over seeds and test reviews
(stats.bootstrap_difference). Every run must have been scored on the same test reviews.
Writes table.md and table.csv (with TRAIN_REVIEWS: table_<n>.md and table_<n>.csv, that size's rows and those of
prompts and searches, and rates_<n>.md, the rate each seed of a rate grid chose), table_params.png (score against
trainable parameters) and table_data.png (score against training reviews, every size: a method whose rate was
chosen on validation at each size is one curve, its legend entry giving each size's rate) into that folder.
"""
import json
import math
import os
import re
from types import SimpleNamespace

import pandas as pd
import torch

from harness import cli, errors, files, ledger, rategrid, scoring, stats, tableplots

TRAIN_REVIEWS = 0  # rows trained on this many reviews, plus those with nothing trained (prompts, searches); 0: all
AGAINST = ""  # the paired tests' reference: the best row whose name contains this text; "": the best row
SETTINGS = cli.own_settings(dict(globals()))  # the constants above, as --name=value settings
# set by the training reviews (steer takes all of a small split): the data curve's axis, not a row's name
SIZE_KEYS = ("TRAIN_LIMIT", "TRAIN_REVIEWS", "PROBE_TRAIN", "VECTOR_REVIEWS")
# what a rate grid chose (per-epoch rates) or chose from (peak rates) at each size: a curve joins sizes across them
RATE_KEYS = ("RATE_BY_EPOCH", "RATE_GRID")
COLUMNS = ["Run", "Method", "Params", "Train reviews", "Seeds", "Score (mean ± std)", "One run's 95% interval",
           "Label-restricted (mean ± std)", "Label bias (strict / restricted)", "Train s", "Score s", "Of the probe",
           "Difference (95% interval)", "p (seeds × reviews)"]


def load_runs(results_dir: str) -> pd.DataFrame:
    """Every finished ledger row with its run's config and per-review correctness [reviews] (strict, restricted)."""
    rows = [r for r in ledger.rows(results_dir) if r["status"] == "finished"]
    if not rows:
        raise errors.UserError(f"{results_dir} holds no finished runs in {ledger.path(results_dir)}: "
                               "give a results folder")
    loaded = {r["run_id"]: stats.load_run(os.path.join(results_dir, r["run_id"])) for r in rows}
    stats.check_same_reviews(loaded)
    for r in rows:
        config, predictions = loaded[r["run_id"]]
        run_dir = os.path.join(results_dir, r["run_id"])
        environment = files.read_json(os.path.join(run_dir, "environment.json"))
        r["core_seconds"] = core_seconds(run_dir, config, r, environment)
        config, seconds = rategrid.as_chosen(run_dir, config)
        r["train_seconds"] = r["train_seconds"] if seconds is None else seconds  # the chosen schedule's alone
        r["rate_chosen"] = seconds is not None
        r["config"] = ledger.result_config(r["script"], config)
        # a seed that took its rate from another (RATE_FROM) pools with it; an unset setting reads as absent
        settings = {k: v for k, v in r["config"].items() if k not in ("SEED", "RATE_FROM") and v not in (None, [])}
        r["group"] = json.dumps([r["script"], family(r["method"]), settings], sort_keys=True)
        r["right"], r["restricted_right"] = stats.correctness(predictions).values()
        r["label_bias"], r["restricted_label_bias"] = stats.label_bias(predictions)
    return pd.DataFrame(rows)


def core_seconds(run_dir: str, config: dict, row: dict, environment: dict) -> float:
    """What a run cost in core-seconds, training (every rate candidate's) and scoring: on the CPU, its processes' CPU
    seconds where it recorded them; else (a GPU, or a script or version that did not) its wall seconds times the
    threads and processes it ran on, which counts as work the waits of a run sharing its cores with others."""
    processes = environment.get("processes", 1)  # 1: unrecorded
    another = scores_another(run_dir)
    metrics = files.read_json(os.path.join(run_dir, "metrics.json"))
    score_cpu, train_cpu = metrics.get("score_cpu_seconds"), 0.0
    if not another and row["train_seconds"]:  # a script's own timing of its training (a probe's, a search's) first
        train_cpu = metrics.get("train_cpu_seconds")
        if train_cpu is None:  # its loss logs' (read only where needed)
            train_cpu = rategrid.candidates_cpu_seconds(run_dir, config)
    if environment.get("device") == "cpu" and score_cpu is not None and train_cpu is not None:
        return (train_cpu + score_cpu) * processes
    train = 0.0 if another else rategrid.candidates_seconds(run_dir, config, row["train_seconds"])
    return (train + row["score_seconds"]) * environment.get("threads", 1) * processes


def scores_another(run_dir: str) -> bool:
    """Whether the run scores what another found (a token search's decoded text: its prompt.json names the search
    run, which paid for the search)."""
    prompt = os.path.join(run_dir, "prompt.json")
    return os.path.exists(prompt) and bool(files.read_json(prompt).get("search_run"))


def family(method: str) -> str:
    """A ledger method's name without what one run chose (a probe's layer, a search's budget and prompt), so seeds
    pool, while a script's two records of one run (a token search's exact ids and its decoded text) stay apart."""
    return re.split(r"\s*[(:]", method, maxsplit=1)[0]


def names(runs: pd.DataFrame) -> dict[str, str]:
    """Each group's name: its script, its method's family where the script's rows have several, and the settings in
    which it differs from the other rows of its script and family (a family's own settings, its method's, go
    without saying). A grid of peak rates is the search each size's seeds chose from, so it names a row only where
    two grids were searched at one size."""
    out = {}
    for script, groups in runs.groupby("script"):
        parsed = {g: json.loads(g) for g in groups["group"].unique()}
        families = {p[1] for p in parsed.values()}
        for family_name in families:
            configs = {g: dict(p[2]) for g, p in parsed.items() if p[1] == family_name}
            prefix = [script] + ([f"({family_name})"] if len(families) > 1 else [])
            named = _named(prefix, configs, SIZE_KEYS + ("RATE_GRID",))
            sized = {(name, json.dumps([configs[g].get(k) for k in SIZE_KEYS])) for g, name in named.items()}
            out.update(named if len(sized) == len(named) else _named(prefix, configs, SIZE_KEYS))
    return out


def _named(prefix: list[str], configs: dict[str, dict], unnamed: tuple[str, ...]) -> dict[str, str]:
    """Each config's name: the prefix and the settings in which the configs differ, but those in `unnamed`."""
    varying = sorted({k for c in configs.values() for k in c if k not in unnamed
                      and len({json.dumps(other[k]) for other in configs.values() if k in other}) > 1})
    return {group: " ".join(prefix + [f"{k.lower()}={config.get(k)!r}".replace("'", "") for k in varying])
            for group, config in configs.items()}


def fmt(mean: float, std: float) -> str:
    return f"{100 * mean:.1f}%" + ("" if math.isnan(std) else f" ± {100 * std:.1f}")


def pooled(name: str, group: str, runs: pd.DataFrame) -> dict:
    """One group's row: its runs' costs, their scores' mean and std over seeds (a seed run twice counts once, its
    latest run), and per-review correctness [seeds, n]."""
    script, _, config = json.loads(group)
    seeds = runs.drop_duplicates("seed", keep="last").sort_values("seed")
    score, restricted = stats.mean_std(seeds["score"].tolist()), stats.mean_std(seeds["restricted_score"].tolist())
    total = int(seeds["total"].iloc[0])
    low, high = scoring.wilson_interval(score[0] * total, total)
    chosen = bool(runs["rate_chosen"].any())  # on validation at this size: the curve joins sizes whatever the rate
    joined = [k for k in RATE_KEYS if k != "RATE_GRID" or "rate_grid=" not in name]  # a grid naming its row stays
    methods = list(dict.fromkeys(seeds["method"]))  # seeds differ in what each chose: a probe's layer, a prompt
    return {"run": name, "script": script, "method": "; ".join(methods),
            "method_cell": methods[0] if len(methods) == 1 else f"{family(methods[0])}, chosen per seed (table.csv)",
            "trainable_params": int(seeds["trainable_params"].iloc[0]), "samples": int(seeds["samples"].mean()),
            "seeds": len(seeds), "score_mean": score[0], "score_std": score[1], "score_low": low, "score_high": high,
            "restricted_mean": restricted[0], "restricted_std": restricted[1],
            "label_bias": seeds["label_bias"].mean(), "restricted_label_bias": seeds["restricted_label_bias"].mean(),
            "train_seconds": seeds["train_seconds"].mean(), "score_seconds": seeds["score_seconds"].mean(),
            "scores": seeds["score"].tolist(), "right": torch.stack(list(seeds["right"])),
            "run_ids": " ".join(seeds["run_id"]),
            "rate_chosen": chosen, "config": json.dumps(config),
            "curve": json.dumps([script, {k: v for k, v in config.items()
                                          if k not in SIZE_KEYS and not (chosen and k in joined)}, chosen])}


def summarize(runs: pd.DataFrame, train_reviews: int = 0, against: str = "") -> pd.DataFrame:
    """One row per group (those trained on train_reviews and those with no trained parameters, when given), best mean
    score first, with its seeds' spread and its difference from the reference row (the best one whose name contains
    `against`) by the bootstrap over seeds and reviews."""
    named = names(runs)
    rows = [pooled(named[group], group, seeds) for group, seeds in runs.groupby("group", sort=False)]
    table = pd.DataFrame(rows).sort_values("score_mean", ascending=False, kind="stable").reset_index(drop=True)
    if train_reviews:
        if not (table["samples"] == train_reviews).any():
            sizes = ", ".join(f"{n:,}" for n in sorted(set(table["samples"]) - {0}))
            raise errors.UserError(f"no run was trained on --train_reviews={train_reviews:,} reviews: give a size of "
                                   f"the Train reviews column ({sizes}), or 0 for every row")
        table = table[(table["samples"] == train_reviews) | (table["trainable_params"] == 0)].reset_index(drop=True)
    reference = reference_row(table, against)
    probes = table[table["script"] == "probe"]
    table["probe_share"] = table["score_mean"] / probes["score_mean"].max() if len(probes) else math.nan
    tests = [stats.bootstrap_difference(r["right"], table.at[reference, "right"]) if i != reference
             else (0.0, math.nan, math.nan, math.nan) for i, r in table.iterrows()]
    table["difference"], table["difference_low"], table["difference_high"], table["bootstrap_p"] = zip(*tests)
    table["reference"] = table.index == reference
    return table


def reference_row(table: pd.DataFrame, against: str) -> int:
    """The index of the best row whose name contains `against` (the best row for "")."""
    matches = table.index[table["run"].str.contains(against, regex=False)]
    if not len(matches):
        raise errors.UserError(f"no row is named like --against={against!r}: give a part of a name in the Run column "
                               f"({', '.join(dict.fromkeys(table['run']))})")
    return int(matches[0])


def markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for i, r in table.iterrows():
        test = [("reference" if i else "best"), "–"] if r["reference"] else difference(r)
        cells = [r["run"], r["method_cell"], f"{r['trainable_params']:,}",
                 f"{r['samples']:,}" if r["samples"] else "–", str(r["seeds"]), fmt(r["score_mean"], r["score_std"]),
                 f"[{100 * r['score_low']:.1f}, {100 * r['score_high']:.1f}]",
                 fmt(r["restricted_mean"], r["restricted_std"]),
                 f"{100 * r['label_bias']:.0f}% / {100 * r['restricted_label_bias']:.0f}%",
                 f"{r['train_seconds']:,.0f}", f"{r['score_seconds']:,.0f}",
                 "–" if math.isnan(r["probe_share"]) else f"{100 * r['probe_share']:.0f}%", *test]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def difference(row: pd.Series) -> list[str]:
    """A row's difference from the reference in points with its 95% interval, and its p; a p at the bootstrap's
    floor is written as a bound, as the resamples can show no smaller one."""
    floor = 2 / (stats.BOOTSTRAP_RESAMPLES + 1)
    p = f"≤ {floor:.1g}" if row["bootstrap_p"] <= floor else f"{row['bootstrap_p']:.2g}"
    low, high = 100 * row["difference_low"], 100 * row["difference_high"]
    return [f"{100 * row['difference']:+.1f} [{low:+.1f}, {high:+.1f}]", p]


RATE_COLUMNS = ["Run", "Seed", "Rates tried", "Chosen", "Best epoch", "Epochs run", "Validation", "Test"]


def rate_choices(runs: pd.DataFrame, results_dir: str, train_reviews: int) -> str:
    """Markdown, one line per rate-grid run trained on `train_reviews` (by row name, then seed): the rates it tried
    (its grid, then those it widened to; a rate taken from another seed's run first), the one it chose, that rate's
    best and last epoch, its best validation score and the run's test score; "" without such runs."""
    named, seeds = names(runs), runs.set_index("run_id")["seed"]
    lines = []
    for _, r in runs[runs["rate_chosen"] & (runs["samples"] == train_reviews)].iterrows():
        grid = pd.read_csv(os.path.join(results_dir, r["run_id"], "rate_grid.csv"), keep_default_na=False)
        chosen, asked = grid.query("chosen").iloc[0], [float(rate) for rate in r["config"]["RATE_GRID"]]
        tried = [f"{rate:g}" for rate in sorted(asked) if rate in set(grid["first_rate"])]
        widened = [f"{rate:g}" for rate in grid["first_rate"] if rate not in asked]
        tried += [f"then {', '.join(widened)}"] if widened else []
        taken = grid[grid["rate_from"] != ""] if "rate_from" in grid else grid.iloc[:0]
        if len(taken):  # a rate from another seed's run, trained first (alone where it held)
            source = taken["rate_from"].iloc[0]
            tried = [f"{'seed ' + str(seeds[source]) if source in seeds else source}'s {taken['first_rate'].iloc[0]:g}"
                     + (f" first; {', '.join(tried)}" if len(grid) > 1 else "")]
        per_epoch = math.ceil(r["samples"] / r["config"]["BATCH_SIZE"])
        lines.append((named[r["group"]], r["seed"], [", ".join(tried), f"{chosen['first_rate']:g}",
                      str(chosen["best_epoch"]), str(math.ceil(chosen["steps"] / per_epoch)),
                      f"{100 * chosen['val_score']:.1f}%", f"{100 * r['score']:.1f}%"]))
    rows = [f"| {name} | {seed} | " + " | ".join(cells) + " |" for name, seed, cells in sorted(lines)]
    return "\n".join(["| " + " | ".join(RATE_COLUMNS) + " |", "|---" * len(RATE_COLUMNS) + "|", *rows]) if rows else ""


def core_hours(runs: pd.DataFrame, table: pd.DataFrame) -> float:
    """What the runs behind the table's rows cost, in core-hours (load_runs' core_seconds)."""
    ids = {run for run_ids in table["run_ids"] for run in run_ids.split()}
    return runs[runs["run_id"].isin(ids)]["core_seconds"].sum() / 3600


def write(results_dir: str, train_reviews: int = 0, against: str = "") -> pd.DataFrame:
    runs = load_runs(results_dir)
    table = summarize(runs, train_reviews, against)
    text = markdown(table)
    columns = [c for c in table.columns if c not in ("right", "scores", "curve", "method_cell")]
    stem = f"table_{train_reviews}" if train_reviews else "table"
    for name, content in ((f"{stem}.md", text + "\n"), (f"{stem}.csv", table[columns].to_csv(index=False))):
        with files.atomic_path(os.path.join(results_dir, name)) as tmp, open(tmp, "w") as f:
            f.write(content)
    print(text)
    print(f"these {table['seeds'].sum()} runs cost {core_hours(runs, table):.1f} core-hours (every rate candidate's "
          "training and the scoring: on the CPU each run's CPU time where it kept it, else its seconds times the "
          "threads and processes it ran on)")
    rates = rate_choices(runs, results_dir, train_reviews) if train_reviews else ""
    if rates:  # each seed's rate, read from its rate_grid.csv
        files.write_atomic(os.path.join(results_dir, f"rates_{train_reviews}.md"), rates + "\n")
        print(rates)
    every = summarize(runs) if train_reviews else table  # the figures draw every size
    for path in (tableplots.table_params(every, os.path.join(results_dir, "table_params.png")),
                 tableplots.table_data(every, os.path.join(results_dir, "table_data.png"))):
        print(f"saved {path}")
    return table


def parse(argv: list[str]) -> SimpleNamespace:
    """The results folder of the command line, then table.py's own settings."""
    folders = [arg for arg in argv if not arg.startswith("--")]
    if len(folders) != 1:
        raise errors.UserError(f"give one results folder, not {len(folders)}: python table.py results/")
    if not os.path.isdir(folders[0]):
        raise errors.UserError(f"{folders[0]}: no such folder (in {os.getcwd()}): give a results folder, one holding "
                               f"results.csv and its run folders (python table.py results/)")
    cfg = cli.configure([arg for arg in argv if arg.startswith("--")], SETTINGS, shared=())
    cfg.RESULTS_DIR = folders[0]
    return cfg


if __name__ == "__main__":
    cli.main(lambda cfg: write(cfg.RESULTS_DIR, cfg.TRAIN_REVIEWS, cfg.AGAINST), SETTINGS, parse=parse, shared=())
