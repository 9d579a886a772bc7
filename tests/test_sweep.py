import os

import matplotlib.image
import pandas as pd
import pytest

import sweep
from conftest import overrides, run_script
from harness import cli, errors, files, ledger, plots, runs, scoring, training

TWO_POINTS = [{"script": "experiment", "primer_length": 2, "rate_by_epoch": [0.1]},
              {"script": "experiment", "primer_length": 4, "rate_by_epoch": [0.1], "primer_position": "suffix"}]


def assert_png(path) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0  # a drawn picture, not a blank


def ledger_frame(out) -> pd.DataFrame:
    return pd.DataFrame(ledger.rows(str(out / "results")))


def test_two_point_sweep_plots_and_then_skips_what_is_done(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "GRID", TWO_POINTS)
    cfg = cli.configure(overrides(tiny, tmp_path))
    sweep.main(cfg)
    out = capsys.readouterr().out
    first = ledger_frame(tmp_path)
    assert first["script"].tolist() == ["experiment"] * 2 and first["tokens"].tolist() == [2, 4]
    assert (first["samples"] == 100).all() and first["method"].tolist() == ["primer", "primer (suffix)"]
    table = out[out.rindex("| Run |"):]  # the combined table printed last
    assert table.count(" | primer | 100 | ") == table.count(" | primer (suffix) | 100 | ") == 1
    for name in ("scores.png", "losses.png", *(f"{run}/loss.png" for run in first["run_id"])):
        assert_png(tmp_path / "results" / name)

    sweep.main(cfg)  # everything is in the ledger now: nothing runs again
    assert capsys.readouterr().out.count("already in the ledger") == 2
    assert ledger_frame(tmp_path).equals(first)
    point = {k: v for k, v in TWO_POINTS[0].items() if k != "script"}
    assert sweep.find_run("experiment", sweep.point_config(cfg, {**point, "score_batch_size": 7}))["run_id"] == first["run_id"][0]
    assert sweep.find_run("experiment", sweep.point_config(cfg, {**point, "batch_size": 5})) is None


def test_result_key_tells_which_runs_are_the_same(tiny, tmp_path):
    cfg = cli.configure(overrides(tiny, tmp_path))
    sweep.sweep(cfg, [{"script": "prompt_short"}])
    (row,) = ledger_frame(tmp_path).to_dict("records")
    same = sweep.point_config(cfg, {"score_batch_size": 7, "train_limit": 50, "rate_by_epoch": [1.0]})  # no effect on a text prompt
    assert sweep.find_run("prompt_short", same)["run_id"] == row["run_id"]
    assert sweep.find_run("prompt_long", cfg) is None
    assert sweep.find_run("prompt_short", sweep.point_config(cfg, {"test_limit": 50})) is None
    assert sweep.find_run("prompt_short", sweep.point_config(cfg, {"labels": ["a", "b"]})) is None


def test_command_line_reports_failed_points_and_goes_on(tiny, tmp_path):
    """The default grid with a primer that does not exist: every primer point fails, the text prompts still run."""
    grid_keys = {f"--{key}=" for point in sweep.GRID for key in point}  # the grid's own values: not overridable
    args = [arg for arg in overrides(tiny, tmp_path) if not arg.startswith(tuple(grid_keys))]
    result = run_script("sweep.py", *args, f"--primer_path={tmp_path}/missing.safetensors")
    assert result.returncode == 1
    primer_points = sum(p["script"] == "experiment" for p in sweep.GRID)
    assert result.stdout.count("failed: UserError: --primer_path=") == primer_points
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {primer_points} of {len(sweep.GRID)} points failed")
    assert ledger_frame(tmp_path)["script"].tolist() == ["prompt_long", "prompt_short"]
    table = result.stdout[result.stdout.rindex("| Run |"):]
    assert "-prompt_long | text prompt | – | – |" in table and "-prompt_short | text prompt | – | – |" in table
    for name in ("scores.png", "losses.png"):
        assert_png(tmp_path / "results" / name)


def test_unknown_grid_key_stops_before_anything_runs(tiny, tmp_path):
    cfg = cli.configure(overrides(tiny, tmp_path))
    with pytest.raises(errors.UserError, match="unknown config key --primer_lenght"):
        sweep.sweep(cfg, [{"script": "prompt_short"}, {"script": "experiment", "primer_lenght": 8}])
    assert not os.path.exists(tmp_path / "results")


