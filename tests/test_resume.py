"""Interrupted training resumes to exactly the primer and scores of an uninterrupted run (CPU, same seed)."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import ROOT, overrides, run_script

SLOW = ["--batch_size=2", "--checkpoint_every=5", "--rate_by_epoch=[0.1, 0.1, 0.1, 0.1, 0.1, 0.1]"]  # 300 steps


def interrupt(args: list[str], results: str, sig: int) -> subprocess.CompletedProcess:
    """Start a training run, send sig as soon as its first checkpoint exists, and wait for it to end."""
    proc = subprocess.Popen([sys.executable, "experiment.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    while not glob.glob(f"{results}/*/checkpoint.pt") and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def finished_run(results: str) -> tuple[torch.Tensor, dict]:
    (run,) = glob.glob(f"{results}/*-experiment")
    return load_file(f"{run}/primer.safetensors")["primer"], json.load(open(f"{run}/metrics.json"))


def test_killed_and_interrupted_runs_resume_bitwise(tiny, tmp_path):
    base = overrides(tiny, tmp_path)  # one data dir; each run its own results dir
    runs = {}
    for name in ("straight", "killed", "ctrl_c"):
        runs[name] = str(tmp_path / name)
        args = [*base, *SLOW, f"--results_dir={runs[name]}"]
        if name == "straight":
            assert run_script("experiment.py", *args).returncode == 0
            continue
        stopped = interrupt(args, runs[name], signal.SIGKILL if name == "killed" else signal.SIGINT)
        assert stopped.returncode != 0, "the run ended before it could be interrupted"
        (run,) = glob.glob(f"{runs[name]}/*-experiment")
        state = torch.load(f"{run}/checkpoint.pt", weights_only=True)
        assert (state["epoch"], state["batch"]) < (6, 0) and not os.path.exists(f"{run}/metrics.json")
        if name == "ctrl_c":
            assert "Traceback" not in stopped.stderr
            assert stopped.stderr.strip().splitlines()[-1] == f"error: interrupted; checkpoint saved: resume with python experiment.py --resume={run}"
        resumed = run_script("experiment.py", f"--resume={run}")
        assert resumed.returncode == 0, resumed.stderr
        assert f"resuming {run} at epoch" in resumed.stdout
    primer, metrics = finished_run(runs["straight"])
    for name in ("killed", "ctrl_c"):
        other_primer, other_metrics = finished_run(runs[name])
        assert torch.equal(other_primer, primer), name
        assert {k: other_metrics[k] for k in ("correct", "restricted_correct", "total")} == \
               {k: metrics[k] for k in ("correct", "restricted_correct", "total")}
