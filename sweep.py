"""Run a grid of runs, each as its own command line, skip those already in the ledger, then print the table and plot it.

    python sweep.py [--name=value ...]                 # DEFAULT_GRID below; overrides apply to every point
    python sweep.py --grid=cpu_table [--name=value ...]   # the grid of grids/cpu_table.json (or --grid=<path>.json)
    python sweep.py --grid=cpu_table --jobs=2          # two points at once, each on its share of the cores
    python table.py results/                           # then the comparison: seeds pooled, paired tests, figures

Each point runs as `python <script>.py --name=value ...` (any script at the repo root that records a ledger row):
the sweep's overrides (its settings that differ from config.py's), then the point's own. Overriding a key that a point
sets is an error, not a new value for that axis (the point's value would win): edit the grid to sweep other values.

A point is already done when the ledger (RESULTS_DIR/results.csv) has a row of the same script whose run folder's
config.json equals the point's config on every key that can change the result (ledger.result_config), a setting the
run fitted to its data counted as it was asked for (config.json's "asked"). The point's config is its script's
settings (`python <script>.py --help=json`: the sweep never imports a script) with the overrides on top. A point
that fails is reported in one line and the sweep goes on; run the sweep again to retry it. A point whose run folder
checkpointed but stopped before its record (a kill, a session's end) is resumed from there (--resume), not started
again; run one sweep per results folder at a time. With JOBS above 1, that many points run at once, each given
--threads=<cores / JOBS> unless --threads is set, so they share the cores instead of each starting a thread per core.

A grid file is JSON: a list of points, each {"script": name, "<setting>": value, ...}; a point's "each" maps settings
to lists of values, and the point stands for every combination of them (e.g. {"each": {"seed": [0, 1, 2]}}), a
"{seed}" in a string value standing for the combination's value (e.g. "data_dir": "data/rt/seed{seed}"). A point with
"share_rate": true and a rate grid lets its first seed choose the rate; each other seed tries that rate first
(--rate_from=<the first seed's run>) and chooses on its own grid only where the rate does not hold there.
"""
import functools
import glob
import itertools
import json
import os
import re
import subprocess
import sys
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Optional

from harness import cli, errors, files, ledger, tableplots

GRID = ""  # the grid to run: "" (DEFAULT_GRID below), a name in grids/ (e.g. cpu_table), or a path to a .json grid file
JOBS = 1  # points run at once, each on its share of the cores (--threads=<cores / JOBS>, unless --threads is given)
SETTINGS = {"GRID": GRID, "JOBS": JOBS}

# The reference table's primer rows, 4, 8 and 16 vectors under the one-epoch and the three-epoch schedule, plus both
# text prompts.
DEFAULT_GRID = [{"script": "experiment", "primer_length": length, "rate_by_epoch": rates, "rate_scale": "absolute"}
                for rates in ([1e-5], [1e-4, 1e-5, 1e-6]) for length in (4, 8, 16)]
DEFAULT_GRID += [{"script": "prompt_long"}, {"script": "prompt_short"}]
ROOT = os.path.dirname(os.path.abspath(__file__))
TAIL_BYTES = 4096  # of a point's stderr, kept to report its last line when it fails


SOURCE = "rate_from_point"  # a point's key, the sweep's own: the point whose run it takes its rate from


def expand(points: list[dict]) -> list[dict]:
    """The grid's points with each point's "each" axes spelled out, every combination a point of its own; with
    "share_rate", each seed but the first names the first seed's point (SOURCE)."""
    out = []
    for point in points:
        axes = point.get("each", {})
        if point.get("share_rate") and not axes.get("seed"):
            raise errors.UserError(f"a point with \"share_rate\" shares its first seed's rate with the others: give "
                                   f"it \"each\": {{\"seed\": [0, 1, 2]}} ({point})")
        for values in itertools.product(*axes.values()):
            named = dict(zip(axes, values))
            out.append(filled(point, named))
            if point.get("share_rate") and named["seed"] != axes["seed"][0]:
                out[-1][SOURCE] = filled(point, {**named, "seed": axes["seed"][0]})
    return out


