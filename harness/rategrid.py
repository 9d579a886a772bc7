"""A method's learning rates chosen on validation reviews: every schedule of RATE_GRID trained from the same start in a
folder of its own (checkpointed and resumed as any run), the one with the best validation epoch kept, the validation
scores across the grid saved (rate_grid.csv) and drawn for every method of a results folder (rate_grid.png)."""
import ast
import glob
import os
from typing import Optional

import pandas as pd
import torch

from harness import files, plots, training
from harness.task import Task


def train_grid(task: Task, params: dict[str, torch.Tensor], loss_of: training.LossOf, run_dir: str, evaluate,
               method: str, script: str, rate_unit: float = 1.0) -> tuple[list[dict], str, float]:
    """Each schedule of RATE_GRID (RATE_BY_EPOCH alone when empty) from the tensors' present values; leaves params at
    the best schedule's (best validation epoch: most strict, then label-restricted answers right, then the earliest
    schedule) and returns its loss log and status, and the seconds all schedules took. With a grid, run_dir gets
    rate_grid.csv, the chosen schedule's validation.csv, and the figure of every rate_grid.csv beside it."""
    cfg = task.cfg
    if not cfg.RATE_GRID:
        log, status = training.train(task, params, loss_of, run_dir, evaluate, script=script, rate_unit=rate_unit)
        return log, status, log[-1]["seconds"] if log else 0.0
    start, points, rows = training.snapshot(params), [], []
    for i, rates in enumerate(cfg.RATE_GRID):
        folder = os.path.join(run_dir, f"rates_{i}")
        os.makedirs(folder, exist_ok=True)
        training.restore(params, start)
        cfg.RATE_BY_EPOCH = list(rates)  # what training.train reads
        log, status = training.train(task, params, loss_of, folder, evaluate, script=script, rate_unit=rate_unit)
        validation = pd.read_csv(os.path.join(folder, "validation.csv"))
        best = training.best_validation(validation.to_dict("records"))
        points.append({"tensors": training.snapshot(params), "log": log, "status": status, "validation": validation})
        rows.append({"method": method, "train_reviews": len(task.train), "rates": str(list(rates)), "first_rate": rates[0],
                     "best_epoch": int(best["epoch"]), "val_correct": best["correct"], "val_total": best["total"],
                     "val_score": best["score"], "val_restricted_score": best["restricted_score"],
                     "train_seconds": log[-1]["seconds"] if log else 0.0})
        print(f"rates {list(rates)}: best validation epoch {int(best['epoch'])}, score {best['score']:.1%} "
              f"(label-restricted {best['restricted_score']:.1%})", flush=True)
    table = pd.DataFrame(rows)
    chosen = max(range(len(rows)), key=lambda i: (rows[i]["val_correct"], rows[i]["val_restricted_score"], -i))
    table["chosen"] = table.index == chosen
    training.restore(params, points[chosen]["tensors"])
    cfg.RATE_BY_EPOCH = list(cfg.RATE_GRID[chosen])
    files.write_atomic(os.path.join(run_dir, "rate_grid.csv"), table.to_csv(index=False))
    files.write_atomic(os.path.join(run_dir, "validation.csv"), points[chosen]["validation"].to_csv(index=False))
    print(f"chosen on validation: rates {cfg.RATE_BY_EPOCH}; every method's grid: {draw(os.path.dirname(run_dir))}")
    return points[chosen]["log"], points[chosen]["status"], float(table["train_seconds"].sum())


def as_chosen(run_dir: str, config: dict) -> tuple[dict, Optional[float]]:
    """A rate-grid run's config (config.json's keys) as that of the plain run of its chosen schedule, which trains the
    same tensors from the same start on the same batches, and that schedule's training seconds; any other run's
    config as it is, and None."""
    if not config.get("rate_grid"):
        return config, None
    grid = pd.read_csv(os.path.join(run_dir, "rate_grid.csv"))
    chosen = grid[grid["chosen"]].iloc[0]
    return {**config, "rate_by_epoch": ast.literal_eval(chosen["rates"]), "rate_grid": []}, float(chosen["train_seconds"])


def draw(results_dir: str) -> str:
    """rate_grid.png in results_dir: every run's rate_grid.csv there, drawn by plots.rate_grid (one panel per size)."""
    grids = [pd.read_csv(path).sort_values("first_rate")
             for path in sorted(glob.glob(os.path.join(results_dir, "*", "rate_grid.csv")))]
    return plots.rate_grid(grids, os.path.join(results_dir, "rate_grid.png"))
