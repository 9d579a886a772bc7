import json
import os

import pandas as pd
from safetensors.torch import load_file

from conftest import overrides, run_script


def test_experiment_rescoring_and_text_prompts_through_the_command_lines(tiny, tmp_path):
    args = overrides(tiny, tmp_path)
    trained = run_script("experiment.py", *args)  # no prep first: the data is prepared on the way
    assert trained.returncode == 0, trained.stderr
    assert "| Run | Samples | Tokens | Position | LR Schedule | Score | Correct / Total | Label-restricted |" in trained.stdout
    assert "epoch 3/3" in trained.stderr and "samples_s=" in trained.stderr  # progress bars
    assert any(line.startswith("batch_size ") for line in trained.stdout.splitlines())  # the effective config

    results = tmp_path / "results"
    (run_id,) = [d for d in os.listdir(results) if d.endswith("experiment")]
    run = results / run_id
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "config.json", "loss.png", "losses.csv", "metrics.json", "primer.safetensors"]
    config = json.loads((run / "config.json").read_text())
    assert config["batch_size"] == 10 and config["model_id"] == tiny.model_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["total"] == 60 and metrics["samples"] == 100 and metrics["tokens"] == 4
    assert metrics["label_answer_share"] > 0.9
    assert load_file(str(run / "primer.safetensors"))["primer"].shape == (4, 64)
    losses = pd.read_csv(run / "losses.csv")
    assert len(losses) == 30 and losses["epoch"].max() == 3

    rescored = run_script("experiment.py", *args, f"--primer_path={run}/primer.safetensors")
    assert rescored.returncode == 0, rescored.stderr
    assert "epoch" not in rescored.stderr  # no training
    for script in ("prompt_long.py", "prompt_short.py"):
        result = run_script(script, *args)
        assert result.returncode == 0, result.stderr

    ledger = pd.read_csv(results / "results.csv")
    assert ledger["script"].tolist() == ["experiment", "experiment", "prompt_long", "prompt_short"]
    assert ledger.loc[1, "correct"] == metrics["correct"] and ledger.loc[1, "restricted_correct"] == metrics["restricted_correct"]
    assert ledger.loc[0, "run_id"] == run_id and (ledger["total"] == 60).all()
    assert ledger.loc[2, "tokens"] > ledger.loc[3, "tokens"] > 4  # the long prompt is longer than the short one
    assert len(os.listdir(results)) == 5  # four run folders and the ledger
