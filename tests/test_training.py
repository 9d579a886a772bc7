"""The training loop: clipping, early stopping with keep-best, a pause that resumes bitwise, a non-finite loss
undone, and validation that keeps the best epoch."""
import json
import os

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import experiment
from conftest import TINY_RUN, overrides, run_script
from harness import cli, layouts, ledger, primers, rundir, runs, scoring, training
from harness.schedule import Schedule


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


def test_non_finite_loss_stops_training_and_keeps_the_last_good_primer(tiny, tmp_path, capsys):
    from conftest import overrides
    # float16 activations overflow once one Adam step of this size has moved the primer
    cfg = cli.configure(overrides(tiny, tmp_path) + ["--dtype=float16", "--rate_by_epoch=[1e5]"])
    task = runs.setup(cfg)
    layout = layouts.make_layout(task, None, primer_length=4)
    primer = primers.init_primer(task.model, 4, seed=0)
    start = primer.clone()
    log, status, _ = experiment.train_primer(task, layout, primer, str(tmp_path))
    assert len(log) == 1 and torch.isfinite(torch.tensor(log[0]["loss"]))
    assert torch.equal(primer, start)  # the only primer whose loss was finite
    assert "training stopped at epoch 1, batch 1: loss nan; keeping the last good primer" in capsys.readouterr().out
    assert status == "stopped early at epoch 1, batch 1: non-finite loss nan"
    run_dir = rundir.new(cfg, "experiment")
    runs.record(task, "experiment", "primer", 4, scoring.predict(task, layout, primer), run_dir, log, primer.numel(),
                status)
    (row,) = ledger.rows(cfg.RESULTS_DIR)
    assert row["status"] == status and json.load(open(f"{run_dir}/metrics.json"))["status"] == status
    assert f"| {status} |" in capsys.readouterr().out


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
