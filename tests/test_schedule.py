"""The Schedule a run trains under: warmup and cosine decay, validation steps, and the config it is built from."""
import math

import pytest

from harness import cli, errors
from harness.schedule import FLOOR, Schedule


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


def test_the_config_becomes_a_schedule_and_the_reference_keeps_its_own():
    cfg = cli.configure(["--rate=0.02", "--epochs=7", "--rate_by_epoch=[]", "--patience=2", "--clip_norm=0.5"])
    schedule = Schedule.of(cfg, unit=2.0)
    assert ((schedule.rate, schedule.epochs, schedule.patience, schedule.clip, schedule.decay)
            == (0.04, 7, 2, 0.5, "cosine"))
    reference = Schedule.of(cli.configure(["--rate_by_epoch=[1e-4, 1e-5]", "--patience=2"]), unit=1.0)
    assert (reference.rate_by_epoch, reference.clip, reference.patience) == ((1e-4, 1e-5), 0.0, 0)
    assert schedule.at(0.5, unit=2.0).rate == 1.0 and schedule.at([0.5, 0.25], 2.0).rate_by_epoch == (1.0, 0.5)
    with pytest.raises(errors.UserError, match="--decay='linear' is not one of cosine, constant"):
        Schedule.of(cli.configure(["--decay=linear"]))
