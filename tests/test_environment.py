"""environment.json: what a run's config cannot say, read from the machine and the model it ran with."""
import copy
import platform
import subprocess

import torch

from conftest import ROOT
from harness import environment


def test_the_environment_is_this_machines_and_this_models(task, monkeypatch):
    described = environment.describe(task.model, task.device)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert described["git_commit"] == (head or None) and described["python"] == platform.python_version()
    assert (described["device"], described["gpu"], described["dtype"]) == ("cpu", None, "float32")
    assert described["gguf_packed"] is False and described["attention"] == "FLASH_ATTENTION"  # torch's CPU kernel
    assert (described["processes"], described["threads"]) == (1, torch.get_num_threads())
    assert environment.describe(copy.deepcopy(task.model).to(torch.bfloat16), task.device)["dtype"] == "bfloat16"

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")
    monkeypatch.setattr(subprocess, "run", no_git)
    assert environment.describe(task.model, task.device)["git_commit"] is None  # a copy without git still runs
