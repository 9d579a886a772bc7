"""table.py on tiny runs (three primer configurations, two seeds each, and a text prompt), and McNemar's test that
compare.py uses, checked against numpy and scipy (the bootstrap over seeds and reviews: test_stats.py)."""
import glob
import json
import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import experiment
import prompt_short
import table
from conftest import ROOT, overrides, run_script
from harness import cli, errors, files, ledger, plots, runs, stats, tableplots

CONFIGS = [{"primer_length": 2, "train_limit": 100}, {"primer_length": 2, "train_limit": 50},
           {"primer_length": 4, "train_limit": 100}]
CONVERGED = os.path.join(ROOT, "results", "published", "converged")  # the README's table and data curve


@pytest.fixture(scope="session")
def results(tiny, tmp_path_factory):
    """A results folder of 2 seeds x CONFIGS primer runs and one text prompt, all on the whole tiny test file."""
    out = tmp_path_factory.mktemp("table")
    # 1000 > the 60 test rows: all of them, any seed
    base = overrides(tiny, out) + ["--test_limit=1000", "--rate_by_epoch=[0.1]"]
    for seed in (0, 1):
        for config in CONFIGS:
            experiment.run(cli.configure(base + [f"--seed={seed}",
                                                 f"--data_dir={out}/data-{seed}-{config['train_limit']}"]
                                         + cli.as_args(config)))
    runs.score_text_prompt(cli.configure(base), "prompt_short", prompt_short.SYSTEM, prompt_short.USER)
    return out / "results"


@pytest.fixture(scope="module")
def converged_runs() -> pd.DataFrame:
    """The committed converged runs (table.load_runs), read once for the tests of their table and curve."""
    return table.load_runs(CONVERGED)


@pytest.fixture(scope="module")
def converged_rows(converged_runs) -> pd.DataFrame:
    """Every configuration of the committed converged runs, one row per size."""
    return table.summarize(converged_runs)


def correct(run_dir) -> np.ndarray:
    """Per review, right by the strict metric, read straight from the run's predictions."""
    p = load_file(str(run_dir / "predictions.safetensors"))
    return (p["answer"] == p["label_ids"][p["label"]]).numpy()


def cpu_seconds(run_dir) -> float:
    """The process CPU seconds a run recorded, training (its loss log's last row) and scoring (metrics.json)."""
    losses = run_dir / "losses.csv"
    train = pd.read_csv(losses)["cpu_seconds"].iloc[-1] if losses.exists() else 0.0
    return train + files.read_json(str(run_dir / "metrics.json"))["score_cpu_seconds"]


def most_frequent_share(run_dir) -> float:
    """The share of the run's most frequent strict answer, counted with numpy."""
    answers = load_file(str(run_dir / "predictions.safetensors"))["answer"].numpy()
    return np.unique(answers, return_counts=True)[1].max() / len(answers)


