"""The research knobs: PRIMER_INIT, VAL_LIMIT with KEEP_BEST, and the Wilson intervals on every score."""
import glob
import json
import os

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import experiment
import steer
import table
from conftest import overrides, run_script
from harness import cli, data, errors, layouts, ledger, plots, primers, rategrid, runs, scoring

TINY_RUN = ["--train_limit=40", "--test_limit=20"]  # 4 batches of 10 per epoch, 20 test reviews
TEXT = "text:great food"  # three tokens for the tiny tokenizer


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    return runs.setup(cli.configure(overrides(tiny, tmp_path_factory.mktemp("knobs")) + TINY_RUN))


def test_wilson_interval_known_values():
    low, high = scoring.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert scoring.wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert scoring.wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    low, high = scoring.wilson_interval(36442, 38000)  # the reference's best row: 95.9% ±0.2
    assert high - low == pytest.approx(0.004, abs=1e-4)
    assert scoring.wilson_interval(81, 90, z=2.576)[0] < scoring.wilson_interval(81, 90)[0]  # 99% is wider than 95%


def test_format_score_prints_the_half_width():
    row = {"score": 0.959, "score_low": 0.957, "score_high": 0.961, "restricted_score": 0.5, "restricted_low": 0.404,
           "restricted_high": 0.596}
    assert ledger.format_score(row, "score") == "95.9% ±0.2"
    assert ledger.format_score(row, "restricted") == "50.0% ±9.6"


def test_primer_inits_are_the_embeddings_they_name(task):
    table = task.model.get_input_embeddings().weight
    start = lambda init, length=5, seed=0: primers.initial_primer(task, init, length, seed)
    assert torch.equal(start("random"), primers.init_primer(task.model, 5, 0))  # the reference's, unchanged

    vocab = start("vocab")
    tokens = primers.primer_init_tokens(task, "vocab", 5, 0)
    assert torch.equal(vocab, table[tokens]) and len(set(tokens.tolist())) == 5
    assert not set(tokens.tolist()) & set(task.tokenizer.added_tokens_decoder)  # no special tokens
    assert torch.equal(vocab, start("vocab")) and not torch.equal(vocab, start("vocab", seed=1))

    l0, l1 = table[task.label_ids]
    assert torch.equal(start("labels"), torch.stack([l0, l1, l0, l1, l0]))

    words = task.tokenizer("great food", add_special_tokens=False)["input_ids"]
    assert 1 < len(words) < 5
    assert torch.equal(start(TEXT), table[(words * 5)[:5]])  # cycled
    assert torch.equal(start(TEXT, length=1), table[words[:1]])  # cut

    for init in ("random", "vocab", "labels", TEXT):
        primer = start(init)
        assert primer.dtype == torch.float32 and primer.shape == (5, table.shape[1]) and primer.device == task.device
        assert not primer.requires_grad and primer.data_ptr() != table.data_ptr()


@pytest.mark.parametrize("init, message", [("zeros", "is not one of 'random', 'vocab', 'labels', 'text:<words>'"),
                                           ("text:", "has no text")])
def test_bad_primer_init_is_refused(task, init, message):
    with pytest.raises(errors.UserError, match=message):
        primers.initial_primer(task, init, 4, 0)


@pytest.mark.parametrize("init", ["vocab", "labels", TEXT])
def test_each_primer_init_is_where_a_run_starts(tiny, tmp_path_factory, task, init):
    """At learning rate 0 Adam leaves the primer as it started, so the saved primer is the initial one."""
    out = tmp_path_factory.getbasetemp() / "knob_inits"  # one data folder for the three runs
    experiment.run(cli.configure([*overrides(tiny, out), *TINY_RUN, "--rate_by_epoch=[0.0]", f"--primer_init={init}"]))
    run = out / "results" / pd.read_csv(out / "results" / "results.csv")["run_id"].iloc[-1]
    assert json.loads((run / "config.json").read_text())["primer_init"] == init
    assert torch.equal(load_file(str(run / "primer.safetensors"))["primer"], primers.initial_primer(task, init, 4, 0))