def test_unexpected_failure_keeps_its_traceback_and_the_sweep_goes_on(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sweep.SCRIPTS, "prompt_long", lambda cfg: 1 / 0)
    rows, failed = sweep.sweep(cli.configure(overrides(tiny, tmp_path)), [{"script": "prompt_long"}, {"script": "prompt_short"}])
    captured = capsys.readouterr()
    assert "Traceback" in captured.err and "sweep 1/2: prompt_long failed: ZeroDivisionError: division by zero" in captured.out
    assert failed == ["prompt_long"] and [r["script"] for r in rows] == ["prompt_short"]


def test_ctrl_c_stops_the_whole_sweep(tiny, tmp_path, monkeypatch):
    def interrupted(cfg):
        raise training.Interrupted("interrupted; checkpoint saved")
    monkeypatch.setitem(sweep.SCRIPTS, "prompt_long", interrupted)
    with pytest.raises(training.Interrupted):
        sweep.sweep(cli.configure(overrides(tiny, tmp_path)), [{"script": "prompt_long"}, {"script": "prompt_short"}])
    assert not os.path.exists(tmp_path / "results" / "results.csv")  # prompt_short never ran


def test_an_override_of_a_grid_key_is_refused_naming_the_grid():
    result = run_script("sweep.py", "--train_limit=100", "--primer_length=32", "--rate_by_epoch=[0.1]")
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: --primer_length=32 would be ignored: sweep.py's GRID sets primer_length for its points (4, 8, 16); "
        "edit GRID in sweep.py to sweep other values, or run python experiment.py --primer_length=32 for one run"]
    with pytest.raises(errors.UserError, match=r"GRID sets rate_by_epoch for its points \(\[1e-05\], \[0.0001, 1e-05, 1e-06\]\)"):
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
                "score_low": low, "score_high": high, "restricted_score": (correct + 10) / total, "restricted_low": rlow,
                "restricted_high": rhigh}
    rows = [row("experiment", 4, 150), row("experiment", 8, 170), row("prompt_short", 30, 110, "text prompt"),
            row("experiment", 4, 120, "primer (suffix)")]
    fig = drawn_figure(monkeypatch, lambda: plots.score_plot(rows, "unused.png"))
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
        pd.DataFrame({"step": range(1, len(epochs) + 1), "epoch": epochs, "loss": 1.0}).to_csv(tmp_path / run / "losses.csv")
    rows = [{"run_id": run, "method": "primer", "tokens": 4, "lr_schedule": "0.1, 0.1, 0.1"} for run in ("a", "b")]
    fig = drawn_figure(monkeypatch, lambda: plots.losses_plot(rows, str(tmp_path), "unused.png"))
    curves = [line for line in fig.axes[0].lines if line.get_linestyle() == "-"]
    marks = [(line.get_xdata()[0], line.get_color()) for line in fig.axes[0].lines if line.get_linestyle() == ":"]
    assert marks == [(5.5, curves[0].get_color()), (10.5, curves[0].get_color()),
                     (3.5, curves[1].get_color()), (6.5, curves[1].get_color())]


def test_a_scripts_own_constants_reach_its_grid_points_and_their_runs(tiny, tmp_path, monkeypatch):
    def probe(cfg):  # a method script with a constant of its own, LAYER, that records a run
        run_dir = runs.start_run(cfg, "probe")
        ledger.append(cfg.RESULTS_DIR, {"run_id": os.path.basename(run_dir), "script": "probe", "status": "finished"})
    monkeypatch.setitem(sweep.SCRIPTS, "probe", probe)
    monkeypatch.setitem(sweep.EXTRAS, "probe", {"LAYER": 8})
    cfg = cli.configure(overrides(tiny, tmp_path))
    grid = [{"script": "probe", "layer": 3}, {"script": "probe"}]
    rows, failed = sweep.sweep(cfg, grid)
    assert not failed and [files.read_json(str(tmp_path / "results" / r["run_id"] / "config.json"))["layer"] for r in rows] == [3, 8]
    assert sweep.sweep(cfg, grid)[0] == rows  # both found in the ledger by their own constant: nothing runs again
    assert len(ledger.rows(cfg.RESULTS_DIR)) == 2
