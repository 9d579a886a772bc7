"""A rate chosen on validation: the grid widens past its edge, halves its candidates, and keeps the best."""
import glob
import math
import os

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import experiment
import steer
import table
from conftest import TINY_RUN, overrides
from harness import cli, errors, files, layouts, ledger, plots, primers, rategrid, runs, scoring, tableplots
from harness.schedule import Schedule


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    return runs.setup(cli.configure(overrides(tiny, tmp_path_factory.mktemp("rategrid")) + ["--val_limit=20"]))


def point(correct: int) -> dict:
    return {"best": {"correct": correct, "restricted_correct": 0}}


def test_a_grid_widens_past_the_edge_its_best_sits_on():
    points = {1.0: point(5), 0.1: point(3), 0.01: point(1)}
    trained = []

    def train(rate):  # the new rate does better still, then worse: the grid stops once its best is inside
        trained.append(rate)
        points[rate] = point(9 if len(trained) == 1 else 2)
    added = rategrid.widened([1.0, 0.1, 0.01], points, [1.0, 0.1], train)
    assert added == trained == [10.0, 100.0]
    inside = {1.0: point(1), 0.1: point(5), 0.01: point(1)}
    assert rategrid.widened([1.0, 0.1, 0.01], inside, [1.0, 0.1, 0.01], train) == []
    lists = {(1.0,): point(5), (0.1,): point(1)}  # the reference's per-epoch schedules are never widened
    assert rategrid.widened([(1.0,), (0.1,)], lists, [(1.0,)], train) == []
    # a best still at the edge once the grid may widen no more is said, one inside is not
    assert "warning: rate 100.0 is still the edge of every rate tried (0.01 ... 100.0)" in rategrid.at_edge(points,
                                                                                                          100.0)
    assert rategrid.at_edge(points, 10.0) == rategrid.at_edge(lists, (1.0,)) == ""


def test_a_grid_of_peak_rates_halves_its_candidates_and_trains_the_chosen_one_whole(task, tmp_path):
    schedule = Schedule(rate=0.1, epochs=4, keep_best=True, batch_size=10)
    layout = layouts.make_layout(task, None, primer_length=4)
    primer = primers.init_primer(task.model, 4, seed=0)
    evaluate = lambda: scoring.score(task, layout, primer, task.val)
    run_dir = tmp_path / "grid"
    run_dir.mkdir()
    rategrid.train_grid(task, {"primer": primer}, primers.loss_of(task, layout, primer), str(run_dir), schedule,
                        [0.3, 0.1, 0.03, 0.01], evaluate, "primer", "experiment.py")
    grid = pd.read_csv(run_dir / "rate_grid.csv")
    assert len(grid) >= 4 and grid["chosen"].sum() == 1
    chosen = grid[grid["chosen"]].iloc[0]
    assert chosen["status"] == "finished" and (grid["status"] == "paused").sum() >= len(grid) // 2
    budget = 4 * math.ceil(len(task.train) / 10)
    assert grid["steps"].max() == budget and grid["steps"].min() == budget // 4  # a quarter for the worst
    assert sorted(grid["first_rate"])[0] < chosen["first_rate"] < sorted(grid["first_rate"])[-1]  # bracketed
    logs = [pd.read_csv(f) for f in sorted(run_dir.glob("rates_*/losses.csv"))]  # every candidate's, kept with the run
    assert len(logs) == len(grid) and sum(map(len, logs)) == grid["steps"].sum()
    config = {"rate_grid": [0.3, 0.1, 0.03, 0.01], "rate": 0.1}  # the grid is the method: each seed chooses its rate
    assert rategrid.as_chosen(str(run_dir), config) == (config, chosen["train_seconds"])


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
    # its cost: every schedule's CPU seconds and the scoring's, as this process counted them
    score_cpu = files.read_json(f"{run}/metrics.json")["score_cpu_seconds"]
    assert (grid["cpu_seconds"] > 0).all()
    cost = runs_read.set_index("run_id")["core_seconds"][os.path.basename(run)]
    assert cost == pytest.approx(grid["cpu_seconds"].sum() + score_cpu)
    # a grid on fewer reviews chooses its own rate; the data curve joins the two sizes whatever each chose
    module.run(cli.configure([*args, "--train_limit=30", "--rate_grid=[[0.3, 0.3]]"],
                             getattr(module, "SETTINGS", None)))
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or path)
    tableplots.table_data(table.summarize(table.load_runs(f"{tmp_path}/results")), "unused.png")
    (bars,) = figures[0].axes[0].containers
    first = ",".join(f"{rate:g}" for rate in eval(grid["rates"][chosen]))
    assert list(bars.lines[0].get_xdata()) == [20, 30]
    assert bars.get_label().endswith(f", rate chosen at each size (20: 0.3,0.3; 30: {first})")  # each size's own rate
    rategrid.draw(f"{tmp_path}/results")  # every grid of the folder, one panel per training size
    assert [ax.get_title() for ax in figures[1].axes] == ["20 training reviews", "30 training reviews"]
    assert (grid["train_reviews"] == 30).all()


def test_a_rate_chosen_at_one_seed_is_kept_at_another_only_where_it_holds(tiny, tmp_path, capsys):
    args = [*overrides(tiny, tmp_path), *TINY_RUN, "--val_limit=10", "--rate_grid=[0.3, 0.1, 0.03]",
            "--rate_by_epoch=[]", "--epochs=2"]
    experiment.run(cli.configure(args))
    (source,) = glob.glob(f"{tmp_path}/results/*-experiment")
    chosen = pd.read_csv(f"{source}/rate_grid.csv").query("chosen").iloc[0]
    budget = 2 * math.ceil(30 / 10)
    for seed, holds in ((1, 1.0), (2, -1.0)):  # a bar of 0% is always reached, one above 100% never
        experiment.run(cli.configure([*args, f"--seed={seed}", f"--rate_from={source}", f"--rate_holds={holds}",
                                      f"--results_dir={tmp_path}/seed{seed}"]))
        (run,) = glob.glob(f"{tmp_path}/seed{seed}/*-experiment")
        grid = pd.read_csv(f"{run}/rate_grid.csv")
        first = grid.iloc[[list(grid["first_rate"]).index(chosen["first_rate"])]]  # the rate taken, trained whole
        assert list(grid["rate_from"].fillna("")) == ["" if rate != chosen["first_rate"] else os.path.basename(source)
                                                      for rate in grid["first_rate"]]  # the rate taken names its run
        assert int(first["steps"].iloc[0]) == budget
        assert grid["first_rate"].is_unique  # a rate that does not hold is not trained twice
        assert len(grid) == 1 if holds > 0 else len(grid) >= 3 and bool(grid["chosen"].any())
        assert os.path.exists(f"{run}/rates_0/losses.csv")
    out = capsys.readouterr().out
    assert f"of {os.path.basename(source)} holds here" in out and "does not hold here" in out
    for more, error in ((["--primer_length=2"], "ran with other primer_length: give a run that differs from this one"),
                        (["--rate_grid=[]"], "needs --rate_grid too"),
                        ([f"--rate_from={tmp_path}"], "is no finished rate-grid run")):
        with pytest.raises(errors.UserError, match=error):
            experiment.run(cli.configure([*args, "--seed=1", f"--rate_from={source}", *more]))
