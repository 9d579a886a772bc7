"""A run from start to record: the task (config, frozen model, data), its record in the run folder and the ledger row,
and a text prompt's run."""
import json
import os
from types import SimpleNamespace
from typing import Optional

import pandas as pd
import torch
from safetensors.torch import save_file

from harness import data, environment, errors, files, hub, ledger, parallel, plots, rategrid, rundir, scoring, shots
from harness.layouts import answer_context, check_primer_position, label_token_ids, make_layout
from harness.schedule import RATE_SCALES
from harness.task import Task  # runs.Task: what setup returns


def setup(cfg: SimpleNamespace, with_train: bool = True, held_out: bool = True) -> Task:
    """The task: frozen model, tokenizer, label ids, the test split and (with_train) the training split, with
    VAL_LIMIT validation reviews held out of it unless held_out is False (a script that sizes its own hold-out)."""
    _check_choices(cfg, with_train)
    ledger.check(cfg.RESULTS_DIR)  # a damaged ledger is found before the work, not after it
    device = hub.resolve_device(cfg.DEVICE)
    tokenizer = hub.load_tokenizer(cfg.MODEL_ID, cfg.GGUF_FILE)
    answer_at = answer_context(tokenizer, cfg.TEMPLATE_KWARGS)
    labels = torch.tensor(label_token_ids(tokenizer, cfg.LABELS, answer_at), device=device)
    with parallel.local_main_first():  # under accelerate one process per machine prepares missing data
        train = data.load_split(cfg, tokenizer, "train") if with_train else None
        train, val = (data.training_sets(train, cfg.VAL_LIMIT, cfg.TRAIN_REVIEWS, cfg.SEED) if with_train and held_out
                      else (train, None))
        test = data.load_split(cfg, tokenizer, "test")
    torch.manual_seed(cfg.SEED)
    model = hub.load_model(cfg.MODEL_ID, cfg.GGUF_FILE, device, cfg.DTYPE, cfg.GRADIENT_CHECKPOINTING)
    return Task(cfg, tokenizer, model, device, labels, train, test, val)


def _check_choices(cfg: SimpleNamespace, with_train: bool) -> None:
    """Config choices that exist, rates that are numbers (with_train), and choices made on validation reviews with
    some to make them on: one line before data prep and loading."""
    check_primer_position(cfg.PRIMER_POSITION, cfg.GRADIENT_CHECKPOINTING)
    if not with_train:
        return
    if cfg.RATE_SCALE not in RATE_SCALES:
        raise errors.UserError(f"--rate_scale={cfg.RATE_SCALE!r} is not one of {', '.join(RATE_SCALES)}")
    if not isinstance(cfg.TRAIN_REVIEWS, int) or cfg.TRAIN_REVIEWS < 0:
        raise errors.UserError(f"--train_reviews={cfg.TRAIN_REVIEWS!r} must be a whole number of reviews, 0 for all "
                               "that --val_limit leaves")
    if cfg.RATE_GRID and not cfg.VAL_LIMIT:
        raise errors.UserError("--rate_grid chooses the rates on validation reviews: "
                               "set --val_limit (e.g. --val_limit=200)")
    number = lambda r: isinstance(r, (int, float)) and not isinstance(r, bool)
    if not all(number(rate) or (isinstance(rate, list) and rate and all(map(number, rate))) for rate in cfg.RATE_GRID):
        raise errors.UserError(f"--rate_grid={cfg.RATE_GRID!r} must be a list of rates, each a peak rate "
                               "or a non-empty list of per-epoch rates: e.g. '--rate_grid=[1e-1, 3e-2, 1e-2, 3e-3]'")
    rategrid.transfer_of(cfg)  # a run to take the rate from that is no such run: said before loading anything
    if not all(map(number, cfg.RATE_BY_EPOCH)):
        raise errors.UserError(f"--rate_by_epoch={cfg.RATE_BY_EPOCH!r} must be a list of numbers, one rate per epoch: "
                               "e.g. '--rate_by_epoch=[3e-2, 1e-2, 3e-3]'")