def test_validation_reviews_are_held_out_balanced_and_seeded(task):
    train, val = data.training_sets(task.train, 10, 0, 0)
    assert (len(train), len(val)) == (30, 10) and val.labels.sum() == 5
    reviews = lambda split: sorted(tuple(split.tokens[split.offsets[i]:split.offsets[i + 1]].tolist())
                                   for i in range(len(split)))
    assert sorted(reviews(train) + reviews(val)) == reviews(task.train)  # every review in exactly one of them
    assert reviews(data.training_sets(task.train, 10, 0, 0)[1]) == reviews(val)
    assert reviews(data.training_sets(task.train, 10, 0, 1)[1]) != reviews(val)
    unchanged, none = data.training_sets(task.train, 0, 0, 0)
    assert unchanged is task.train and none is None  # VAL_LIMIT=0: the reference


@pytest.mark.parametrize("args, message", [
    (["--val_limit=40"], "--val_limit=40 must be between 1 and 39: validation reviews are held out of the 40 training"),
    (["--rate_grid=[[1e-2], [1e-3]]"], "--rate_grid chooses the rates on validation reviews: set --val_limit"),
    (["--train_reviews=-5"], "--train_reviews=-5 must be a whole number of reviews, 0 for all that --val_limit leaves"),
])
def test_bad_validation_settings_are_refused(task, args, message):
    cfg = cli.configure(args)
    with pytest.raises(errors.UserError, match=message.replace("(", r"\(")):
        runs._check_choices(cfg, with_train=True)
        data.training_sets(task.train, cfg.VAL_LIMIT, cfg.TRAIN_REVIEWS, cfg.SEED)


def test_validation_run_keeps_the_best_epoch(tiny, tmp_path):
    rates = [0.1, 0.1, 0.1]
    args = [*overrides(tiny, tmp_path), *TINY_RUN, f"--rate_by_epoch={rates}", "--val_limit=10", "--keep_best=True"]
    result = run_script("experiment.py", *args)
    assert result.returncode == 0, result.stderr
    (run_id,) = [d for d in os.listdir(tmp_path / "results") if d.endswith("experiment")]
    run = tmp_path / "results" / run_id
    validation = pd.read_csv(run / "validation.csv")
    assert validation["epoch"].tolist() == [1, 2, 3] and (validation["total"] == 10).all()
    for row in validation.itertuples():
        assert f"epoch {row.epoch}, step {3 * row.epoch} validation: score {100 * row.score:.1f}% ±" in result.stdout
        assert row.score_low <= row.score <= row.score_high
        assert row.restricted_low <= row.restricted_score <= row.restricted_high
    best = validation.sort_values(["correct", "restricted_correct", "epoch"], ascending=[False, False, True]).iloc[0]
    best = {k: int(best[k]) for k in ("epoch", "correct", "restricted_correct")}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best_epoch"] == best["epoch"] and metrics["samples"] == 30 and metrics["total"] == 20
    assert metrics["best_epoch"] < 3, "this schedule no longer makes an earlier epoch best: pick one that does"
    assert (f"keeping the primer of epoch {best['epoch']}, step {3 * best['epoch']}, the best on the validation"
            in result.stdout)

    # the saved and scored primer is the best epoch's: a run cut to that many epochs ends with it, bitwise
    saved = load_file(str(run / "primer.safetensors"))["primer"]
    last = torch.load(run / "checkpoint.pt", weights_only=True)["params"]["primer"]
    assert not torch.equal(saved, last)
    cut = cli.configure([*args, f"--rate_by_epoch={rates[:metrics['best_epoch']]}", "--keep_best=False"])
    cut_task = runs.setup(cut)
    layout = layouts.make_layout(cut_task, None, primer_length=4)
    primer = primers.initial_primer(cut_task, cut.PRIMER_INIT, cut.PRIMER_LENGTH, cut.SEED)
    os.makedirs(tmp_path / "cut")
    experiment.train_primer(cut_task, layout, primer, str(tmp_path / "cut"))
    assert torch.equal(primer.detach(), saved)
    on_val = scoring.score(cut_task, layout, primer, cut_task.val)
    assert (on_val["correct"], on_val["restricted_correct"]) == (best["correct"], best["restricted_correct"])

    row = pd.read_csv(tmp_path / "results" / "results.csv").iloc[0]
    assert row["best_epoch"] == best["epoch"] and (row["method"], row["samples"]) == ("primer", 30)
    assert row["score_low"] <= row["score"] <= row["score_high"]
    assert row["restricted_low"] <= row["restricted_score"] <= row["restricted_high"]
    assert f"| {ledger.format_score(metrics, 'score')} | {metrics['correct']} / 20 |" in result.stdout


