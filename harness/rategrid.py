"""A method's learning rate chosen on validation reviews: each rate of RATE_GRID trains from the same start in a folder
of its own (checkpointed and resumed as any run). The grid widens while its best rate sits at an edge, and spends
little on bad rates by successive halving: every rate trains a quarter of the budget, the better half goes on to half
of it, the better half of those to the whole. The best validation is kept, the grid saved (rate_grid.csv) and drawn
for every method of a results folder (rate_grid.png). A rate chosen at another seed (RATE_FROM) is tried first and
kept where it holds: this seed's best validation at it within RATE_HOLDS of that seed's."""
import ast
import glob
import math
import os
from dataclasses import dataclass
from typing import Optional

import pandas as pd
import torch

from harness import checkpoints, errors, files, ledger, plots, training
from harness.task import Task

RUNGS = (0.25, 0.5, 1.0)  # successive halving: shares of the budget after which the worse half of the rates stops
WIDEN = 3  # most rates a grid adds beyond its edge while its best sits there
SEED_KEYS = {"SEED", "DATA_DIR", "RATE_FROM", "RATE_HOLDS"}  # what a run may change from the run whose rate it takes


@dataclass(frozen=True)
class Transfer:
    """A peak rate another seed chose on its grid, and the best validation score it must reach here to be kept."""
    rate: float
    bar: float  # that seed's best validation score less RATE_HOLDS
    source: str  # that seed's run id


def train_grid(task: Task, params: dict[str, torch.Tensor], loss_of: training.LossOf, run_dir: str,
               schedule: training.Schedule, grid: list, evaluate, method: str, script: str,
               unit: float = 1.0, transfer: Optional[Transfer] = None) -> tuple[list[dict], str, float]:
    """`schedule` at each rate of `grid` (peak rates, or lists of per-epoch rates; times `unit`), or `schedule`
    alone when the grid is empty; leaves params at the chosen rate's tensors and returns its loss log and status, and
    the seconds every rate took. With a grid, run_dir gets rate_grid.csv, the chosen rate's validation.csv, and the
    figure of every rate_grid.csv beside it. A `transfer` trains its rate's whole budget first and is chosen where
    it reaches its bar; else it joins the grid as a candidate already trained (successive halving skips it)."""
    if not grid:
        log, status = training.train(task, params, loss_of, run_dir, schedule, evaluate, script)
        return log, status, log[-1]["seconds"] if log else 0.0
    start, points = checkpoints.snapshot(params), {}

    def advance(rate, share: float) -> None:  # train `rate` to `share` of its budget, from where its folder stands
        folder = os.path.join(run_dir, f"rates_{list(points).index(rate) if rate in points else len(points)}")
        os.makedirs(folder, exist_ok=True)
        checkpoints.restore(params, start)
        at = schedule.at(rate, unit)
        until = math.ceil(share * at.total_steps(math.ceil(len(task.train) / at.batch_size)))
        log, status = training.train(task, params, loss_of, folder, at, evaluate, script, until=until)
        # kept with the run
        files.write_atomic(os.path.join(folder, "losses.csv"), pd.DataFrame(log).to_csv(index=False))
        validation = pd.read_csv(os.path.join(folder, "validation.csv"))
        best = training.best_validation(validation.to_dict("records"))
        points[rate] = {"tensors": checkpoints.snapshot(params), "log": log, "status": status, "validation": validation,
                        "best": best, "share": share}
        print(f"rate {rate}: {len(log):,} steps, best validation {best['score']:.1%} at step {best['step']:,} "
              f"(label-restricted {best['restricted_score']:.1%})", flush=True)

    chosen = _chosen([tuple(rate) if isinstance(rate, list) else rate for rate in grid], points, advance, transfer)
    table = _grid_table(points, chosen, method, len(task.train), transfer)
    checkpoints.restore(params, points[chosen]["tensors"])
    files.write_atomic(os.path.join(run_dir, "rate_grid.csv"), table.to_csv(index=False))
    files.write_atomic(os.path.join(run_dir, "validation.csv"), points[chosen]["validation"].to_csv(index=False))
    print(f"chosen on validation: rate {chosen}; every method's grid: {draw(os.path.dirname(run_dir))}"
          f"{at_edge(points, chosen)}")
    return points[chosen]["log"], points[chosen]["status"], float(table["train_seconds"].sum())


