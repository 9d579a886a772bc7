"""One training loop for any trainable tensors (a primer, a steering vector, LoRA weights) and any loss on a batch:
Adam under a Schedule (warmup, cosine decay, clipping, or the reference's per-epoch rates), length-grouped batches,
checkpoints (harness/checkpoints.py) and bitwise resume, Ctrl-C, non-finite-loss rollback, validation every N steps
with keep-best and early stopping, data-parallel under accelerate launch."""
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from harness import checkpoints, errors, files, ledger, parallel
from harness.schedule import Schedule  # what train() takes: scripts build it as training.Schedule.of(cfg)
from harness.task import Task

CHUNK_BATCHES = 64  # length grouping sorts reviews within chunks of this many batches
# steps between reads of the losses on the host (non-finite check, progress bar); none waits in between
CHECK_EVERY = 16

# (this process's share of a batch of training reviews, the batch's size) -> its part of the batch's mean loss
LossOf = Callable[[torch.Tensor, int], torch.Tensor]


class Interrupted(errors.UserError):
    """Ctrl-C stopped training after a checkpoint was saved."""


def length_grouped_batches(lengths: torch.Tensor, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Seeded batches of similar-length reviews: shuffle, sort within chunks of CHUNK_BATCHES batches, shuffle
    batches."""
    rng = np.random.default_rng(seed)
    order = torch.from_numpy(rng.permutation(len(lengths)))
    chunks = order.split(batch_size * CHUNK_BATCHES)
    batches = [batch for chunk in chunks for batch in chunk[lengths[chunk].argsort(stable=True)].split(batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def train_step(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, loss_of: LossOf,
               idx: torch.Tensor, clip: float = 0.0) -> torch.Tensor:
    """One Adam step over training reviews idx; returns the batch's mean loss, a 0-dim tensor left on the device: the
    step reads nothing back, so the host never waits for the device and queues the next batch while this one runs.
    A non-finite loss updates like any other; the caller, which kept what came before (Pending), finds it when it
    reads the losses and undoes it. Under accelerate idx is the global batch: each process runs its shard, and the
    summed gradients are those of the mean over idx on every process."""
    loss = loss_of(parallel.shard(idx), len(idx))
    total = parallel.sum_across(loss.detach())  # every process sees the same loss, so all of them stop on a NaN
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for p in params:  # same gradient, same Adam step: the tensors stay identical on every process
        p.grad = parallel.sum_across(p.grad if p.grad is not None else torch.zeros_like(p))
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    return total


@dataclass
class Pending:
    """A step whose loss the host has not read yet, and what undoing it takes."""
    loss: torch.Tensor  # 0-dim, on the device
    before: dict[str, torch.Tensor]  # the tensors before the step
    state: list[dict]  # the optimizer's state of each tensor before the step
    times: dict[str, float]  # _Clock.read() when the step was queued
    rate: float  # the step's learning rate


@dataclass(frozen=True)
class _Clock:
    """Training time so far, earlier sessions of the run included: wall seconds and this process's CPU seconds (every
    thread's: what the run costs, however many other jobs share the cores). A run resumed from a log without CPU
    seconds (an older version's) logs wall seconds alone."""
    wall: float  # time.perf_counter() when training would have started
    cpu: Optional[float]  # time.process_time() likewise

    @staticmethod
    def resumed(log: list[dict]) -> "_Clock":
        last = log[-1] if log else {"seconds": 0.0, "cpu_seconds": 0.0}
        cpu = time.process_time() - last["cpu_seconds"] if "cpu_seconds" in last else None
        return _Clock(time.perf_counter() - last["seconds"], cpu)

    def read(self) -> dict[str, float]:
        """The log's "seconds" and "cpu_seconds" so far."""
        wall = {"seconds": time.perf_counter() - self.wall}
        return wall if self.cpu is None else {**wall, "cpu_seconds": time.process_time() - self.cpu}


def train(task: Task, params: dict[str, torch.Tensor], loss_of: LossOf, run_dir: str, schedule: Schedule,
          evaluate: Optional[Callable[[], dict]] = None, script: str = "experiment.py",
          until: Optional[int] = None) -> tuple[list[dict], str]:
    """Adam on `params` alone over task.train under `schedule`, checkpointed in run_dir (and resumed from it),
    `evaluate()` (a scores row on validation reviews) when the schedule says; returns the loss log and the status:
    "finished" (the budget spent, or validation stopped improving), "paused" (at step `until`, to go on by calling
    again) or why training stopped early. Ctrl-C saves a checkpoint and says how to resume `script`."""
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(list(params.values()), lr=schedule.rate)
    progress = checkpoints.load(run_dir, params, optimizer)
    per_epoch = math.ceil(len(task.train) / schedule.batch_size)
    rates, checks = schedule.rates(per_epoch), schedule.validation_steps(per_epoch)
    total = len(rates)
    end = total if until is None else min(until, total)
    clock = _Clock.resumed(progress.log)
    stop = []
    on_ctrl_c = lambda *_: stop.append(True)  # training stops between two steps, never inside one
    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        while True:
            step = progress.epoch * per_epoch + progress.batch
            rows = progress.validation["rows"]
            done = bool(rows) and rows[-1].get("step") == step  # validated before a resume
            due = step in checks or step == end  # a pause is validated, to rank by
            if evaluate is not None and due and not done:
                _validate_between_checkpoints(task, params, evaluate, optimizer, progress, run_dir, script, on_ctrl_c)
            if step < total and _stalled(rows, schedule.patience):
                print(f"validation has not improved for {schedule.patience} evaluations: stopping at step {step:,} "
                      f"of {total:,}", flush=True)
                break
            if step >= end:
                break
            if progress.batch == per_epoch:
                progress.epoch, progress.batch = progress.epoch + 1, 0
            stop_at = min((progress.epoch + 1) * per_epoch, next(c for c in checks if c > step), end)
            status = _train_steps(task, params, loss_of, optimizer, schedule, rates, per_epoch, stop_at, progress,
                                 run_dir, clock, stop, script)
            if status:
                _keep_best(schedule, params, progress.validation)
                return progress.log, status
    finally:
        signal.signal(signal.SIGINT, previous)
    if step < total and not _stalled(progress.validation["rows"], schedule.patience):
        return progress.log, "paused"
    _keep_best(schedule, params, progress.validation)
    return progress.log, "finished"


def _validate_between_checkpoints(task: Task, params: dict[str, torch.Tensor], evaluate: Callable[[], dict],
                                  optimizer: torch.optim.Optimizer, progress: checkpoints.Progress, run_dir: str,
                                  script: str, on_ctrl_c: Callable) -> None:
    """validate(), a checkpoint on either side (validating again is all a resume needs); Ctrl-C stops it at once."""
    checkpoints.save(run_dir, params, optimizer, progress)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        validate(task, params, evaluate, progress, run_dir)
    except KeyboardInterrupt:
        raise Interrupted(_resume_hint(run_dir, script)) from None
    signal.signal(signal.SIGINT, on_ctrl_c)
    checkpoints.save(run_dir, params, optimizer, progress)


def _stalled(rows: list[dict], patience: int) -> bool:
    """Whether the last `patience` validations all came after the best one (never, with patience 0)."""
    best = best_validation(rows)
    return bool(patience) and best is not None and len(rows) - 1 - rows.index(best) >= patience


def _train_steps(task: Task, params: dict[str, torch.Tensor], loss_of: LossOf, optimizer: torch.optim.Optimizer,
                 schedule: Schedule, rates: list[float], per_epoch: int, stop_at: int, progress: checkpoints.Progress,
                 run_dir: str, clock: _Clock, stop: list, script: str) -> Optional[str]:
    """Steps of progress.epoch at `rates` (one per step of the budget) up to step `stop_at` (the epoch's end, a
    validation, or a pause), then a checkpoint; why training must stop early, or None. The losses are read on the
    host every CHECK_EVERY steps, before a checkpoint, at the stop and on Ctrl-C (_settle), never in between."""
    first = progress.epoch * per_epoch
    last = stop_at - first
    batches = length_grouped_batches(task.train.lengths, schedule.batch_size, schedule.seed + progress.epoch)
    epochs = len(schedule.rate_by_epoch) or schedule.epochs
    bar = tqdm(batches[progress.batch:last], desc=f"epoch {progress.epoch + 1}/{epochs}", unit="batch",
               initial=progress.batch, total=len(batches), disable=not parallel.is_main())
    tensors, pending, seen, start = list(params.values()), [], 0, time.perf_counter()
    running = None
    for idx in bar:
        rate = rates[first + progress.batch]
        for group in optimizer.param_groups:
            group["lr"] = rate
        before, state = checkpoints.snapshot(params), checkpoints.optimizer_state(optimizer, tensors)
        loss = train_step(tensors, optimizer, loss_of, idx, schedule.clip)
        pending.append(Pending(loss, before, state, clock.read(), rate))
        progress.batch, seen = progress.batch + 1, seen + len(idx)
        checkpoint = progress.batch % schedule.checkpoint_every == 0 or progress.batch == last
        # under accelerate the processes agree on Ctrl-C only at these steps: the vote is a collective that waits
        if not (checkpoint or progress.batch % CHECK_EVERY == 0 or (stop and not parallel.started())):
            continue
        halt = parallel.anyone(bool(stop))  # under accelerate all processes stop after the same step
        losses, failure = _settle(params, optimizer, pending, progress, clock, run_dir)
        if failure:
            return failure
        for value in losses:
            running = value if running is None else 0.98 * running + 0.02 * value
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{rate:.3g}",
                        samples_s=f"{seen / (time.perf_counter() - start):.1f}")
        if halt or checkpoint:
            checkpoints.save(run_dir, params, optimizer, progress)
        if halt:
            raise Interrupted(_resume_hint(run_dir, script))
    return None


def _settle(params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, pending: list[Pending],
            progress: checkpoints.Progress, clock: _Clock, run_dir: str) -> tuple[list[float], Optional[str]]:
    """Read the pending steps' losses (the one wait for the device) and log them; at the first non-finite one, undo
    it and every step after it, put back the last tensors whose loss was finite, save a checkpoint and say why
    training stops. Returns the losses logged and that reason (None when every loss was finite)."""
    losses = torch.stack([step.loss for step in pending]).cpu().tolist()
    now = clock.read()
    bad = next((i for i, value in enumerate(losses) if not math.isfinite(value)), None)
    for i, value in enumerate(losses[:bad]):
        times = now if i == len(pending) - 1 else pending[i].times
        progress.log.append({"step": len(progress.log) + 1, "epoch": progress.epoch + 1, "lr": pending[i].rate,
                             "loss": value, **times})
    if bad is None:
        progress.last_good = pending[-1].before
        pending.clear()
        return losses, None
    checkpoints.restore(params, pending[bad - 1].before if bad else progress.last_good)
    # the optimizer as it was after the last finite step
    checkpoints.restore_optimizer(optimizer, list(params.values()), pending[bad].state)
    progress.batch -= len(pending) - bad
    pending.clear()
    checkpoints.save(run_dir, params, optimizer, progress)
    where = f"epoch {progress.epoch + 1}, batch {progress.batch}"
    print(f"training stopped at {where}: loss {losses[bad]}; keeping the last good {', '.join(params)}", flush=True)
    return losses[:bad], f"stopped early at {where}: non-finite loss {losses[bad]}"


def _resume_hint(run_dir: str, script: str) -> str:
    return f"interrupted; checkpoint saved: resume with {parallel.launch_command()} {script} --resume={run_dir}"


def validate(task: Task, params: dict[str, torch.Tensor], evaluate: Callable[[], dict],
             progress: checkpoints.Progress, run_dir: str) -> None:
    """Score the validation reviews where training stands, print the scores, add them to the validation rows and
    run_dir/validation.csv (rewritten each time, to follow a long run), and copy the tensors if they are the best."""
    validation = progress.validation
    row = {"epoch": progress.epoch + 1, "step": len(progress.log), **evaluate()}
    validation["rows"].append(row)
    best = best_validation(validation["rows"])
    if best is row:
        validation["best"] = {name: p.cpu() for name, p in checkpoints.snapshot(params).items()}
    if parallel.is_main():
        with files.atomic_path(os.path.join(run_dir, "validation.csv")) as tmp:
            pd.DataFrame(validation["rows"]).to_csv(tmp, index=False)
    print(f"epoch {row['epoch']}, step {row['step']:,} validation: score {ledger.format_score(row, 'score')} "
          f"({row['correct']:,} / {row['total']:,}), label-restricted {ledger.format_score(row, 'restricted')}; "
          f"best so far: epoch {best['epoch']}, step {best['step']:,}", flush=True)


def validation_key(row: dict, prefix: str = "") -> tuple[int, int]:
    """What "better on validation" means for every choice the repo makes (an epoch, a rate, a layer, a coefficient,
    a probe, a prompt): more strict answers right (row[prefix + "correct"]), then more label-restricted ones right;
    the earlier candidate wins a tie. A row without a restricted count (a probe's: it answers only labels) counts
    its strict one there."""
    return row[prefix + "correct"], row.get(prefix + "restricted_correct", row[prefix + "correct"])


def best_validation(rows: list[dict], prefix: str = "") -> Optional[dict]:
    """The best validation row by validation_key, the earliest of equals; None without rows."""
    return max(rows, key=lambda row: validation_key(row, prefix), default=None)


def _keep_best(schedule: Schedule, params: dict[str, torch.Tensor], validation: dict) -> None:
    """With schedule.keep_best, put the tensors of the best validation in place of the last ones."""
    best = best_validation(validation["rows"])
    if schedule.keep_best and best is not None:
        checkpoints.restore(params, validation["best"])
        print(f"keeping the {', '.join(params)} of epoch {best['epoch']}, step {best.get('step', '?')}, the best on "
              f"the validation reviews", flush=True)