def filled(point: dict, named: dict) -> dict:
    """One combination of a point's axes: its own settings filled with the combination's values, and those values."""
    return {**{k: fill(v, named) for k, v in point.items() if k not in ("each", "share_rate")}, **named}


def fill(value, named: dict):
    """A string value with each "{axis}" in it replaced by that axis's value (e.g. a data_dir per seed)."""
    if isinstance(value, str):
        for axis, v in named.items():
            value = value.replace("{" + axis + "}", str(v))
    return value


def load_grid(name: str) -> list[dict]:
    """DEFAULT_GRID for "", else the points of grids/<name>.json or of the .json file at name."""
    if not name:
        return DEFAULT_GRID
    path = name if name.endswith(".json") else os.path.join(ROOT, "grids", f"{name}.json")
    if not os.path.isfile(path):
        names = sorted(f[:-5] for f in os.listdir(os.path.join(ROOT, "grids")) if f.endswith(".json"))
        raise errors.UserError(f"--grid={name}: no grid file {path}: give one of {', '.join(names)} "
                               "or a path to a .json file")
    points = expand(files.read_json(path))
    scripts = sorted({p.get("script") for p in points} - {s[:-3] for s in os.listdir(ROOT) if s.endswith(".py")},
                     key=str)
    if scripts:
        raise errors.UserError(f"{path} names scripts {scripts} that are not at the repo root: give each point a "
                               f"\"script\" such as experiment or probe")
    return points


@functools.cache
def script_settings(script: str) -> dict:
    """A script's settings and their defaults, as `python <script>.py --help=json` prints them."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, f"{script}.py"), "--help=json"], capture_output=True,
                          text=True)
    if done.returncode:
        raise errors.UserError(f"python {script}.py --help=json failed: "
                               f"{(done.stderr.strip().splitlines() or [''])[-1]}")
    return {k.upper(): v for k, v in json.loads(done.stdout).items()}


def read_settings(grid: list[dict]) -> None:
    """script_settings of every script of the grid, their interpreters started side by side."""
    with ThreadPoolExecutor() as pool:
        list(pool.map(script_settings, dict.fromkeys(point["script"] for point in grid)))


def point_args(cfg: SimpleNamespace, point: dict, resume: Optional[str] = None) -> list[str]:
    """The point's command-line overrides: the sweep's own (where they differ from config.py), then the point's; to
    resume a run folder, --resume and those of the sweep's that a resumed run takes (where files go, how it runs)."""
    given = {k: v for k, v in vars(cfg).items() if k not in SETTINGS and v != cli.defaults()[k]}
    if resume:
        return cli.as_args({"RESUME": resume, **{k: v for k, v in {**given, **thread_share(cfg, point)}.items()
                                                 if k in cli.RESUMABLE}})
    return (cli.as_args({**given, **thread_share(cfg, point)})
            + cli.as_args({k: v for k, v in point.items() if k not in ("script", SOURCE)}))