def _chosen(grid: list, points: dict, advance, transfer: Optional[Transfer]):
    """The rate `transfer` names where it holds, trained whole by `advance(rate, share)` (which fills `points`); else
    the best on validation after successive halving over `grid` (each rate a dict key) and the transferred rate, the
    grid widened at its edge."""
    alive = list(grid)
    rungs = RUNGS if all(isinstance(rate, (int, float)) for rate in grid) else (1.0,)  # the reference's: each whole
    if transfer:
        advance(transfer.rate, 1.0)
        if _holds(transfer, points):
            return transfer.rate
        alive = [*dict.fromkeys([*grid, transfer.rate])]  # a candidate with the rest
    for rung, share in enumerate(rungs):
        for rate in alive:
            if rate not in points or points[rate]["share"] < share:  # a transferred rate has trained its whole
                advance(rate, share)
        alive += widened(grid, points, alive, lambda rate: [advance(rate, s) for s in rungs[:rung + 1]])
        if share < 1:
            alive = sorted(alive, key=lambda r: _rank(points[r]), reverse=True)[:math.ceil(len(alive) / 2)]
    return max(alive, key=lambda r: _rank(points[r]))


def _holds(transfer: Transfer, points: dict) -> bool:
    """Whether the transferred rate, trained whole, reached its bar here (said in one line)."""
    held = points[transfer.rate]["best"]["score"] >= transfer.bar
    print(f"rate {transfer.rate} of {transfer.source} {'holds' if held else 'does not hold'} here (its bar: "
          f"{transfer.bar:.1%}){'' if held else '; choosing among the grid'}", flush=True)
    return held


def transfer_of(cfg) -> Optional[Transfer]:
    """RATE_FROM's chosen rate and the bar it must reach at this seed; None without RATE_FROM. A UserError where that
    folder is not a finished grid of peak rates of the same run at another seed."""
    if not cfg.RATE_FROM:
        return None
    folder, given = cfg.RATE_FROM.rstrip("/"), f"--rate_from={cfg.RATE_FROM}"
    if not all(os.path.isfile(os.path.join(folder, f)) for f in ("rate_grid.csv", "config.json", "metrics.json")):
        raise errors.UserError(f"{given} is no finished rate-grid run (rate_grid.csv, config.json, metrics.json): "
                               "give the folder of a run with --rate_grid at another seed")
    if not cfg.RATE_GRID:
        raise errors.UserError(f"{given} needs --rate_grid too: this seed chooses its own rate where that one does "
                               "not hold")
    source = {k.upper(): v for k, v in files.read_json(os.path.join(folder, "config.json")).items()}
    source.update({k.upper(): v for k, v in source.pop("ASKED", {}).items()})  # settings it fitted, as asked
    ignored = SEED_KEYS | ledger.NEUTRAL_KEYS
    differ = sorted(k.lower() for k, v in vars(cfg).items() if k not in ignored and k in source and source[k] != v)
    if differ:
        raise errors.UserError(f"{given} ran with other {', '.join(differ)}: give a run that differs from this one "
                               "in its seed alone")
    grid = pd.read_csv(os.path.join(folder, "rate_grid.csv"), dtype={"rates": str}, keep_default_na=False)
    chosen = grid[grid["chosen"]].iloc[0]
    if chosen.get("rate_from", ""):
        raise errors.UserError(f"{given} took its rate from {chosen['rate_from']}: give that run instead")
    rate = ast.literal_eval(chosen["rates"])
    if isinstance(rate, list):
        raise errors.UserError(f"{given} chose per-epoch rates {rate}: only a peak rate is tried at another seed")
    return Transfer(float(rate), float(chosen["val_score"]) - cfg.RATE_HOLDS, os.path.basename(folder))


def _rank(point: dict) -> tuple[int, int]:
    """A rate's standing: its best validation's, by the repo's one rule (training.validation_key)."""
    return training.validation_key(point["best"])


def widened(grid: list, points: dict, alive: list, train) -> list:
    """Rates added beyond the grid's edge while the best of `alive` sits there (peak rates only), each trained by
    `train(rate)` as far as the others; at most WIDEN of them over the whole grid."""
    added = []
    while len(points) < len(grid) + WIDEN and all(isinstance(r, (int, float)) for r in points):
        best, rates = max(alive + added, key=lambda r: _rank(points[r])), sorted(points)
        if len(rates) < 2 or rates[0] < best < rates[-1]:
            break
        edge, inner = (rates[0], rates[1]) if best == rates[0] else (rates[-1], rates[-2])
        rate = float(f"{edge * edge / inner:.3g}")  # one more step of the grid's own ratio
        train(rate)
        added.append(rate)
    return added


