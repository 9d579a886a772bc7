"""Fixtures: tiny.py's tiny Llama-architecture model and tokenizer, saved like a real one, and its small Yelp-format
CSVs."""
import inspect
import os
import subprocess
import sys
import types
from typing import Callable, Optional

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub: everything they load is built here
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))  # pyproject.toml runs one worker per core
if WORKERS > 1:  # each worker, and each script it starts, takes its share of the cores rather than all of them
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))

import tiny as tiny_files  # noqa: E402  (the fixture below is called tiny)
from harness import cli, runs  # noqa: E402

TINY_RUN = ["--train_limit=40", "--test_limit=20"]  # 4 batches of 10 per epoch, 20 test reviews


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> types.SimpleNamespace:
    """Paths of tiny.py's random Llama (model_dir) and Yelp-format CSVs (csv_dir), and their rows (splits)."""
    root = tmp_path_factory.mktemp("tiny")
    splits = tiny_files.build(str(root))
    return types.SimpleNamespace(root=root, model_dir=str(root / "model"), csv_dir=str(root / "csv"), splits=splits)


def overrides(tiny, out) -> list[str]:
    """Command-line overrides that point a script at the tiny model and CSVs, writing under `out`."""
    return [f"--model_id={tiny.model_dir}", f"--csv_dir={tiny.csv_dir}", f"--data_dir={out}/data",
            f"--results_dir={out}/results", "--device=cpu", "--train_limit=100", "--test_limit=60",
            "--batch_size=10", "--primer_length=4", "--rate_by_epoch=[0.1, 0.1, 0.1]",
            "--rate_scale=absolute"]


@pytest.fixture(scope="session")
def task(tiny, tmp_path_factory):
    """The tiny model's task under overrides: 100 training and 60 test reviews, no validation hold-out. Shared by the
    test files that do not build one of their own; a test that changes it puts it back."""
    return runs.setup(cli.configure(overrides(tiny, tmp_path_factory.mktemp("task"))))


@pytest.fixture
def cfg(tiny, tmp_path):
    return cli.configure(overrides(tiny, tmp_path))


def run_script(*args: str, cwd: str = ROOT, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run a repo command line (e.g. 'experiment.py', '--x=1') offline, from the repo root unless given `cwd`,
    with `env` on top of the environment; output captured."""
    script = os.path.join(ROOT, args[0])
    cmd = [script] if script.endswith(".sh") else [sys.executable, script]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **(env or {})}
    return subprocess.run(cmd + list(args[1:]), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


class Killed(BaseException):
    """Stands for a kill: no handler of the code under test catches it, so only what is on disk survives."""


def run_until_first_checkpoint(run: Callable[[], object], monkeypatch) -> None:
    """Run a training script's run() until it has written its first checkpoint, then stop it dead, as a kill at that
    moment would (tests/test_resume.py kills real processes; this is the in-process equivalent, seconds cheaper)."""
    from harness import checkpoints
    real = checkpoints.save

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise Killed
    with monkeypatch.context() as patched:
        patched.setattr(checkpoints, "save", save_then_die)
        with pytest.raises(Killed):
            run()


def record_reads(monkeypatch, module, name: str, chosen: str) -> list[dict]:
    """Wrap module.name, a function of a task and a split (None: the test split), to record each call's arguments,
    whether it read the test split ("test"), and whether the newest run folder then held the file `chosen` (the
    selection's output) ("chosen"): selection must never read the test split."""
    real, calls = getattr(module, name), []
    signature = inspect.signature(real)

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        task, split = bound.arguments["task"], bound.arguments["split"]
        newest = max((e.path for e in os.scandir(task.cfg.RESULTS_DIR) if e.is_dir()), default="")
        calls.append({**bound.arguments, "test": split is None or split is task.test,
                      "chosen": os.path.exists(os.path.join(newest, chosen))})
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)
    return calls
