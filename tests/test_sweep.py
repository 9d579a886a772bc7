import json
import os
import threading
import time

import matplotlib.image
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import experiment
import probe
import sweep
import table
import tune
from conftest import overrides, run_script, run_until_first_checkpoint
from harness import cli, data, errors, files, ledger, plots, scoring, tableplots


def assert_png(path) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0  # a drawn picture, not a blank


def ledger_frame(out) -> pd.DataFrame:
    return pd.DataFrame(ledger.rows(str(out / "results")))


def grid_args(tiny, out, grid: list[dict]) -> list[str]:
    """The tiny model's overrides less the keys the grid sets (those are refused)."""
    keys = {f"--{key}=" for point in sweep.expand(grid) for key in point}
    return [arg for arg in overrides(tiny, out) if not arg.startswith(tuple(keys))]


def test_a_grid_runs_as_command_lines_reports_failures_and_then_skips_what_is_done(tiny, tmp_path, capfd):
    grid = [{"script": "experiment", "rate_by_epoch": [0.1], "primer_length": 2},
            {"script": "experiment", "primer_path": f"{tmp_path}/missing.safetensors"},
            {"script": "prompt_short"},
            {"script": "probe", "pooling": "last"}]  # its VAL_LIMIT and PROBE_TRAIN are fitted to 100 reviews
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(grid))
    cfg = sweep.configure(grid_args(tiny, tmp_path, grid) + [f"--grid={path}"])
    with pytest.raises(errors.UserError, match=r"^1 of 4 points failed \(experiment --primer_path="):
        sweep.main(cfg)
    out = capfd.readouterr().out
    assert (f"sweep 2/4: experiment --primer_path='{tmp_path}/missing.safetensors' failed: "
            f"error: --primer_path={tmp_path}/missing" in out)
    first = ledger_frame(tmp_path)
    assert first["script"].tolist() == ["experiment", "prompt_short", "probe"] and first["tokens"][0] == 2
    assert first["samples"].tolist() == [100, 0, 100] and first["method"][0] == "primer"
    probed = files.read_json(str(tmp_path / "results" / first["run_id"][2] / "config.json"))
    assert probed["val_limit"] == 20 and probed["probe_train"] < probe.PROBE_TRAIN  # used; below, what was asked
    assert probed["asked"] == {"val_limit": probe.VAL_LIMIT, "probe_train": probe.PROBE_TRAIN}
    config = files.read_json(str(tmp_path / "results" / first["run_id"][0] / "config.json"))
    assert config["primer_length"] == 2 and config["rate_by_epoch"] == [0.1] and config["train_limit"] == 100
    table = out[out.rindex("| Run |"):]  # the combined table printed last
    assert table.count(" | primer | 100 | ") == 1 and "-prompt_short | text prompt | – | – |" in table
    for name in ("scores.png", "losses.png", *(f"{run}/loss.png" for run in first["run_id"][:1])):
        assert_png(tmp_path / "results" / name)

    done = [grid[0], grid[2], grid[3]]  # everything else is in the ledger now: nothing runs again
    rows, failed = sweep.sweep(cfg, sweep.expand(done))
    assert capfd.readouterr().out.count("already in the ledger") == 3 and not failed
    assert [r["run_id"] for r in rows] == first["run_id"].tolist() and ledger_frame(tmp_path).equals(first)
    point = {"script": "experiment", "primer_length": 2, "rate_by_epoch": [0.1]}
    assert (sweep.find_run("experiment", sweep.point_config(cfg, {**point, "score_batch_size": 7}))["run_id"]
            == first["run_id"][0])
    assert sweep.find_run("experiment", sweep.point_config(cfg, {**point, "batch_size": 5})) is None
    text = {"script": "prompt_short"}
    same = sweep.point_config(cfg, {**text, "train_limit": 50, "rate_by_epoch": [1.0]})  # no effect on a text prompt
    assert sweep.find_run("prompt_short", same)["run_id"] == first["run_id"][1]
    assert sweep.find_run("prompt_short", sweep.point_config(cfg, {**text, "test_limit": 50})) is None
    shots = sweep.point_config(cfg, {**text, "shots": 2})  # its examples are training reviews: their limit counts
    assert sweep.find_run("prompt_short", shots) is None and ledger.result_config("prompt_short", {
        **vars(shots), "TRAIN_LIMIT": 50}) != ledger.result_config("prompt_short", vars(shots))
    assert sweep.find_run("prompt_short", sweep.point_config(cfg, {**text, "labels": ["a", "b"]})) is None
    assert sweep.find_run("prompt_long", sweep.point_config(cfg, {"script": "prompt_long"})) is None


