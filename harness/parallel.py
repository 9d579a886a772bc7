"""Data parallelism when `accelerate launch` (or torchrun) starts a script as several processes.

Each process holds the whole frozen model and the same primer, runs its share of every batch, and the primer's
gradient, the loss and the test counts are summed across processes. Plain `python script.py` never joins a process
group: every function here is then the single-process identity (no copy, no communication)."""
import contextlib
import functools
import os
import sys
from typing import Any, Callable

import torch

_state = None  # accelerate's PartialState once this process has joined a group of several, else None


def _launched() -> bool:
    """Whether a launcher started this script as one of several processes (it sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: str) -> None:
    """Join the process group when launched as several processes: NCCL on GPUs, gloo on CPU (no GPU, or
    --device=cpu). The other processes than the main one write nothing to stdout from then on; stop() leaves."""
    global _state
    if not _launched() or _state is not None:
        return
    # torch.distributed.nn's functions bind the default group as a default argument when first imported (torch._dynamo
    # and transformers' models import it): imported after the group exists, they would keep it, and its gloo threads,
    # alive past stop() to the interpreter's exit, where tearing it down aborts the process now and then
    import torch.distributed.nn  # noqa: F401
    from accelerate import PartialState
    _state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    if not _state.is_main_process:
        sys.stdout = open(os.devnull, "w")  # one config, one table, one "saved" line: the main process's


def stop(wait: bool) -> None:
    """Leave the process group, after every other process has come to leave it too when `wait` (every process ends
    alike: finished, refused, interrupted); a crash in one process leaves at once, since the others may never come.
    gloo's threads abort a process (SIGABRT, "terminate called without an active exception") whose group is torn
    down at the interpreter's exit, or while another process still talks to it; start() sees that nothing else keeps
    the group."""
    global _state
    if _state is None:
        return
    if wait:
        _state.wait_for_everyone()
    _state.destroy_process_group()
    _state = None


def started() -> bool:
    return _state is not None


def _rank() -> int:
    return _state.process_index if _state else 0


def world_size() -> int:
    return _state.num_processes if _state else 1


def is_main() -> bool:
    return _rank() == 0


def launch_command() -> str:
    """How this script was started, for the messages that say how to start it again."""
    return "accelerate launch <the same launch flags>" if _state else "python"


def device() -> torch.device:
    """This process's device under a launcher: accelerate's, cuda:<local rank> or cpu."""
    return _state.device if _state.device.type != "cpu" else torch.device("cpu")


def shard(idx: torch.Tensor) -> torch.Tensor:
    """This process's share of a batch or split: every world_size-th element from its rank on. The shares of all
    processes partition idx (no duplicates, no losses); on length-sorted idx they get similar lengths."""
    return idx[_rank()::world_size()]


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of tensor over all processes (tensor itself on one process)."""
    if _state is None:
        return tensor
    from accelerate.utils import reduce
    return reduce(tensor, reduction="sum")


def anyone(flag: bool) -> bool:
    """Whether flag is true on any process, so that all of them take the same branch."""
    if _state is None:
        return flag
    return bool(sum_across(torch.tensor([int(flag)], device=_state.device)) > 0)


def _barrier() -> None:
    if _state is not None:
        _state.wait_for_everyone()


def made_by_main(function: Callable) -> Callable:
    """function run by the main process alone; every process gets its (picklable) result."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs) -> Any:
        if _state is None:
            return function(*args, **kwargs)
        from accelerate.utils import broadcast_object_list
        return broadcast_object_list([function(*args, **kwargs) if is_main() else None])[0]
    return wrapper


def main_writes(function: Callable[..., None]) -> Callable[..., None]:
    """function (one that writes files) run by the main process alone; the others wait until it is done."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs) -> None:
        if is_main():
            function(*args, **kwargs)
        _barrier()
    return wrapper


def local_main_first() -> contextlib.AbstractContextManager:
    """A context the main process of each machine runs first (e.g. preparing missing data), the others after it."""
    return _state.local_main_process_first() if _state else contextlib.nullcontext()
