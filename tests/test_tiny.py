"""The README's quick start on tiny.py's model: the commands a new user runs to check an install, as written."""
import os
import shlex

import pandas as pd

import tiny
from conftest import ROOT, run_script


def test_quick_start_runs_as_the_readme_gives_it(tmp_path):
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "\npython tiny.py\n" in readme and f"\n{tiny.EXPERIMENT}\n" in readme  # the commands below are the README's
    built = run_script("tiny.py", cwd=str(tmp_path))  # from a fresh folder, as in a new checkout
    assert built.returncode == 0, built.stderr
    assert built.stdout.strip().splitlines()[-1] == tiny.EXPERIMENT
    trained = run_script(*shlex.split(tiny.EXPERIMENT)[1:], cwd=str(tmp_path))
    assert trained.returncode == 0, trained.stderr
    assert "-experiment | primer | 120 | 256 | 4 |" in trained.stdout
    ledger = pd.read_csv(tmp_path / tiny.TINY_DIR / "results" / "results.csv")
    assert ledger["total"].tolist() == [60] and ledger["label_answer_share"][0] > 0.9  # it learned the answer format
    assert sorted(os.listdir(tmp_path / "data" / "tiny")) == ["csv", "model", "results", "test.pt", "train.pt"]
