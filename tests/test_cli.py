import json
import os

import pandas as pd
import pytest
from safetensors.torch import load_file

import compare
import experiment
import prompt_short
from conftest import overrides, run_script
from harness import cli, errors, plots, runs


def test_experiment_rescoring_and_text_prompts_through_the_command_lines(tiny, tmp_path, capsys):
    args = overrides(tiny, tmp_path)
    trained = run_script("experiment.py", *args, "--threads=1")  # no prep first: the data is prepared on the way
    assert trained.returncode == 0, trained.stderr
    assert f"\nthreads: 1 of {os.cpu_count()} cores (--threads)\n" in trained.stdout  # in the run's header
    assert ("| Run | Method | Train reviews | Params | Tokens | Score | Correct / Total | Label-restricted "
            "| Best epoch | Status |" in trained.stdout)
    assert "epoch 3/3" in trained.stderr and "lr=" in trained.stderr and "samples_s=" in trained.stderr  # progress bars
    assert trained.stderr.count("\r") <= 2 * trained.stderr.count("\n")  # in a log: each bar's start and end, no more
    assert any(line.startswith("batch_size ") for line in trained.stdout.splitlines())  # the effective config

    results = tmp_path / "results"
    (run_id,) = [d for d in os.listdir(results) if d.endswith("experiment")]
    run = results / run_id
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "config.json", "environment.json", "loss.png", "losses.csv",
                                       "metrics.json", "predictions.safetensors", "primer.safetensors"]
    config = json.loads((run / "config.json").read_text())
    assert config["batch_size"] == 10 and config["model_id"] == tiny.model_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["total"] == 60 and metrics["samples"] == 100 and metrics["tokens"] == 4
    assert metrics["label_answer_share"] > 0.9
    assert load_file(str(run / "primer.safetensors"))["primer"].shape == (4, 64)
    losses = pd.read_csv(run / "losses.csv")
    assert len(losses) == 30 and losses["epoch"].max() == 3

    experiment.run(cli.configure([*args, f"--primer_path={run}/primer.safetensors"]))  # the rest as the scripts run it
    assert "epoch" not in capsys.readouterr().err  # no training
    assert run_script("prompt_long.py", *args).returncode == 0
    runs.score_text_prompt(cli.configure(args), "prompt_short", prompt_short.SYSTEM, prompt_short.USER)

    ledger = pd.read_csv(results / "results.csv")
    assert ledger["script"].tolist() == ["experiment", "experiment", "prompt_long", "prompt_short"]
    assert (ledger.loc[1, "correct"] == metrics["correct"]
            and ledger.loc[1, "restricted_correct"] == metrics["restricted_correct"])
    assert ledger.loc[0, "run_id"] == run_id and (ledger["total"] == 60).all()
    assert ledger.loc[2, "tokens"] > ledger.loc[3, "tokens"] > 4  # the long prompt is longer than the short one
    assert len(os.listdir(results)) == 6  # four run folders, the ledger and its lock
    assert ledger["method"].tolist() == ["primer", "saved primer", "text prompt", "text prompt"]
    assert ledger["trainable_params"].tolist() == [4 * 64, 4 * 64, 0, 0]
    assert ((ledger["status"] == "finished").all() and ledger.loc[0, "train_seconds"] > 0
            and (ledger["score_seconds"] >= 0).all())
    assert ledger.loc[1, "train_seconds"] == 0 and ledger["seed"].dtype == int

    with pytest.raises(errors.UserError,
                       match=f"^{run} has finished: its scores are in {run}/metrics.json and its row in the ledger$"):
        experiment.run(cli.configure([f"--resume={run}"]))
    assert len(pd.read_csv(results / "results.csv")) == 4

    environment = json.loads((run / "environment.json").read_text())
    assert environment["device"] == "cpu" and environment["dtype"] == "float32" and len(environment["git_commit"]) == 40
    assert environment["threads"] == 1 and f"saved {run}/loss.png (the training loss)\n" in trained.stdout
    predictions = load_file(str(run / "predictions.safetensors"))
    strict = predictions["answer"] == predictions["label_ids"][predictions["label"]]
    restricted = predictions["logprobs"].argmax(-1) == predictions["label"]
    assert (int(strict.sum()), int(restricted.sum())) == (metrics["correct"], metrics["restricted_correct"])
    assert predictions["label"].sum() == 30 and (predictions["logprobs"] <= 0).all()
    text_run = results / ledger.loc[2, "run_id"]
    compared = run_script("compare.py", str(run), str(text_run))
    assert compared.returncode == 0, compared.stderr
    other = load_file(str(text_run / "predictions.safetensors"))
    other_restricted = other["logprobs"].argmax(-1) == other["label"]
    only_a, only_b = int((restricted & ~other_restricted).sum()), int((other_restricted & ~restricted).sum())
    assert (f"| label-restricted | {100 * metrics['restricted_score']:.1f}% ({metrics['restricted_correct']}) "
            f"| {100 * ledger.loc[2, 'restricted_score']:.1f}% ({ledger.loc[2, 'restricted_correct']}) "
            f"| {only_a} | {only_b} | ") in compared.stdout
    with pytest.raises(errors.UserError,
                       match=f"^{tmp_path} has no predictions.safetensors: give the folder of a finished run$"):
        compare.compare(str(run), str(tmp_path))
    (figure,) = plots.description(str(run / "loss.png"))["axes"]
    assert figure["title"].startswith(f"Training loss: primer, 4 tokens on {plots.model_name(tiny.model_dir)}\n"
                                      f"rates by epoch [0.1, 0.1, 0.1]; run {run_id}")


def test_compare_needs_two_run_folders():
    result = run_script("compare.py", "results/one")
    assert result.returncode == 1 and result.stderr.strip() == ("error: give two run folders: "
                                                                "python compare.py results/<run A> results/<run B>")