def record(task: Task, script: str, method: str, prompt_tokens: int, predictions: dict,
           run_dir: Optional[str] = None, log: Optional[list[dict]] = None, trainable_params: int = 0,
           status: str = "finished", samples: Optional[int] = None, train_seconds: Optional[float] = None,
           train_cpu_seconds: Optional[float] = None) -> dict:
    """Write the run folder (metrics: the row, and the CPU seconds of the scoring and of a training the script
    timed itself, where they were taken; per-review predictions, environment, loss log) and append its row to the
    results.csv ledger; prints and returns the row. A method saves its own artifacts in run_dir first. Samples and
    train seconds come from the training split and the loss log unless given."""
    cfg = task.cfg
    run_dir = run_dir or rundir.new(cfg, script)
    scores, best = scoring.metrics(task.label_ids, predictions), scoring.best_epoch(run_dir)
    env = environment.describe(task.model, task.device)
    if samples is None:
        samples = len(task.train) if log is not None else 0
    if train_seconds is None:
        train_seconds = log[-1]["seconds"] if log else 0.0
    row = {"run_id": os.path.basename(run_dir), "method": method, "script": script, "status": status,
           "model_id": cfg.MODEL_ID, "samples": samples, "trainable_params": trainable_params, "tokens": prompt_tokens,
           **scores, "seed": cfg.SEED, "best_epoch": best,
           "train_seconds": round(train_seconds, 1), "score_seconds": round(predictions["seconds"], 1)}
    if not parallel.is_main():
        return row  # under accelerate the main process alone writes the run folder and the ledger
    cpu = {"score_cpu_seconds": round(predictions["cpu_seconds"], 1)} if "cpu_seconds" in predictions else {}
    if train_cpu_seconds is not None:
        cpu["train_cpu_seconds"] = round(train_cpu_seconds, 1)
    files.write_atomic(os.path.join(run_dir, "metrics.json"), json.dumps({**row, **cpu}, indent=2))
    files.write_atomic(os.path.join(run_dir, "environment.json"), json.dumps(env, indent=2))
    with files.atomic_path(os.path.join(run_dir, "predictions.safetensors")) as tmp:
        tensors = {k: v.contiguous() for k, v in predictions.items() if k not in ("seconds", "cpu_seconds")}
        save_file({**tensors, "label_ids": task.label_ids.cpu()}, tmp)
    if log:
        files.write_atomic(os.path.join(run_dir, "losses.csv"), pd.DataFrame(log).to_csv(index=False))
        print(f"saved {plots.loss_curve(run_dir, method, prompt_tokens)} (the training loss)")
    ledger.add_row(cfg.RESULTS_DIR, row)
    print(ledger.format_table([row]))
    print(f"saved {run_dir} and a row of {ledger.path(cfg.RESULTS_DIR)}")
    return row


def score_text_prompt(cfg: SimpleNamespace, script: str, system: str, user: str, shot_count: int = 0,
                      calibrated: bool = False) -> dict:
    """Score a hand-written prompt (system message, and user message around {review}) and record it; with
    shot_count, after that many training reviews and their labels as earlier chat turns; calibrated, its
    label-restricted score calibrated on content-free inputs (harness.shots), the raw one kept in calibration.json."""
    task = setup(cfg, with_train=shot_count > 0)
    layout = make_layout(task, system, user, turns=shots.examples(task, shot_count))
    predictions, method = (scoring.predict(task, layout),
                           "text prompt" + (f" ({shot_count} shots)" if shot_count else ""))
    if not calibrated:
        return record(task, script, method, layout.prompt_tokens, predictions)
    run_dir, bias = rundir.new(cfg, script), shots.label_bias(task, layout)
    raw = scoring.metrics(task.label_ids, predictions)
    files.write_atomic(os.path.join(run_dir, "calibration.json"), json.dumps(
        {"content_free": list(shots.CONTENT_FREE), "label_probabilities": bias.exp().tolist(),
         "raw_restricted_correct": raw["restricted_correct"], "raw_restricted_score": raw["restricted_score"]},
        indent=2))
    print(f"label-restricted score before calibration {ledger.format_score(raw, 'restricted')}; content-free label "
          f"probabilities {', '.join(f'{p:.3f}' for p in bias.exp().tolist())}")
    return record(task, script, method + ", calibrated", layout.prompt_tokens, shots.calibrate(predictions, bias),
                  run_dir)
