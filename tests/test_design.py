"""DESIGN.md's new method, as written there: it trains, scores and records on the tiny model, and a run killed after
its first checkpoint resumes to the same answers."""
import glob
import importlib.util
import os
import re

import torch
from safetensors.torch import load_file

from conftest import ROOT, overrides, run_until_first_checkpoint
from harness import cli, ledger


def design_script(tmp_path) -> str:
    """DESIGN.md's python block, saved as learned_vector.py."""
    with open(os.path.join(ROOT, "DESIGN.md"), encoding="utf-8") as f:
        (code,) = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    path = tmp_path / "learned_vector.py"
    path.write_text(code)
    return str(path)


def test_the_new_method_of_design_md_trains_records_and_resumes(tiny, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("learned_vector", design_script(tmp_path))
    method = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(method)
    args = overrides(tiny, tmp_path) + ["--layer=2", "--train_limit=40", "--test_limit=20", "--batch_size=8",
                                        "--checkpoint_every=3", "--rate_by_epoch=[0.1, 0.1]"]
    method.run(cli.configure(args + [f"--results_dir={tmp_path}/straight"], method.SETTINGS))
    (row,) = ledger.rows(f"{tmp_path}/straight")
    assert (row["script"], row["method"], row["trainable_params"], row["samples"]) == (
        "learned_vector", "learned steering vector", 64, 40)
    (straight,) = glob.glob(f"{tmp_path}/straight/*-learned_vector")
    killed_dir = f"{tmp_path}/killed"
    run_until_first_checkpoint(lambda: method.run(cli.configure(args + [f"--results_dir={killed_dir}"],
                                                                method.SETTINGS)), monkeypatch)
    (killed,) = glob.glob(f"{killed_dir}/*-learned_vector")
    assert not os.path.exists(f"{killed}/metrics.json")
    method.run(cli.configure([f"--resume={killed}"], method.SETTINGS))
    first, again = (load_file(f"{run}/predictions.safetensors") for run in (straight, killed))
    assert torch.equal(first["logprobs"], again["logprobs"]) and torch.equal(first["answer"], again["answer"])