def test_jobs_run_points_at_once_each_on_its_share_of_the_cores(monkeypatch, capsys):
    grid = [{"script": "prompt_short", "seed": seed} for seed in range(5)]
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(sweep, "read_settings", lambda grid: None)
    monkeypatch.setattr(sweep, "point_config", lambda cfg, point: point)  # the point stands for its config
    done, running, most, lock = set(), [0], [0], threading.Lock()
    monkeypatch.setattr(sweep, "find_run",
                        lambda script, point: {"run_id": f"seed{point['seed']}"} if point["seed"] in done else None)
    monkeypatch.setattr(sweep, "unfinished_run", lambda script, point: None)  # nothing stopped midway

    def run_command(command):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
            done.add(int(command[-1].removeprefix("--seed=")))
        commands.append(command)
        return 0, ""
    monkeypatch.setattr(sweep, "run_command", run_command)
    commands = []
    rows, failed = sweep.sweep(sweep.configure(["--jobs=2"]), grid)
    assert most[0] == 2 and [r["run_id"] for r in rows] == [f"seed{s}" for s in range(5)] and not failed  # grid order
    assert all(c.count("--threads=4") == 1 for c in commands)  # 8 cores, 2 at once
    done.clear(), commands.clear()
    sweep.sweep(sweep.configure(["--jobs=2", "--threads=1"]), grid)  # a given --threads wins
    assert all("--threads=1" in c and "--threads=4" not in c for c in commands)
    done.clear(), commands.clear()
    sweep.sweep(sweep.configure([]), grid)  # one at a time: each run keeps the libraries' default
    assert not any(arg.startswith("--threads") for c in commands for arg in c)
    with pytest.raises(errors.UserError, match=r"^--jobs=0 must be 1 or more"):
        sweep.configure(["--jobs=0"])


def test_a_point_waiting_for_its_rate_source_leaves_its_slot_to_a_point_that_can_run(monkeypatch):
    slow, fast = {"script": "prompt_short", "seed": 0}, {"script": "prompt_short", "seed": 2}
    grid = [slow, {"script": "prompt_short", "seed": 1, sweep.SOURCE: slow}, fast,
            {"script": "prompt_short", "seed": 3, sweep.SOURCE: fast}]
    monkeypatch.setattr(sweep, "read_settings", lambda grid: None)
    monkeypatch.setattr(sweep, "point_config", lambda cfg, point: point)
    monkeypatch.setattr(sweep, "unfinished_run", lambda script, point: None)
    done, started, third_started, beside = set(), [], threading.Event(), []
    monkeypatch.setattr(sweep, "find_run",
                        lambda script, point: {"run_id": f"seed{point['seed']}"} if point["seed"] in done else None)

    def run_command(command):  # seed 0 runs until seed 3 has started, or gives up after 10 s
        seed = int(next(arg for arg in command if arg.startswith("--seed=")).removeprefix("--seed="))
        started.append(seed)
        if seed == 3:
            third_started.set()
        if seed == 0:
            beside.append(third_started.wait(timeout=10))
        done.add(seed)
        return 0, ""
    monkeypatch.setattr(sweep, "run_command", run_command)
    rows, failed = sweep.sweep(sweep.configure(["--jobs=2"]), grid)
    assert not failed and [r["run_id"] for r in rows] == ["seed0", "seed1", "seed2", "seed3"]
    assert beside == [True] and started[-1] == 1  # seed 3 ran beside seed 0 while seed 1 waited for it in no slot


def test_unknown_grid_key_stops_before_anything_runs(tiny, tmp_path):
    cfg = cli.configure(overrides(tiny, tmp_path))
    with pytest.raises(errors.UserError, match="unknown config key --primer_lenght"):
        sweep.sweep(cfg, [{"script": "prompt_short"}, {"script": "experiment", "primer_lenght": 8}])
    assert not os.path.exists(tmp_path / "results")


