"""Interrupted training resumes to exactly the primer, validation log and scores of an uninterrupted run (CPU, same
seed)."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, overrides, run_script
from harness import errors, rundir

SLOW = ["--batch_size=4", "--checkpoint_every=5", "--rate_by_epoch=[0.1, 0.1, 0.1, 0.1]"]  # 80 steps
VALIDATED = ["--val_limit=20", "--keep_best=True"]  # 20 of the 100 reviews scored after each epoch, the best kept


def interrupt(args: list[str], results: str, sig: int, after: str) -> subprocess.CompletedProcess:
    """Start a training run, send sig as soon as the run folder holds the file `after`, and wait for it to end."""
    proc = subprocess.Popen([sys.executable, "experiment.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    while not glob.glob(f"{results}/*/{after}") and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def finished_run(results: str) -> tuple[torch.Tensor, torch.Tensor, dict, str]:
    """The saved (best) primer, the last epoch's primer, the metrics and the validation log of a finished run."""
    (run,) = glob.glob(f"{results}/*-experiment")
    last = torch.load(f"{run}/checkpoint.pt", weights_only=True)["params"]["primer"]
    return (load_file(f"{run}/primer.safetensors")["primer"], last, json.load(open(f"{run}/metrics.json")),
            open(f"{run}/validation.csv").read())


def test_killed_and_interrupted_runs_resume_bitwise(tiny, tmp_path):
    base = overrides(tiny, tmp_path)  # one data dir; each run its own results dir
    runs = {}
    for name in ("straight", "killed", "ctrl_c"):
        runs[name] = str(tmp_path / name)
        args = [*base, *SLOW, *VALIDATED, f"--results_dir={runs[name]}"]
        if name == "straight":  # as python experiment.py runs it, in this process
            import experiment
            from harness import cli
            experiment.run(cli.configure(args))
            continue
        # killed once the first epoch's validation is logged, so the resumed run must carry it on from the checkpoint
        how = (signal.SIGKILL, "validation.csv") if name == "killed" else (signal.SIGINT, "checkpoint.pt")
        stopped = interrupt(args, runs[name], *how)
        assert stopped.returncode != 0, "the run ended before it could be interrupted"
        (run,) = glob.glob(f"{runs[name]}/*-experiment")
        state = torch.load(f"{run}/checkpoint.pt", weights_only=True)
        assert (state["epoch"], state["batch"]) < (4, 0) and not os.path.exists(f"{run}/metrics.json")
        if name == "ctrl_c":
            assert "Traceback" not in stopped.stderr
            assert stopped.stderr.strip().splitlines()[-1] == ("error: interrupted; checkpoint saved: resume with "
                                                               f"python experiment.py --resume={run}")
        resumed = run_script("experiment.py", f"--resume={run}")
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming {run} at epoch" in resumed.stdout
    primer, last, metrics, validation = finished_run(runs["straight"])
    assert len(validation.splitlines()) == 5  # a header and one row per epoch
    for name in ("killed", "ctrl_c"):
        other_primer, other_last, other_metrics, other_validation = finished_run(runs[name])
        assert torch.equal(other_primer, primer) and torch.equal(other_last, last), name
        assert other_validation == validation, name
        keys = ("correct", "restricted_correct", "total", "best_epoch")
        assert {k: other_metrics[k] for k in keys} == {k: metrics[k] for k in keys}
        # the loss log's clocks go on from the checkpoint's: a resumed run's cost counts its earlier session
        (losses,) = (pd.read_csv(path) for path in glob.glob(f"{runs[name]}/*-experiment/losses.csv"))
        for clock in ("seconds", "cpu_seconds"):
            assert losses[clock].notna().all() and losses[clock].is_monotonic_increasing, (name, clock)


def test_ctrl_c_while_validating_stops_and_resumes_to_the_same_primer(tiny, tmp_path, monkeypatch):
    import experiment
    from harness import cli, layouts, primers, runs, training
    cfg = cli.configure(overrides(tiny, tmp_path) + ["--train_limit=40", "--val_limit=10",
                                                     "--rate_by_epoch=[0.1, 0.1]"])
    task = runs.setup(cfg)
    layout = layouts.make_layout(task, None, primer_length=4)
    straight = primers.initial_primer(task, cfg.PRIMER_INIT, 4, cfg.SEED)
    os.makedirs(tmp_path / "straight")
    experiment.train_primer(task, layout, straight, str(tmp_path / "straight"))

    validate = training.validate
    def ctrl_c_in_second_epoch(task, params, evaluate, progress, run_dir):
        if progress.epoch == 1:
            raise KeyboardInterrupt
        validate(task, params, evaluate, progress, run_dir)
    monkeypatch.setattr(training, "validate", ctrl_c_in_second_epoch)
    run = str(tmp_path / "stopped")
    os.makedirs(run)
    primer = primers.initial_primer(task, cfg.PRIMER_INIT, 4, cfg.SEED)
    with pytest.raises(training.Interrupted, match=f"resume with python experiment.py --resume={run}"):
        experiment.train_primer(task, layout, primer, run)
    state = torch.load(f"{run}/checkpoint.pt", weights_only=True)
    # stopped before the second validation
    assert (state["epoch"], state["batch"], len(state["validation"]["rows"])) == (1, 3, 1)
    monkeypatch.setattr(training, "validate", validate)
    primer = primers.initial_primer(task, cfg.PRIMER_INIT, 4, cfg.SEED)
    log, status, _ = experiment.train_primer(task, layout, primer, run)
    assert status == "finished" and torch.equal(primer.detach(), straight.detach())
    assert len(open(f"{run}/validation.csv").read().splitlines()) == 3  # a header and both epochs


def test_resume_takes_only_overrides_that_cannot_change_the_result(tiny, tmp_path, monkeypatch, capsys):
    from harness import cli
    run = rundir.new(cli.configure(overrides(tiny, tmp_path) + ["--score_batch_size=64"]), "experiment")
    monkeypatch.setattr("sys.argv", ["experiment.py", f"--resume={run}", "--score_batch_size=8",
                                     "--checkpoint_every=7"])
    resumed = []
    cli.main(resumed.append)
    (cfg,) = resumed
    assert (cfg.SCORE_BATCH_SIZE, cfg.CHECKPOINT_EVERY, cfg.BATCH_SIZE, cfg.RESUME) == (8, 7, 10, run)
    printed = capsys.readouterr().out
    assert "score_batch_size       = 8" in printed and "batch_size             = 10" in printed
    with pytest.raises(errors.UserError, match=r"a resumed run keeps its config: --batch_size, --seed cannot change on "
                                               r"--resume \(only --checkpoint_every, --data_dir, --device, "
                                               r"--gradient_checkpointing, --results_dir, --score_batch_size, "
                                               r"--threads can\); start a new run instead"):
        cli.configure([f"--resume={run}", "--seed=1", "--batch_size=3", "--device=cpu"])
