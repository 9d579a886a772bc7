"""What a run's config cannot say about it: the code's commit, the libraries, the device, dtype and attention kernel
the frozen model ran with, and the processes and threads it ran on (environment.json of every run)."""
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

import torch
import transformers

from harness import decoder, hub, parallel


def describe(model: torch.nn.Module, device: torch.device) -> dict:
    """The code's commit, the libraries (gguf and kernels decide how a GGUF file loads: None when not installed),
    whether GGUF weights stayed packed, the device, dtype and attention kernel, and torch's CPU threads (THREADS, or
    the default: one per core)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"git_commit": _commit(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "gguf": _installed("gguf"), "kernels": _installed("kernels"),
            "attention": decoder.attention_backend(model, device), "gguf_packed": hub.packed_gguf(model),
            "device": str(device), "gpu": gpu, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "processes": parallel.world_size(), "threads": torch.get_num_threads()}


def _installed(name: str) -> Optional[str]:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True).stdout.strip() or None
    except OSError:  # no git installed
        return None