def test_grid_files_expand_their_axes_and_name_root_scripts(tmp_path):
    assert sweep.expand([{"script": "a", "x": [1], "each": {"seed": [0, 1], "n": [5, 6]}}]) == [
        {"script": "a", "x": [1], "seed": s, "n": n} for s in (0, 1) for n in (5, 6)]
    with pytest.raises(errors.UserError,
                       match=r"^--grid=nope: no grid file .*grids/nope.json: give one of .*cpu_table"):
        sweep.load_grid("nope")
    (tmp_path / "bad.json").write_text(json.dumps([{"script": "experiment"}, {"script": "tests/conftest"}]))
    with pytest.raises(errors.UserError, match=r"names scripts \['tests/conftest'\] that are not at the repo root"):
        sweep.load_grid(str(tmp_path / "bad.json"))


METHOD_KEYS = {"tune": "METHOD", "experiment": "PRIMER_LENGTH", "steer": "VECTOR"}  # what names a script's method


def what(script: str, c) -> object:
    return getattr(c, METHOD_KEYS[script]) if script in METHOD_KEYS else None


def test_the_published_tables_grid_chooses_each_rate_on_validation_then_runs_more_seeds_and_the_data_curve(tiny,
                                                                                                           tmp_path):
    """grids/cpu_table.json, the README's table: every point is a valid command line of its script (its own settings
    read with --help=json), none twice, all on one test split; every trained method has a rate grid at seed 0 on 300
    snippets (chosen on validation reviews) and seeds 1 and 2 at one of its schedules; the data curve runs that
    schedule of both primers, the learned vector and IA3, and the probe, on 100 to 2,000 snippets."""
    grid = sweep.load_grid("cpu_table")
    sweep.read_settings(grid)
    configs = [sweep.point_config(cli.configure(overrides(tiny, tmp_path)), point) for point in grid]
    assert len({sweep.result_key(p["script"], vars(c)) for p, c in zip(grid, configs)}) == len(grid)
    assert all(c.VAL_LIMIT == 200 and c.TEST_LIMIT == 400 and c.SEED in (0, 1, 2) for c in configs)  # one test split
    assert {c.SEARCH for p, c in zip(grid, configs) if p["script"] == "search_prompt"} == {"edit", "tokens"}
    trained, curve = {}, {}
    for point, c in zip(grid, configs):
        script = point["script"]
        method = what(script, c)
        size = c.PROBE_TRAIN if script == "probe" else c.TRAIN_LIMIT - c.VAL_LIMIT
        curve.setdefault((script, method), set()).add(size)
        if script in ("experiment", "tune", "steer") and size == 300:
            trained.setdefault((script, method), {})[c.SEED] = c
        if script == "probe":
            assert c.TRAIN_LIMIT - c.VAL_LIMIT == size and c.PROBE_C == [1e-3, 1e-2, 1e-1, 1.0], point
    assert set(trained) >= {("experiment", 4), ("experiment", 16), ("steer", "learned"),
                            *(("tune", m) for m in tune.METHODS)}
    for method, seeds in trained.items():
        assert sorted(seeds) == [0, 1, 2] and len(seeds[0].RATE_GRID) >= 3, method
        assert all(not seeds[s].RATE_GRID and seeds[s].RATE_BY_EPOCH in seeds[0].RATE_GRID for s in (1, 2)), method
    for method in (("experiment", 4), ("experiment", 16), ("steer", "learned"), ("tune", "ia3"), ("probe", None)):
        assert curve[method] >= {100, 300, 1000, 2000}, method
    for point, c in zip(grid, configs):  # the curve trains at the schedule chosen on 300 snippets
        method = what(point["script"], c)
        if (point["script"], method) in trained and not c.RATE_GRID:
            assert c.RATE_BY_EPOCH == trained[point["script"], method][1].RATE_BY_EPOCH, point


def test_an_override_of_a_grid_key_is_refused_naming_the_grid():
    result = run_script("sweep.py", "--train_limit=100", "--primer_length=32", "--rate_by_epoch=[0.1]")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: --primer_length=32 would be ignored: sweep.py's DEFAULT_GRID sets primer_length for its points "
        "(4, 8, 16); "
        "edit the grid to sweep other values, or run python experiment.py --primer_length=32 for one run"]
    with pytest.raises(errors.UserError,
                       match=r"DEFAULT_GRID sets rate_by_epoch for its points \(\[1e-05\], \[0.0001, 1e-05, 1e-06\]\)"):
        sweep.configure(["--rate_by_epoch=[0.1]"])
    assert sweep.configure(["--train_limit=100"]).TRAIN_LIMIT == 100