def test_one_row_per_configuration_with_its_seeds_spread_and_a_paired_test(results, capsys):
    written = table.write(str(results))
    printed = capsys.readouterr().out
    assert (results / "table.md").read_text() in printed + "\n"
    rows = pd.DataFrame(ledger.rows(str(results)))  # the tiny runs: no rate grid, on the CPU, their CPU time kept
    hours = sum(cpu_seconds(results / run) for run in rows["run_id"]) / 3600
    assert table.core_hours(table.load_runs(str(results)), written) == pytest.approx(hours) and hours > 0
    assert f"these {len(rows)} runs cost {hours:.1f} core-hours" in printed
    assert (len(written) == 4 and written["seeds"].tolist().count(2) == 3
            and sorted(written["samples"]) == [0, 50, 100, 100])
    frame = pd.DataFrame(ledger.rows(str(results)))
    best = written.iloc[0]
    best_right = np.stack([correct(results / run) for run in best["run_ids"].split()])
    assert sorted(written["run"]) == ["experiment primer_length=2"] * 2 + ["experiment primer_length=4", "prompt_short"]
    for i, r in enumerate(written.to_dict("records")):
        runs = r["run_ids"].split()
        scores = [correct(results / run).mean() for run in runs]
        assert r["score_mean"] == pytest.approx(np.mean(scores))
        assert ((math.isnan(r["score_std"]) and len(runs) == 1)
                or r["score_std"] == pytest.approx(np.std(scores, ddof=1)))
        assert set(frame[frame["run_id"].isin(runs)]["seed"]) == ({0, 1} if r["script"] == "experiment" else {0})
        assert r["label_bias"] == pytest.approx(np.mean([most_frequent_share(results / run) for run in runs]))
        if i == 0:
            assert math.isnan(r["bootstrap_p"]) and "| best | – |" in printed
            continue
        mine = np.stack([correct(results / run) for run in runs])  # every seed's row: the seeds are resampled
        difference, low, high, p = stats.bootstrap_difference(mine, best_right)
        assert difference == pytest.approx(mine.mean() - best_right.mean())
        assert ((r["difference"], r["difference_low"], r["difference_high"], r["bootstrap_p"])
                == (difference, low, high, p))
        assert " | ".join(table.difference(pd.Series(r))) in printed
    csv = pd.read_csv(results / "table.csv")
    assert csv["score_mean"].tolist() == pytest.approx(written["score_mean"].tolist())
    assert csv["label_bias"].tolist() == pytest.approx(written["label_bias"].tolist())
    assert "bootstrap_p" in csv and "mcnemar_p" not in csv  # the pooled McNemar counted 3 seeds as one classifier
    for name in ("table_params.png", "table_data.png"):
        assert (results / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_data_figure_draws_one_curve_per_configuration_across_sizes(results, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or path)
    written = table.summarize(table.load_runs(str(results)))
    tableplots.table_data(written, "unused.png")
    curve = written[written["run"] == "experiment primer_length=2"].sort_values("samples")
    (bars,) = figures[0].axes[0].containers  # one curve: the 4-vector primer has one size only, the text prompt none
    line = bars.lines[0]
    assert list(line.get_xdata()) == [50, 100] and list(line.get_ydata()) == pytest.approx(100 * curve["score_mean"])


def test_the_figures_name_methods_keep_a_0_line_in_sight_and_put_rates_in_the_legend(results, tmp_path, monkeypatch):
    written = table.summarize(table.load_runs(str(results)))
    hard = written[written["trainable_params"] == 0].assign(method="hard primer", score_mean=0.0, scores=[[0.0]])
    with_hard = pd.concat([written, hard], ignore_index=True)
    params = plots.description(tableplots.table_params(with_hard, str(tmp_path / "params.png")))["axes"][0]
    assert params["legend"] == ["primer", "text prompt", "hard primer"]  # not experiment, prompt_short, inspect_primer
    assert params["title"] == "Score against trainable parameters (2 training-set sizes, a line each)"
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or path)
    tableplots.table_params(with_hard, "unused.png")
    tableplots.table_data(written, "unused.png")
    (hard_line,) = [line for line in figures[0].axes[0].lines if line.get_label() == "hard primer"]
    assert figures[0].axes[0].get_ylim()[0] < hard_line.get_ydata()[0] == 0  # above the frame, not on it
    assert (not figures[1].axes[0].texts
            and figures[1].axes[0].get_legend().texts[0].get_text() == "primer, primer_length=2")


def test_runs_on_other_test_reviews_are_refused(results, tmp_path, tiny):
    folder = tmp_path / "mixed"
    shutil.copytree(results, folder)
    primer = next(folder.glob("*-experiment/primer.safetensors"))  # re-scored, no training, on a sample of 40 reviews
    experiment.run(cli.configure(overrides(tiny, tmp_path) + [f"--results_dir={folder}", "--test_limit=40",
                                                              f"--primer_path={primer}"]))
    with pytest.raises(errors.UserError,
                       match=r" were not scored on the same test reviews \(their test_limit differ\)"):
        table.write(str(folder))
    other_seed = tmp_path / "other_seed"  # the test sample is the same at every seed: a seed-1 re-score pairs with it
    experiment.run(cli.configure(overrides(tiny, tmp_path) + [f"--results_dir={other_seed}", "--test_limit=40",
                                                              f"--primer_path={primer}", "--seed=1",
                                                              f"--data_dir={tmp_path}/data-seed1"]))
    runs = {str(d): stats.load_run(str(d)) for d in [*folder.glob("*-experiment"), *other_seed.glob("*-experiment")]
            if stats.load_run(str(d))[0]["test_limit"] == 40}
    assert len(runs) == 2
    stats.check_same_reviews(runs)
    assert run_script("table.py", str(tmp_path / "none")).stderr.strip() == (
        f"error: {tmp_path}/none: no such folder (in {ROOT}): give a results folder, "
        "one holding results.csv and its run folders (python table.py results/)")
    assert run_script("table.py").stderr.strip() == "error: give one results folder, not 0: python table.py results/"


def test_mcnemar_exact_known_values():
    assert stats.mcnemar_exact(10, 2) == pytest.approx(0.0385742, rel=1e-5)  # 2 * P(X <= 2), X ~ Bin(12, 1/2)
    assert stats.mcnemar_exact(3, 3) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(0, 20) == pytest.approx(2 / 2 ** 20)


