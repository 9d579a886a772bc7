"""The training loop's Schedule: warmup and cosine decay, clipping, validation every N steps, early stopping with
keep-best, a pause that resumes bitwise; and the rate grid that widens past its edge and halves its candidates."""
import math

import pandas as pd
import pytest
import torch

from harness import cli, errors, layouts, primers, rategrid, runs, scoring, training
from harness.schedule import FLOOR, Schedule


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    from conftest import overrides
    return runs.setup(cli.configure(overrides(tiny, tmp_path_factory.mktemp("training")) + ["--val_limit=20"]))


def primer_run(task, schedule: Schedule, run_dir, until=None) -> tuple[torch.Tensor, list[dict], str]:
    """A 4-token primer trained from the same start under `schedule`, validated; the primer, its log and status."""
    layout = layouts.make_layout(task, None, primer_length=4)
    primer = primers.init_primer(task.model, 4, seed=0)
    evaluate = lambda: scoring.score(task, layout, primer, task.val)
    run_dir.mkdir(exist_ok=True)
    log, status = training.train(task, {"primer": primer}, primers.loss_of(task, layout, primer), str(run_dir),
                                 schedule, evaluate, until=until)
    return primer.detach(), log, status


def test_the_rate_warms_up_then_decays_by_a_cosine_to_a_tenth():
    schedule = Schedule(rate=1.0, epochs=4, warmup=0.25, decay="cosine")
    rates = schedule.rates(per_epoch=10)
    assert len(rates) == 40
    assert rates[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # linear to the peak over a quarter
    assert rates[10] == pytest.approx(1.0) and rates[-1] == pytest.approx(FLOOR)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))  # never rises after the warmup
    assert rates[25] == pytest.approx(FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * 15 / 29)))
    assert set(Schedule(rate=0.3, epochs=2).rates(10)) == {0.3}  # "constant", no warmup
    reference = Schedule(rate=9.0, rate_by_epoch=(0.1, 0.01), warmup=0.5, decay="cosine")  # its rates win
    assert reference.rates(5) == [0.1] * 5 + [0.01] * 5 and reference.total_steps(5) == 10


def test_validation_comes_every_n_steps_each_epoch_end_or_the_budgets_end():
    every = Schedule(rate=1.0, epochs=3, eval_every=4)
    assert every.validation_steps(per_epoch=10) == [4, 8, 12, 16, 20, 24, 28, 30]
    assert Schedule(rate=1.0, epochs=3).validation_steps(10) == [10, 20, 30]
    assert Schedule(rate=1.0, epochs=2, eval_every=7).validation_steps(10) == [7, 14, 20]


def test_the_config_becomes_a_schedule_and_the_reference_keeps_its_own(task):
    cfg = cli.configure(["--rate=0.02", "--epochs=7", "--rate_by_epoch=[]", "--patience=2", "--clip_norm=0.5"])
    schedule = Schedule.of(cfg, unit=2.0)
    assert ((schedule.rate, schedule.epochs, schedule.patience, schedule.clip, schedule.decay)
            == (0.04, 7, 2, 0.5, "cosine"))
    reference = Schedule.of(cli.configure(["--rate_by_epoch=[1e-4, 1e-5]", "--patience=2"]), unit=1.0)
    assert (reference.rate_by_epoch, reference.clip, reference.patience) == ((1e-4, 1e-5), 0.0, 0)
    assert schedule.at(0.5, unit=2.0).rate == 1.0 and schedule.at([0.5, 0.25], 2.0).rate_by_epoch == (1.0, 0.5)
    with pytest.raises(errors.UserError, match="--decay='linear' is not one of cosine, constant"):
        Schedule.of(cli.configure(["--decay=linear"]))


def test_clipping_bounds_the_gradient_adam_steps_on(task):
    layout = layouts.make_layout(task, None, primer_length=4)
    norms = []
    for clip in (0.0, 1e-3):
        primer = primers.init_primer(task.model, 4, seed=0).requires_grad_(True)
        optimizer = torch.optim.Adam([primer], lr=0.1)
        training.train_step([primer], optimizer, primers.loss_of(task, layout, primer), torch.arange(10), clip)
        norms.append(float(primer.grad.norm()))
    assert norms[0] > 1e-2 and norms[1] == pytest.approx(1e-3, rel=1e-4)


def test_a_run_stops_when_validation_stops_improving_and_keeps_its_best(task, tmp_path):
    # a rate of 0 never changes the primer, so validation never beats its first score
    schedule = Schedule(rate=0.0, epochs=20, patience=2, keep_best=True, batch_size=10, eval_every=3)
    primer, log, status = primer_run(task, schedule, tmp_path)
    validation = pd.read_csv(tmp_path / "validation.csv")
    assert status == "finished" and len(log) == 9 and validation["step"].tolist() == [3, 6, 9]
    assert torch.equal(primer, primers.init_primer(task.model, 4, seed=0))


def test_a_pause_goes_on_bitwise_to_what_a_straight_run_gives(task, tmp_path):
    schedule = Schedule(rate=0.1, epochs=3, warmup=0.2, decay="cosine", clip=1.0, keep_best=True, batch_size=10)
    straight, straight_log, _ = primer_run(task, schedule, tmp_path / "straight")
    _, _, paused = primer_run(task, schedule, tmp_path / "paused", until=4)
    assert paused == "paused" and pd.read_csv(tmp_path / "paused" / "validation.csv")["step"].tolist() == [4]
    resumed, log, status = primer_run(task, schedule, tmp_path / "paused")
    assert status == "finished" and torch.equal(resumed, straight)
    assert [r["loss"] for r in log] == [r["loss"] for r in straight_log]


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