def drawn_figure(monkeypatch, draw):
    """The figure that draw() saves."""
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or path)
    draw()
    return figures[0]


def test_scores_figure_draws_the_wilson_intervals(monkeypatch):
    def row(script, tokens, correct, method="primer", total=200):
        low, high = scoring.wilson_interval(correct, total)
        rlow, rhigh = scoring.wilson_interval(correct + 10, total)
        return {"script": script, "method": method, "tokens": tokens, "lr_schedule": "0.1", "score": correct / total,
                "score_low": low, "score_high": high, "restricted_score": (correct + 10) / total,
                "restricted_low": rlow, "restricted_high": rhigh}
    rows = [row("experiment", 4, 150), row("experiment", 8, 170), row("prompt_short", 30, 110, "text prompt"),
            row("experiment", 4, 120, "primer (suffix)")]
    fig = drawn_figure(monkeypatch, lambda: tableplots.score_plot(rows, "unused.png"))
    for ax, name in zip(fig.axes, ("score", "restricted")):
        bars, _ = ax.containers  # one line with error bars per position and schedule
        assert [c.get_label() for c in ax.containers] == ["primer, lr 0.1", "primer (suffix), lr 0.1"]
        spans = [list(segment[:, 1]) for segment in bars.lines[2][0].get_segments()]  # each bar's (low, high)
        assert sum(spans, []) == pytest.approx([100 * r[f"{name}_{end}"] for r in rows[:2] for end in ("low", "high")])
        (band,) = ax.patches  # the text prompt's interval
        prompt = rows[2]
        assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx((100 * prompt[f"{name}_low"],
                                                                                 100 * prompt[f"{name}_high"]))


def test_losses_figure_marks_each_runs_epoch_boundaries(tmp_path, monkeypatch):
    for run, steps_per_epoch in (("a", 5), ("b", 3)):
        (tmp_path / run).mkdir()
        epochs = [e for e in (1, 2, 3) for _ in range(steps_per_epoch)]
        pd.DataFrame({"step": range(1, len(epochs) + 1), "epoch": epochs, "loss": 1.0}).to_csv(
            tmp_path / run / "losses.csv")
    rows = [{"run_id": run, "method": "primer", "tokens": 4, "lr_schedule": "0.1, 0.1, 0.1"} for run in ("a", "b")]
    fig = drawn_figure(monkeypatch, lambda: tableplots.losses_plot(rows, str(tmp_path), "unused.png"))
    curves = [line for line in fig.axes[0].lines if line.get_linestyle() == "-"]
    marks = [(line.get_xdata()[0], line.get_color()) for line in fig.axes[0].lines if line.get_linestyle() == ":"]
    assert marks == [(5.5, curves[0].get_color()), (10.5, curves[0].get_color()),
                     (3.5, curves[1].get_color()), (6.5, curves[1].get_color())]


def test_the_converged_table_and_its_curve_share_one_validation_set_and_nest_their_training_sets(tiny, tmp_path):
    """grids/cpu_converged.json and grids/cpu_curve.json: valid command lines, three seeds at every method and size,
    the curve's sizes 100 to 2,000 drawn from the table's TRAIN_LIMIT and VAL_LIMIT (so one validation set and nested
    training sets: data.training_sets), each data folder holding one sample."""
    grid = sweep.expand(sweep.load_grid("cpu_converged")) + sweep.expand(sweep.load_grid("cpu_curve"))
    sweep.read_settings(grid)
    configs = [sweep.point_config(cli.configure(overrides(tiny, tmp_path)), point) for point in grid]
    assert len({sweep.result_key(p["script"], vars(c)) for p, c in zip(grid, configs)}) == len(grid)
    assert {(c.TRAIN_LIMIT, c.VAL_LIMIT, c.TEST_LIMIT) for c in configs} == {(500, 200, 400)}
    seeds, folders = {}, {}
    for point, c in zip(grid, configs):
        size = c.TRAIN_REVIEWS or c.TRAIN_LIMIT - c.VAL_LIMIT
        assert point["script"] != "probe" or c.PROBE_TRAIN == size, point
        seeds.setdefault((what(point["script"], c), size), set()).add(c.SEED)
        sample = (data.extra_reviews(c.TRAIN_LIMIT, c.VAL_LIMIT, c.TRAIN_REVIEWS), c.SEED)
        assert folders.setdefault(c.DATA_DIR, sample) == sample, point  # one prepared sample per folder
    assert all(found == {0, 1, 2} for found in seeds.values()), seeds
    for method in (4, 16, "learned", "ia3", None):
        assert {size for m, size in seeds if m == method} == {100, 300, 1000, 2000}, method


