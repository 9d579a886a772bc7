"""A run's folder: a new one, results/<time>-<script>, holding the config the run used, or the one --resume names."""
import itertools
import json
import os
from datetime import datetime
from types import SimpleNamespace
from typing import Any, Optional

from harness import errors, files, parallel


@parallel.made_by_main
def new(cfg: SimpleNamespace, script: str, fitted: Optional[dict[str, Any]] = None) -> str:
    """A new run folder, results/<time>-<script>, holding the run's effective config: cfg, with the values this run
    fitted to its data (`fitted`, by setting name) in place of those asked for, so that a resume reads what the run
    used, and those asked for under "asked", so that a sweep finds the run by its command line (under accelerate the
    main process makes the folder and every process gets its path). A method that trains takes new_or_resumed."""
    base = os.path.join(files.folder(cfg.RESULTS_DIR, "--results_dir"), f"{datetime.now():%Y%m%d-%H%M%S}-{script}")
    for n in itertools.count(1):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.makedirs(path)  # fails if another run made it first: two runs in one second get two folders
            break
        except FileExistsError:
            continue
    used = {k.lower(): v for k, v in {**vars(cfg), **(fitted or {})}.items()}
    asked = {k.lower(): getattr(cfg, k) for k, v in (fitted or {}).items() if getattr(cfg, k) != v}
    files.write_atomic(os.path.join(path, "config.json"), json.dumps({**used, "asked": asked} if asked else used,
                                                                     indent=2))
    return path


def new_or_resumed(cfg: SimpleNamespace, script: str, fitted: Optional[dict[str, Any]] = None) -> str:
    """The folder of RESUME (refused when that run has finished), or a new one (`new`, with `fitted`): where a
    method that trains (and so checkpoints) writes."""
    if not cfg.RESUME:
        return new(cfg, script, fitted)
    if os.path.exists(os.path.join(cfg.RESUME, "metrics.json")):
        raise errors.UserError(f"{cfg.RESUME} has finished: its scores are in {cfg.RESUME}/metrics.json and its row "
                               f"in the ledger")
    return cfg.RESUME