def thread_share(cfg: SimpleNamespace, point: dict) -> dict:
    """A point's share of the cores when JOBS run at once and neither the sweep nor the point sets THREADS: without
    it each run would start one thread per core, and JOBS runs would fight over every core."""
    jobs = jobs_of(cfg)
    if jobs == 1 or cfg.THREADS or "threads" in point:
        return {}
    return {"THREADS": max(1, (os.cpu_count() or 1) // jobs)}


def jobs_of(cfg: SimpleNamespace) -> int:
    """JOBS, or 1 for a config of config.py's settings alone (cli.configure without the sweep's own)."""
    return getattr(cfg, "JOBS", JOBS)


def point_config(cfg: SimpleNamespace, point: dict) -> SimpleNamespace:
    """The config the point's script will run with, checked like its command line."""
    return cli.configure(point_args(cfg, point), script_settings(point["script"]))


def result_key(script: str, config: dict) -> str:
    return json.dumps([script, ledger.result_config(script, config)], sort_keys=True)


def asked_key(script: str, config: dict) -> str:
    """result_key of a run folder's config.json, with the settings it fitted to its data as they were asked for."""
    return result_key(script, {**config, **config.get("asked", {})})


def find_run(script: str, cfg: SimpleNamespace) -> Optional[dict]:
    """The latest ledger row of a run of `script` whose saved config, with the settings it fitted to its data as they
    were asked for, gives the same result as cfg, or None."""
    want = result_key(script, vars(cfg))
    for row in reversed(ledger.rows(cfg.RESULTS_DIR)):
        config = ledger.run_config(cfg.RESULTS_DIR, row) if row["script"] == script else None
        if config is not None and asked_key(script, config) == want:
            return row
    return None


def unfinished_run(script: str, cfg: SimpleNamespace) -> Optional[str]:
    """The latest run folder of `script` in RESULTS_DIR that checkpointed but stopped before its record (no
    metrics.json: a kill, a crash, a session's end) and whose config gives the same result as cfg, or None."""
    want = result_key(script, vars(cfg))
    for folder in sorted(glob.glob(os.path.join(cfg.RESULTS_DIR, f"*-{script}*")), reverse=True):
        if (not re.fullmatch(rf"\d{{8}}-\d{{6}}-{script}(-\d+)?", os.path.basename(folder))
                or os.path.exists(os.path.join(folder, "metrics.json"))
                or not glob.glob(os.path.join(folder, "**", "checkpoint.pt"), recursive=True)):
            continue
        if asked_key(script, files.read_json(os.path.join(folder, "config.json"))) == want:
            return folder
    return None


def run_command(command: list[str]) -> tuple[int, str]:
    """Run a command line, its output passing through; its exit status and the last line it wrote to stderr."""
    tail = b""
    with subprocess.Popen(command, stderr=subprocess.PIPE) as process:
        for chunk in iter(lambda: process.stderr.read1(TAIL_BYTES), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-TAIL_BYTES:]
    lines = tail.decode(errors="replace").replace("\r", "\n").strip().splitlines()
    return process.returncode, lines[-1] if lines else ""


def sweep(cfg: SimpleNamespace, grid: list[dict]) -> tuple[list[dict], list[str]]:
    """Run the grid's points not yet in the ledger, in order, JOBS at a time, each as a command line. Returns the
    ledger row of each point done (in grid order) and the points that failed."""
    read_settings(grid)
    configs = [point_config(cfg, point) for point in grid]  # every point checked before any runs
    runs = {}  # a point's future ledger row, by its index: the points that take their rate from it wait on it
    source = {i: grid.index(grid[i][SOURCE]) for i in range(len(grid)) if SOURCE in grid[i]}
    with ThreadPoolExecutor(max_workers=jobs_of(cfg)) as pool:
        for i in range(len(grid)):  # sources and every other point first, in grid order
            if i not in source:
                runs[i] = pool.submit(run_point, cfg, grid, configs[i], i)
        waiting = sorted(source)
        while waiting:  # a point is queued once its source is done, so none holds a job slot waiting for one
            futures.wait({runs[source[i]] for i in waiting}, return_when=futures.FIRST_COMPLETED)
            for i in [i for i in waiting if runs[source[i]].done()]:
                runs[i] = pool.submit(run_point, cfg, grid, configs[i], i, runs[source[i]])
                waiting.remove(i)
        done = [runs[i].result() for i in range(len(grid))]
    return [row for row, _ in done if row], [name for row, name in done if row is None]


def run_point(cfg: SimpleNamespace, grid: list[dict], point_cfg: SimpleNamespace, i: int,
              source: Optional[futures.Future] = None) -> tuple[Optional[dict], str]:
    """Point i of the grid: its ledger row (already there, or written by running it; None when it failed) and its
    name for one-line reports. With `source` (the done future of the point it takes its rate from), it tries that
    run's rate first."""
    point, at = {k: v for k, v in grid[i].items() if k != SOURCE}, f"sweep {i + 1}/{len(grid)}"
    if source is not None:
        taken, _ = source.result()
        if taken is None:
            print(f"{at}: not run: the point it takes its rate from failed", flush=True)
            return None, " ".join([point["script"], "--rate_from=<a failed point>"])
        point = {**point, "rate_from": os.path.join(cfg.RESULTS_DIR, taken["run_id"])}
        point_cfg = point_config(cfg, point)
    script, own = point["script"], {k: v for k, v in point.items() if k != "script"}
    name = " ".join([script] + cli.as_args(own))
    row = find_run(script, point_cfg)
    if row:
        print(f"{at}: {name}: already in the ledger as {row['run_id']}, skipped", flush=True)
        return row, name
    resume = unfinished_run(script, point_cfg)
    if resume:
        print(f"{at}: {name}: resuming {resume}, which stopped before its record (delete it to start again)",
              flush=True)
    else:
        print(f"{at}: python {script}.py {cli.shell_args(own)}", flush=True)
    status, last = run_command([sys.executable, os.path.join(ROOT, f"{script}.py"), *point_args(cfg, point, resume)])
    row = find_run(script, point_cfg) if status == 0 else None
    if row is None:  # one bad point must not cost the rest of the grid
        print(f"{at}: {name} failed: {last if status else 'it wrote no ledger row'}", flush=True)
    return row, name


def with_schedule(row: dict, results_dir: str) -> dict:
    """A ledger row with its run's LR schedule, by which the figures group trained primers."""
    config = files.read_json(os.path.join(results_dir, row["run_id"], "config.json"))
    return {**row, "lr_schedule": ", ".join(f"{r:g}" for r in config["rate_by_epoch"]) if row["samples"] else ""}


def configure(argv: list[str]) -> SimpleNamespace:
    """The sweep's config from its command line. Overriding a key that a point of the grid sets is an error, since
    the point's own value would win: such a key is changed in the grid."""
    cfg = cli.configure(argv, SETTINGS)
    if cfg.JOBS < 1:
        raise errors.UserError(f"--jobs={cfg.JOBS} must be 1 or more: the points run at once")
    grid = load_grid(cfg.GRID)
    for arg in argv:
        key = arg[2:].split("=")[0].lower()
        values = [repr(p[key]) for p in grid if key in p]
        if values:
            where = f"grid {cfg.GRID}" if cfg.GRID else "sweep.py's DEFAULT_GRID"
            raise errors.UserError(f"{arg} would be ignored: {where} sets {key} for its points "
                                   f"({', '.join(dict.fromkeys(values))}); edit the grid to sweep other values, "
                                   f"or run python {next(p['script'] for p in grid if key in p)}.py {arg} for one run")
    return cfg


def main(cfg: SimpleNamespace) -> None:
    grid = load_grid(cfg.GRID)
    rows, failed = sweep(cfg, grid)
    print(ledger.format_table(rows))
    rows = [with_schedule(row, cfg.RESULTS_DIR) for row in rows]
    if rows:
        for path in (tableplots.score_plot(rows, os.path.join(cfg.RESULTS_DIR, "scores.png")),
                     tableplots.losses_plot(rows, cfg.RESULTS_DIR, os.path.join(cfg.RESULTS_DIR, "losses.png"))):
            print(f"saved {path}")
    print(f"the comparison: python table.py {cfg.RESULTS_DIR}")
    if failed:
        raise errors.UserError(f"{len(failed)} of {len(grid)} points failed ({'; '.join(failed)}): "
                               "run the sweep again to retry them")


if __name__ == "__main__":
    cli.main(main, SETTINGS, parse=configure)