def test_a_point_stopped_before_its_record_is_resumed_to_what_a_straight_run_gives(tiny, tmp_path, monkeypatch,
                                                                                  capfd):
    grid = [{"script": "experiment", "rate_grid": [0.3, 0.1, 0.03], "val_limit": 20, "epochs": 1, "rate_by_epoch": []}]
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    killed, straight = (sweep.configure(grid_args(tiny, tmp_path / name, grid) + [f"--grid={tmp_path}/grid.json"])
                        for name in ("killed", "straight"))
    run_until_first_checkpoint(lambda: experiment.run(sweep.point_config(killed, grid[0])), monkeypatch)
    (folder,) = os.listdir(tmp_path / "killed" / "results")
    assert sweep.unfinished_run("experiment", sweep.point_config(killed, grid[0])) == str(
        tmp_path / "killed" / "results" / folder)
    assert sweep.unfinished_run("experiment", sweep.point_config(killed, {**grid[0], "seed": 1})) is None
    for cfg in (killed, straight):
        rows, failed = sweep.sweep(cfg, grid)
        assert len(rows) == 1 and not failed
    out = capfd.readouterr()
    assert f"resuming {tmp_path}/killed/results/{folder}, which stopped before its record" in out.out
    assert f"resuming {tmp_path}/killed/results/{folder}/rates_0 at epoch 1, batch " in out.out  # its checkpoint
    (row,) = ledger.rows(str(tmp_path / "killed" / "results"))
    assert row["run_id"] == folder  # the stopped folder finished, no second one started
    other = ledger_frame(tmp_path / "straight")["run_id"][0]
    resumed, whole = (load_file(str(tmp_path / name / "results" / run / "primer.safetensors"))["primer"]
                      for name, run in (("killed", folder), ("straight", other)))
    assert torch.equal(resumed, whole)
    assert sweep.unfinished_run("experiment", sweep.point_config(killed, grid[0])) is None  # it has its record now


def test_a_shared_rate_is_taken_from_the_first_seeds_run_and_the_sweep_then_skips_both(tiny, tmp_path, capfd):
    grid = [{"script": "experiment", "rate_grid": [0.3, 0.1, 0.03], "val_limit": 20, "epochs": 1, "rate_by_epoch": [],
             "share_rate": True, "each": {"seed": [0, 1]}}]
    (tmp_path / "grid.json").write_text(json.dumps(grid))
    cfg = sweep.configure(grid_args(tiny, tmp_path, grid) + [f"--grid={tmp_path}/grid.json", "--jobs=2"])
    rows, failed = sweep.sweep(cfg, sweep.load_grid(cfg.GRID))
    assert not failed and [row["run_id"] for row in rows] == list(ledger_frame(tmp_path)["run_id"])  # seed 0 first
    first, second = (files.read_json(f"{cfg.RESULTS_DIR}/{row['run_id']}/config.json") for row in rows)
    assert first["rate_from"] is None and second["rate_from"] == f"{cfg.RESULTS_DIR}/{rows[0]['run_id']}"
    assert rows[0]["run_id"] in set(pd.read_csv(f"{cfg.RESULTS_DIR}/{rows[1]['run_id']}/rate_grid.csv")["rate_from"])
    (pooled,) = table.summarize(table.load_runs(cfg.RESULTS_DIR)).itertuples()
    assert pooled.seeds == 2  # one row: the seed that took its rate pools with the one it took it from
    chosen = pd.read_csv(f"{cfg.RESULTS_DIR}/{rows[0]['run_id']}/rate_grid.csv").query("chosen")["first_rate"].iloc[0]
    assert f"| 1 | seed 0's {chosen:g}" in table.rate_choices(table.load_runs(cfg.RESULTS_DIR), cfg.RESULTS_DIR,
                                                                     rows[0]["samples"])
    assert sweep.sweep(cfg, sweep.load_grid(cfg.GRID))[0] == rows  # both found in the ledger, nothing run again
    assert capfd.readouterr().out.count("already in the ledger") == 2
    with pytest.raises(errors.UserError, match='a point with "share_rate" shares its first seed'):
        sweep.expand([{"script": "experiment", "share_rate": True}])