def at_edge(points: dict, chosen) -> str:
    """A warning where the chosen peak rate is still the highest or lowest of every rate tried (the grid widened as
    far as WIDEN lets it), else ""."""
    rates = sorted(rate for rate in points if isinstance(rate, (int, float)))
    if len(rates) < 2 or chosen not in (rates[0], rates[-1]):
        return ""
    return (f"\nwarning: rate {chosen} is still the edge of every rate tried ({rates[0]} ... {rates[-1]}): the best "
            f"may lie beyond it; a --rate_grid reaching past it would tell")


def _grid_table(points: dict, chosen, method: str, reviews: int, transfer: Optional[Transfer]) -> pd.DataFrame:
    """rate_grid.csv: one row per rate, its best validation, how far it trained, whether it was chosen, and for the
    rate taken from another seed's run (`transfer`), that run."""
    rows = []
    for rate, point in sorted(points.items(), key=lambda item: _first(item[0])):
        best, log = point["best"], point["log"]
        rows.append({"method": method, "train_reviews": reviews,
                     "rates": str(list(rate) if isinstance(rate, tuple) else rate), "first_rate": _first(rate),
                     "best_epoch": int(best["epoch"]), "best_step": int(best.get("step", 0)), "steps": len(log),
                     "status": point["status"], "val_correct": best["correct"], "val_total": best["total"],
                     "val_score": best["score"], "val_restricted_score": best["restricted_score"],
                     "train_seconds": log[-1]["seconds"] if log else 0.0,
                     "cpu_seconds": log[-1].get("cpu_seconds", math.nan) if log else 0.0, "chosen": rate == chosen,
                     "rate_from": transfer.source if transfer and rate == transfer.rate else ""})
    return pd.DataFrame(rows)


def _first(rate) -> float:
    return rate[0] if isinstance(rate, (list, tuple)) else rate


def as_chosen(run_dir: str, config: dict) -> tuple[dict, Optional[float]]:
    """A rate-grid run's config (config.json's keys) and its chosen rate's training seconds; any other run's config
    as it is, and None. A grid of per-epoch lists (the reference's) reads as the plain run of the list it chose,
    which trains the same tensors from the same start on the same batches; a grid of peak rates stays itself, the
    method being the grid with each seed choosing its own rate."""
    if not config.get("rate_grid"):
        return config, None
    grid = pd.read_csv(os.path.join(run_dir, "rate_grid.csv"), dtype={"rates": str})  # peak rates read as text too
    chosen = grid[grid["chosen"]].iloc[0]
    rate = ast.literal_eval(chosen["rates"])
    if not isinstance(rate, list):
        return config, float(chosen["train_seconds"])
    return {**config, "rate_by_epoch": rate, "rate_grid": []}, float(chosen["train_seconds"])


def candidates_seconds(run_dir: str, config: dict, train_seconds: float) -> float:
    """A rate-grid run's training seconds over every candidate it tried (rate_grid.csv); any other run's own."""
    if not config.get("rate_grid"):
        return train_seconds
    return float(pd.read_csv(os.path.join(run_dir, "rate_grid.csv"))["train_seconds"].sum())


def candidates_cpu_seconds(run_dir: str, config: dict) -> Optional[float]:
    """A trained run's CPU seconds over every candidate (rate_grid.csv), or its loss log's; None where they went
    unrecorded (a run of an older version, or a script that times its own training)."""
    grid = bool(config.get("rate_grid"))
    path = os.path.join(run_dir, "rate_grid.csv" if grid else "losses.csv")
    if not os.path.exists(path):
        return None
    seconds = pd.read_csv(path).get("cpu_seconds", pd.Series([math.nan]))
    total = seconds.sum(skipna=False) if grid else seconds.iloc[-1]
    return None if math.isnan(total) else float(total)


def draw(results_dir: str) -> str:
    """rate_grid.png in results_dir: every run's rate_grid.csv there, drawn by plots.rate_grid (one panel per size)."""
    grids = [pd.read_csv(path).sort_values("first_rate")
             for path in sorted(glob.glob(os.path.join(results_dir, "*", "rate_grid.csv")))]
    return plots.rate_grid(grids, os.path.join(results_dir, "rate_grid.png"))
