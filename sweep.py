"""Run a grid of configs one after another, skip those already in the ledger, then print the table and plot it.

    python sweep.py [--name=value ...]     # overrides apply to every point, e.g. --train_limit=5600 --test_limit=2400

Overriding a key that a point of GRID sets is an error, not a new value for that axis (the point's value would win):
edit GRID to sweep other values.

Each point runs in this process through the same code as its script. A point is already done when the ledger
(RESULTS_DIR/results.csv) has a row of the same script whose run folder's config.json equals the point's config on
every key that can change the result: all keys but IGNORED_KEYS, and for a text prompt also TRAINING_KEYS. A point
that fails is reported in one line and the sweep goes on; run the sweep again to retry it.
"""
import json
import os
import traceback
from types import SimpleNamespace
from typing import Callable, Optional

import experiment
import prompt_long
import prompt_short
from harness import cli, errors, files, ledger, plots, runs, training

# Each point: the script that runs it, and overrides (command-line names) on top of the sweep's own config. The
# default is the reference table's primer rows, 4, 8 and 16 vectors under the one-epoch and the three-epoch
# schedule, plus both text prompts.
GRID = [{"script": "experiment", "primer_length": length, "rate_by_epoch": rates, "rate_scale": "absolute"}
        for rates in ([1e-5], [1e-4, 1e-5, 1e-6]) for length in (4, 8, 16)]
GRID += [{"script": "prompt_long"}, {"script": "prompt_short"}]

IGNORED_KEYS = cli.RESUMABLE - {"DEVICE"}  # what a resume may change, but for the device (CPU and GPU differ)
TRAINING_KEYS = {"TRAIN_LIMIT", "BATCH_SIZE", "PRIMER_LENGTH", "RATE_BY_EPOCH", "RATE_SCALE", "PRIMER_PATH", "PRIMER_POSITION",
                 "PRIMER_INIT", "VAL_LIMIT", "KEEP_BEST"}  # a text prompt uses none


def text_prompt(module) -> Callable[[SimpleNamespace], str]:
    """What `python prompt_long.py` (or prompt_short.py) runs."""
    return lambda cfg: runs.score_text_prompt(cfg, module.__name__, module.SYSTEM, module.USER)


SCRIPTS = {"experiment": experiment.run, "prompt_long": text_prompt(prompt_long), "prompt_short": text_prompt(prompt_short)}
EXTRAS = {}  # a script's own constants (what its cli.main takes as extra), which its grid points may set


def point_config(cfg: SimpleNamespace, overrides: dict, script: str = "experiment") -> SimpleNamespace:
    """cfg with a grid point's overrides on top, checked like command-line ones (a script's own constants too)."""
    return cli.configure(cli.as_args(vars(cfg)) + cli.as_args(overrides), EXTRAS.get(script))


def result_key(script: str, config: dict) -> str:
    """What decides a run's result: its script and its config (any key case), less the keys that cannot change it."""
    ignored = IGNORED_KEYS if script == "experiment" else IGNORED_KEYS | TRAINING_KEYS
    return json.dumps([script, {k.upper(): v for k, v in config.items() if k.upper() not in ignored}], sort_keys=True)


def find_run(script: str, cfg: SimpleNamespace) -> Optional[dict]:
    """The latest ledger row of a run of `script` whose saved config gives the same result key as cfg, or None."""
    want = result_key(script, vars(cfg))
    for row in reversed(ledger.rows(cfg.RESULTS_DIR)):
        path = os.path.join(cfg.RESULTS_DIR, row["run_id"], "config.json")
        if row["script"] == script and os.path.exists(path) and result_key(script, files.read_json(path)) == want:
            return row
    return None


def one_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def sweep(cfg: SimpleNamespace, grid: list[dict]) -> tuple[list[dict], list[str]]:
    """Run the grid's points not yet in the ledger, in order. Returns the ledger row of each point done (in grid
    order) and the points that failed."""
    unknown = [p["script"] for p in grid if p["script"] not in SCRIPTS]
    if unknown:
        raise errors.UserError(f"grid scripts {unknown} are not among {sorted(SCRIPTS)}")
    points = [(p["script"], {k: v for k, v in p.items() if k != "script"}) for p in grid]
    configs = [point_config(cfg, overrides, script) for script, overrides in points]  # every point checked before any runs
    rows, failed = [], []
    for i, ((script, overrides), point_cfg) in enumerate(zip(points, configs), 1):
        name = " ".join([script] + cli.as_args(overrides))
        row = find_run(script, point_cfg)
        if row:
            print(f"sweep {i}/{len(grid)}: {name}: already in the ledger as {row['run_id']}, skipped", flush=True)
            rows.append(row)
            continue
        print(f"sweep {i}/{len(grid)}: {name}", flush=True)
        try:
            SCRIPTS[script](point_cfg)
        except training.Interrupted:  # Ctrl-C stops the sweep, not just this point
            raise
        except Exception as e:  # one bad point must not cost the rest of the grid
            if not isinstance(e, errors.UserError):
                traceback.print_exc()  # an unexpected failure keeps its traceback, as everywhere else
            print(f"sweep {i}/{len(grid)}: {name} failed: {one_line(e)}", flush=True)
            failed.append(name)
            continue
        rows.append(find_run(script, point_cfg))
    return rows, failed


def with_schedule(row: dict, results_dir: str) -> dict:
    """A ledger row with its run's LR schedule, by which the figures group trained primers."""
    config = files.read_json(os.path.join(results_dir, row["run_id"], "config.json"))
    return {**row, "lr_schedule": ", ".join(f"{r:g}" for r in config["rate_by_epoch"]) if row["samples"] else ""}


def configure(argv: list[str]) -> SimpleNamespace:
    """The sweep's config from its command line. Overriding a key that a point of GRID sets is an error, since
    the point's own value would win: such a key is changed in GRID."""
    cfg = cli.configure(argv)
    for arg in argv:
        key = arg[2:].split("=")[0].lower()
        values = [repr(p[key]) for p in GRID if key in p]
        if values:
            raise errors.UserError(f"{arg} would be ignored: sweep.py's GRID sets {key} for its points "
                                f"({', '.join(dict.fromkeys(values))}); edit GRID in sweep.py to sweep other values, "
                                f"or run python experiment.py {arg} for one run")
    return cfg


def main(cfg: SimpleNamespace) -> None:
    rows, failed = sweep(cfg, GRID)
    print(ledger.format_table(rows))
    rows = [with_schedule(row, cfg.RESULTS_DIR) for row in rows]
    if rows:
        for path in (plots.score_plot(rows, os.path.join(cfg.RESULTS_DIR, "scores.png")),
                     plots.losses_plot(rows, cfg.RESULTS_DIR, os.path.join(cfg.RESULTS_DIR, "losses.png"))):
            print(f"saved {path}")
    if failed:
        raise errors.UserError(f"{len(failed)} of {len(GRID)} points failed ({'; '.join(failed)}): run the sweep again to retry them")


if __name__ == "__main__":
    cli.main(main, parse=configure)
