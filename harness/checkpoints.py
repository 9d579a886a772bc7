"""Where training stands, saved and put back bitwise: the trained tensors, Adam's state, the step, the loss log,
the validation rows and the RNG, in run_dir/checkpoint.pt (read with weights_only)."""
import os
from dataclasses import dataclass, field

import torch

from harness import files, parallel


@dataclass
class Progress:
    """Where training stands: the next batch to run is `batch` of epoch `epoch` (0-based)."""
    epoch: int = 0
    batch: int = 0
    log: list = field(default_factory=list)  # one row per step: step, epoch, lr, loss, training seconds so far
    # per-epoch scores, best epoch's tensors
    validation: dict = field(default_factory=lambda: {"rows": [], "best": None})
    last_good: dict = field(default_factory=dict)  # the tensors whose loss was last finite (not checkpointed)


def snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def restore(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name])


def optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[dict]:
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state.get(p, {}).items()} for p in params]


def restore_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], states: list[dict]) -> None:
    for p, state in zip(params, states):
        if state:
            optimizer.state[p] = state
        else:  # the step undone was the tensor's first: Adam starts afresh
            optimizer.state.pop(p, None)


@parallel.main_writes
def save(run_dir: str, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, progress: Progress) -> None:
    state = {"params": {name: p.detach().cpu() for name, p in params.items()}, "optimizer": optimizer.state_dict(),
             "epoch": progress.epoch, "batch": progress.batch, "log": progress.log, "validation": progress.validation,
             "torch_rng": torch.get_rng_state()}
    with files.atomic_path(os.path.join(run_dir, "checkpoint.pt")) as tmp:
        torch.save(state, tmp)


def load(run_dir: str, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> Progress:
    """Restore the tensors, optimizer and RNG from run_dir's checkpoint if there is one; where to go on from."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        return Progress(last_good=snapshot(params))
    state = torch.load(path, weights_only=True)
    restore(params, state["params"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resuming {run_dir} at epoch {state['epoch'] + 1}, batch {state['batch']}", flush=True)
    return Progress(state["epoch"], state["batch"], state["log"], state["validation"], snapshot(params))