@pytest.mark.parametrize("script, more, saved", [
    ("experiment", [], ("primer.safetensors", "primer", "primer")),
    ("steer", ["--vector=learned", "--learned_layer=2"], ("steering.safetensors", "vector", "vector")),
])
def test_a_rate_grid_keeps_the_schedule_best_on_validation(tiny, tmp_path, monkeypatch, script, more, saved):
    module = {"experiment": experiment, "steer": steer}[script]
    args = [*overrides(tiny, tmp_path), *TINY_RUN, "--val_limit=10", "--rate_grid=[[1e-6], [0.5, 0.5]]", *more]
    module.run(cli.configure(args, getattr(module, "SETTINGS", None)))
    (run,) = glob.glob(f"{tmp_path}/results/*-{script}")
    grid = pd.read_csv(f"{run}/rate_grid.csv")
    assert list(grid["rates"]) == ["[1e-06]", "[0.5, 0.5]"] and grid["chosen"].sum() == 1
    for i, schedule in grid.iterrows():  # each schedule's best epoch, from its own validation file
        validation = pd.read_csv(f"{run}/rates_{i}/validation.csv")
        assert (len(validation) == len(eval(schedule["rates"]))
                and schedule["val_correct"] == validation["correct"].max())
    chosen = int(grid.index[grid["chosen"]][0])
    assert grid["val_correct"][chosen] == grid["val_correct"].max()
    file, key, param = saved
    trained = torch.load(f"{run}/rates_{chosen}/checkpoint.pt", weights_only=True)["params"][param]
    assert torch.equal(load_file(f"{run}/{file}")[key].flatten(), trained.flatten())
    start, moved = (torch.load(f"{run}/rates_{i}/checkpoint.pt", weights_only=True)["params"][param] for i in (0, 1))
    assert (moved - start).abs().max() > 100 * 1e-6 and os.path.getsize(f"{tmp_path}/results/rate_grid.png") > 0
    (row,) = ledger.rows(f"{tmp_path}/results")
    assert row["train_seconds"] >= grid["train_seconds"].sum() - 0.1  # the ledger keeps tenths of a second
    # the chosen schedule run alone trains the same tensors, so table.py pools the two as one configuration
    module.run(cli.configure([*args, "--rate_grid=[]", f"--rate_by_epoch={grid['rates'][chosen]}"],
                             getattr(module, "SETTINGS", None)))
    (plain,) = set(glob.glob(f"{tmp_path}/results/*-{script}*")) - {run}  # one started in the same second ends in -2
    assert torch.equal(load_file(f"{plain}/{file}")[key], load_file(f"{run}/{file}")[key])
    runs_read = table.load_runs(f"{tmp_path}/results")
    (pooled,) = table.summarize(runs_read).itertuples()
    assert pooled.seeds == 1 and pooled.run_ids == os.path.basename(plain)  # one seed trained twice: its latest run
    assert runs_read.set_index("run_id")["train_seconds"][os.path.basename(run)] == grid["train_seconds"][chosen]
    # a grid on fewer reviews chooses its own rate; the data curve joins the two sizes whatever each chose
    module.run(cli.configure([*args, "--train_limit=30", "--rate_grid=[[0.3, 0.3]]"],
                             getattr(module, "SETTINGS", None)))
    figures = []
    monkeypatch.setattr(table.plots, "save", lambda fig, path: figures.append(fig) or path)
    plots.table_data(table.summarize(table.load_runs(f"{tmp_path}/results")), "unused.png")
    (bars,) = figures[0].axes[0].containers
    first = ",".join(f"{rate:g}" for rate in eval(grid["rates"][chosen]))
    assert list(bars.lines[0].get_xdata()) == [20, 30]
    assert bars.get_label().endswith(f", rate chosen at each size (20: 0.3,0.3; 30: {first})")  # each size's own rate
    rategrid.draw(f"{tmp_path}/results")  # every grid of the folder, one panel per training size
    assert [ax.get_title() for ax in figures[1].axes] == ["20 training reviews", "30 training reviews"]
    assert (grid["train_reviews"] == 30).all()
