"""A small primer run's result, pinned from the code before the harness was split: refactors must not move it."""
import json

import pytest
from safetensors.torch import load_file

import experiment
from conftest import overrides
from harness import cli

RUN = ["--train_limit=40", "--test_limit=20", "--val_limit=10", "--keep_best=True", "--rate_by_epoch=[0.1, 0.05]"]
# from commit 889246d on a 2-core x86-64 CPU, float32; bitwise there, compared to 1e-5 so another CPU's rounding passes
PINNED = {"sum": 1.5616769145708531, "abs_sum": 66.66170649114065, "first": -0.2619313597679138, "second": -0.45817941427230835,
          "correct": 0, "restricted_correct": 12, "best_epoch": 2}


def test_small_primer_run_gives_the_pinned_result(tiny, tmp_path):
    experiment.run(cli.configure([*overrides(tiny, tmp_path), *RUN]))  # what python experiment.py runs
    (run,) = (tmp_path / "results").glob("*-experiment")
    primer = load_file(str(run / "primer.safetensors"))["primer"].double()
    metrics = json.loads((run / "metrics.json").read_text())
    got = {"sum": float(primer.sum()), "abs_sum": float(primer.abs().sum()), "first": float(primer[0, 0]), "second": float(primer[0, 1]),
           "correct": metrics["correct"], "restricted_correct": metrics["restricted_correct"], "best_epoch": metrics["best_epoch"]}
    assert got == pytest.approx(PINNED, rel=1e-5, abs=1e-6)