def test_paired_is_mcnemar_on_one_seed_and_counts_each_review_once_on_several():
    import torch
    a = torch.tensor([[1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    b = torch.tensor([[0, 0, 1, 1, 0, 1]], dtype=torch.bool)
    assert stats.paired(a, b) == (2, 1, stats.mcnemar_exact(2, 1))
    three = a.repeat(3, 1)
    three[2, 0] = False  # review 0: right 2 of 3 times for A, never for B; still one review for A
    assert stats.paired(three, b.repeat(3, 1))[:2] == (2, 1)
    assert stats.mean_std([0.5, 0.7, 0.9]) == (pytest.approx(0.7), pytest.approx(0.2))
    assert math.isnan(stats.mean_std([0.5])[1])


def test_a_family_pools_what_seeds_choose_and_keeps_two_records_of_one_run_apart():
    assert (table.family("linear probe (layer 22, last)") == table.family("linear probe (layer 17, mean)")
            == "linear probe")
    assert (table.family("token search, exact ids (27.2 CPU min): 'Classify'")
            != table.family("prompt search (tokens, decoded text): 'C'"))


def test_a_row_is_named_by_its_family_and_what_differs_within_it():
    """tune.py's methods each bring their own settings (method, rate grid): the family names them; only what differs
    between two rows of one family (here IA3's two rates) is spelled out."""
    def group(family: str, **settings) -> str:
        return json.dumps(["tune", family, settings], sort_keys=True)
    groups = [group("IA3", METHOD="ia3", RATE=0.01), group("IA3", METHOD="ia3", RATE=0.003),
              group("LoReFT", METHOD="loreft", RATE=0.01), group("LayerNorm tuning", METHOD="layernorm", RATE=0.001)]
    assert sorted(table.names(pd.DataFrame({"script": "tune", "group": groups})).values()) == [
        "tune (IA3) rate=0.003", "tune (IA3) rate=0.01", "tune (LayerNorm tuning)", "tune (LoReFT)"]


def test_a_peak_rate_grid_names_a_row_only_where_two_were_searched_at_one_size():
    """Each size's seeds choose their rate from its grid, so one curve's sizes may search different grids; two grids
    at one size are two rows, named by their grids, and two curves."""
    def group(size: int, grid: list[float]) -> str:
        return json.dumps(["experiment", "primer", {"TRAIN_REVIEWS": size, "RATE_GRID": grid}], sort_keys=True)
    across_sizes = [group(300, [0.1, 0.03]), group(1000, [0.3, 1.0])]
    assert set(table.names(pd.DataFrame({"script": "experiment", "group": across_sizes})).values()) == {"experiment"}
    at_one_size = across_sizes + [group(1000, [0.1, 0.03])]
    assert sorted(table.names(pd.DataFrame({"script": "experiment", "group": at_one_size})).values()) == [
        "experiment rate_grid=[0.1, 0.03]", "experiment rate_grid=[0.1, 0.03]", "experiment rate_grid=[0.3, 1.0]"]
    run = pd.DataFrame({"seed": [0], "score": [0.8], "restricted_score": [0.8], "total": [4], "rate_chosen": [True],
                        "method": ["primer"], "trainable_params": [8], "samples": [300], "label_bias": [0.5],
                        "restricted_label_bias": [0.5], "train_seconds": [1.0], "score_seconds": [1.0],
                        "right": [torch.ones(4, dtype=torch.bool)], "run_id": ["a"]})
    curve = lambda name, group: table.pooled(name, group, run)["curve"]
    assert curve("experiment", across_sizes[0]) == curve("experiment", across_sizes[1])  # one curve across grids
    assert (curve("experiment rate_grid=[0.1, 0.03]", at_one_size[0])
            != curve("experiment rate_grid=[0.3, 1.0]", at_one_size[1]))  # two grids at one size: two curves


def test_one_size_against_a_named_row_and_the_mistakes_of_both_settings(results, capsys):
    written = table.write(str(results), train_reviews=100, against="primer_length=2")
    printed = capsys.readouterr().out
    assert sorted(written["samples"]) == [0, 100, 100] and (results / "table_100.md").read_text() in printed + "\n"
    reference = written[written["reference"]]
    assert list(reference["run"]) == ["experiment primer_length=2"] and int(reference["samples"].iloc[0]) == 100
    for i, r in written.iterrows():
        if not r["reference"]:
            test = stats.bootstrap_difference(r["right"], reference["right"].iloc[0])
            assert (r["difference"], r["difference_low"], r["difference_high"], r["bootstrap_p"]) == test
    assert ("| reference |" in printed) == (reference.index[0] != 0)
    for args, error in ((["--train_reviews=7"], "no run was trained on --train_reviews=7 reviews"),
                        (["--against=lora"], "no row is named like --against='lora'")):
        assert run_script("table.py", str(results), *args).stderr.strip().startswith(f"error: {error}")


@pytest.mark.parametrize("folder, page", [("table", "docs/results.md"), ("converged", "README.md")])
def test_the_published_folders_reproduce_the_published_tables(folder, page):
    """Every run folder behind the published tables is committed: table.py on them prints the page's rows."""
    runs = table.load_runs(os.path.join(ROOT, "results", "published", folder))
    written = table.summarize(runs, 300, "primer_length=4")
    assert table.markdown(written) in open(os.path.join(ROOT, page), encoding="utf-8").read()
    assert (written["seeds"][written["trainable_params"] > 0] >= 3).all()  # every trained row has its seeds
    if folder == "converged":  # the costs the README gives: the trained rows', the table's, every trained run's
        trained = written[written["trainable_params"] > 0]
        spent = runs[runs["trainable_params"] > 0]["core_seconds"].sum() / 3600
        readme = " ".join(open(os.path.join(ROOT, page), encoding="utf-8").read().split())
        assert (f"the {trained['seeds'].sum()} trained runs cost {table.core_hours(runs, trained):.1f} core-hours "
                f"({table.core_hours(runs, written):.1f} with the prompts and searches)") in readme
        assert f"The {(runs['trainable_params'] > 0).sum()} converged trained runs cost {spent:.1f}" in readme
    varied = written[written["method"] != written["method_cell"]]  # seeds that chose apart: the page names the family
    assert len(varied) and all(r.method_cell == f"{table.family(r.method)}, chosen per seed (table.csv)"
                               and r.method.count(table.family(r.method)) == r.seeds for r in varied.itertuples())


def test_the_converged_runs_chose_inside_their_grids_and_went_past_their_best():
    """The README's converged table: every trained run chose its rate strictly inside a grid of at least 4 rates (its
    own, or that of the seed it took the rate from), and the chosen rate's best validation came before its last step
    (training went on until it stopped improving)."""
    read = lambda run: pd.read_csv(os.path.join(CONVERGED, run, "rate_grid.csv"), keep_default_na=False)
    grids = glob.glob(os.path.join(CONVERGED, "*", "rate_grid.csv"))
    runs = [os.path.basename(os.path.dirname(path)) for path in grids]
    assert len(runs) >= 12  # both primers, IA3 and the learned vector, three seeds each
    for run in runs:
        chosen = read(run).query("chosen").iloc[0]
        grid = read(chosen.get("rate_from") or run)
        assert len(grid) >= 4 and grid["first_rate"].min() < chosen["first_rate"] < grid["first_rate"].max()
        assert chosen["best_step"] < chosen["steps"]


def test_the_converged_curves_have_their_seeds_and_never_fall_past_their_spread(converged_rows):
    """The data curve at convergence: every trained method drawn at 100 to 2,000 snippets has at least 3 seeds at
    each size, and no size scores below the one before it by more than either size's seed spread."""
    trained = converged_rows[converged_rows["trainable_params"] > 0]
    curves = [rows.sort_values("samples") for _, rows in trained.groupby("curve")]
    curves = [rows for rows in curves if rows["samples"].nunique() > 1]
    assert len(curves) == 5 and all(list(rows["samples"]) == [100, 300, 1000, 2000] for rows in curves)
    for rows in curves:
        assert (rows["seeds"] >= 3).all()
        fall = rows["score_mean"].shift() - rows["score_mean"]
        assert (fall.iloc[1:] <= rows["score_std"].combine(rows["score_std"].shift(), max).iloc[1:]).all()


def test_the_per_seed_rates_on_the_page_are_read_from_the_run_files(converged_runs):
    rates = table.rate_choices(converged_runs, CONVERGED, 300)
    assert rates.count("\n") >= 19  # six methods' three seeds, under the header
    assert rates in open(os.path.join(ROOT, "docs", "results.md"), encoding="utf-8").read()


def test_the_converged_data_figure_names_its_per_seed_rate_choice(converged_rows, monkeypatch):
    """The converged curve's runs choose a peak rate per seed (no schedule in their config): the data figure draws
    each method across its sizes and says so in the legend, rather than a schedule its runs do not have."""
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or path)
    tableplots.table_data(converged_rows, "unused.png")
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().texts]
    assert "primer, primer_length=4, peak rate chosen per seed on validation" in legend
    assert len(legend) == (converged_rows.groupby("curve")["samples"].nunique() > 1).sum() >= 4
