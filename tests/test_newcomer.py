"""What a new user meets first: --help of every script, the package run as a script, a script's own settings, small
data, quiet output and figures that explain themselves."""
import glob
import os
import re
import runpy
import subprocess
import sys
import tomllib
import types

import pandas as pd
import pytest
import torch

import probe
import real
import tiny
from conftest import ROOT
from harness import cli, errors, files, ledger, plots

SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")) if not p.endswith("config.py"))


def test_every_script_has_a_help_that_exits_0(monkeypatch, capsys):
    assert len(SCRIPTS) == 15 and {"compare.py", "table.py", "tune.py"} <= set(SCRIPTS)
    for script in SCRIPTS:  # in this process (the libraries are imported once), exactly as `python <script> --help`
        monkeypatch.setattr(sys, "argv", [script, "--help"])
        try:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        except SystemExit as e:
            pytest.fail(f"{script} --help exited with {e.code!r}")
        out = capsys.readouterr().out
        doc = runpy.run_path(os.path.join(ROOT, script))["__doc__"].strip()
        assert out.startswith(doc + "\n\nsettings: "), script


def python_m(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_package_and_its_modules_say_which_scripts_to_run():
    package = python_m("harness")
    assert package.returncode == 0 and "python tiny.py" in package.stdout
    scripts = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))} - {"config.py"}
    assert {s for s in scripts if s not in package.stdout} == set()  # every script at the root is named
    module = python_m("harness.chat", "--help")  # a library module: not silent
    assert (module.returncode == 0 and module.stdout.startswith("harness.chat is not a script.\n")
            and "tiny.py" in module.stdout)
    assert python_m("harness.scoring").returncode == 2


def test_real_and_tiny_show_and_take_only_the_settings_they_read(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["real.py", "--help"])
    runpy.run_path(os.path.join(ROOT, "real.py"), run_name="__main__")
    shown = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  --")]
    assert shown == ["--seed=0", "--csv_dir='data/rotten_tomatoes'", "--test_snippets=2400"]
    assert sorted(vars(cli.configure(["--seed=3"], real.REAL, ("SEED",)))) == ["CSV_DIR", "SEED", "TEST_SNIPPETS"]
    with pytest.raises(errors.UserError,
                       match=r"^unknown setting --train_limit: \(real.py reads only --seed, --csv_dir, "):
        monkeypatch.setattr(sys, "argv", ["real.py"])
        cli.configure(["--train_limit=800"], real.REAL, ("SEED",))
    with pytest.raises(errors.UserError, match=r"^unknown setting --csvdir: did you mean --csv_dir\?"):
        cli.configure(["--csvdir=x"], real.REAL, ("SEED",))
    monkeypatch.setattr(sys, "argv", ["tiny.py"])
    with pytest.raises(errors.UserError, match="^unknown setting --seed: tiny.py takes no settings"):
        cli.configure(["--seed=1"], shared=())


def test_probe_defaults_fit_a_small_split_and_given_values_that_do_not_fit_say_so(capsys):
    cfg = types.SimpleNamespace(VAL_LIMIT=probe.VAL_LIMIT, PROBE_TRAIN=probe.PROBE_TRAIN, TRAIN_LIMIT=120,
                                TRAIN_REVIEWS=0)
    assert probe.fitted_sizes(cfg, 120) == (24, 96)
    assert capsys.readouterr().out == ("120 training reviews: --val_limit=24 (its default 1000 does not fit), "
                                       "--probe_train=96 (its default 5600 does not fit)\n")
    large = probe.fitted_sizes(types.SimpleNamespace(**{**vars(cfg), "TRAIN_LIMIT": 56000}), 56000)
    assert large == (1000, 5600) and capsys.readouterr().out == ""  # defaults that fit stay
    assert probe.fitted_sizes(types.SimpleNamespace(**{**vars(cfg), "VAL_LIMIT": 40}), 120)[1] == 80
    assert capsys.readouterr().out == "120 training reviews: --probe_train=80 (its default 5600 does not fit)\n"
    with pytest.raises(errors.UserError,
                       match=r"^--probe_train=100 must be between 2 and the 80 training reviews left after "):
        probe.fitted_sizes(types.SimpleNamespace(**{**vars(cfg), "VAL_LIMIT": 40, "PROBE_TRAIN": 100}), 120)
    with pytest.raises(errors.UserError,
                       match=r"^--val_limit=119 must be between 1 and 118: .* lower --val_limit or raise"):
        probe.fitted_sizes(types.SimpleNamespace(**{**vars(cfg), "VAL_LIMIT": 119}), 120)
    curve = types.SimpleNamespace(**{**vars(cfg), "VAL_LIMIT": 40})  # --train_reviews: fewer, or reviews sampled past
    assert [probe.fitted_sizes(types.SimpleNamespace(**{**vars(curve), "TRAIN_REVIEWS": n}), 120, extra)[1]
            for n, extra in ((50, 0), (200, 120))] == [50, 200]


def test_tiny_builds_quietly(tmp_path, capfd):
    tiny.build(str(tmp_path))
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no blank lines of the tokenizer trainer, no "Writing model shards" bar


def test_design_says_what_every_script_does():
    with open(os.path.join(ROOT, "DESIGN.md")) as f:
        scripts = f.read().split("| Module |")[0]  # the paragraph on the scripts, before the modules' table
    assert [script for script in SCRIPTS if f"`{script}`" not in scripts] == []


def test_the_readme_sets_up_a_venv_of_the_python_asked_for_and_times_one_thread():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["requires-python"] == ">=3.11" and sys.version_info >= (3, 11)
    assert "Python 3.11 or newer" in readme and "--index-url https://download.pytorch.org/whl/cpu" in readme
    assert "\npython3 -m venv .venv && source .venv/bin/activate\npip install -r requirements.txt\n" in readme
    timed = [line for line in readme.splitlines() if re.search(r"^python (?!compare|table|inspect).*: \d+ s$", line)]
    assert len(timed) == 9 and all(" $T " in line for line in timed)  # inspect_primer takes its run's threads
    assert re.search(r'^T=".* --threads=1"$', readme, re.M) and "--threads=1" in tiny.EXPERIMENT


def test_threads_hold_every_pool_of_the_process_to_the_setting(monkeypatch):
    """--threads=1: torch, the BLAS and OpenMP pools loaded already, and the variables of those that start later."""
    from threadpoolctl import threadpool_info, threadpool_limits
    for name in cli.THREAD_VARIABLES:
        monkeypatch.setenv(name, "")  # so the test's end restores each variable as it was
    before = torch.get_num_threads()
    with threadpool_limits(limits=None):  # its exit puts back the pools' own limits
        try:
            cli.use_threads(types.SimpleNamespace(THREADS=1))
            assert torch.get_num_threads() == 1 and {pool["num_threads"] for pool in threadpool_info()} == {1}
            assert all(os.environ[name] == "1" for name in cli.THREAD_VARIABLES)
        finally:
            torch.set_num_threads(before)
    variables = dict(os.environ)
    cli.use_threads(types.SimpleNamespace(THREADS=0))  # each library's default: nothing changes
    assert torch.get_num_threads() == before and dict(os.environ) == variables
    with pytest.raises(errors.UserError, match=r"^--threads=-1 must be 0 \(each library's default\) or a number"):
        cli.use_threads(types.SimpleNamespace(THREADS=-1))


def test_progress_bars_in_a_log_redraw_rarely(monkeypatch, capsys):
    from tqdm import std, tqdm
    for name in ("__init__", "set_postfix"):  # undone after the test, so other tests keep tqdm's own defaults
        monkeypatch.setattr(std.tqdm, name, getattr(std.tqdm, name))
    monkeypatch.setattr(std.tqdm, "_quiet", False, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    cli.quiet_progress_bars()
    bar = tqdm(range(500), desc="steps")
    for _ in bar:
        bar.set_postfix(loss="1.0")
    bar.close()
    log = capsys.readouterr().err
    assert log.count("\r") <= 2 and "500/500" in log and "loss=1.0" in log  # its start and its end, not 500 redraws


def write_probe_run(results: str, run: str, model_id: str, scores: dict[str, list[float]]) -> None:
    os.makedirs(os.path.join(results, run))
    with open(os.path.join(results, run, "config.json"), "w") as f:
        f.write(f'{{"model_id": "{model_id}"}}')
    rows = [{"condition": "none", "probe": "linear", "layer": layer, "pooling": pooling, "val_score": score}
            for pooling, values in scores.items() for layer, score in enumerate(values)]
    pd.DataFrame(rows).to_csv(os.path.join(results, run, "probe_layers.csv"), index=False)


def test_probe_figure_has_whole_layers_a_title_of_its_own_and_no_hidden_line(tmp_path, monkeypatch):
    results, model_id = str(tmp_path / "results"), str(tmp_path / "tiny" / "model")
    os.makedirs(model_id)
    write_probe_run(results, "20260101-000000-probe", model_id, {"last": [0.5, 0.9, 0.8], "mean": [0.5, 0.7, 0.75]})
    ledger.add_row(results, {"run_id": "x", "script": "experiment", "method": "primer", "model_id": model_id,
                            "score": 0.9, "tokens": 4})
    path = plots.probe_layers(results, model_id, str(tmp_path))
    (axes,) = plots.description(path)["axes"]
    assert axes["xticks"] and all(float(t.replace("\u2212", "-")).is_integer() for t in axes["xticks"])  # no layer 0.25
    assert "tiny/model" in axes["title"] and not axes["title"].endswith(": model") and "probe" in axes["title"]
    assert axes["legend"] == ["linear probe, review alone, last pooling", "linear probe, review alone, mean pooling",
                              "experiment test score (primer)"]
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figures.append(fig) or path)
    plots.probe_layers(results, model_id, str(tmp_path))
    lines = figures[0].axes[0].lines
    probes, reference = lines[:2], lines[2]
    assert reference.get_linestyle() == "--" and all(line.get_zorder() > reference.get_zorder() for line in probes)
    assert probes[0].get_marker() != probes[1].get_marker()


def test_loss_figure_names_its_run_and_shows_every_step(tmp_path):
    run = tmp_path / "20260101-000000-experiment"
    run.mkdir()
    files_cfg = {"model_id": "/m/SmolLM2-135M-Instruct.Q4_1.gguf", "rate_by_epoch": [0.5, 0.1],
                 "rate_scale": "embedding"}
    (run / "config.json").write_text(pd.Series(files_cfg).to_json())
    pd.DataFrame({"step": range(1, 13), "epoch": [1] * 6 + [2] * 6, "loss": [2.0 - i / 10 for i in range(12)]}).to_csv(
        run / "losses.csv", index=False)
    (axes,) = plots.description(plots.loss_curve(str(run), "primer", 4))["axes"]
    assert axes["title"] == ("Training loss: primer, 4 tokens on SmolLM2-135M-Instruct.Q4_1\n"
                             "rates by epoch [0.5, 0.1] x embedding std; run 20260101-000000-experiment")
    assert axes["legend"] == ["loss of each step", "epoch boundary (the rate changes)"]  # 12 steps: no mean to hide it
    assert axes["xticks"] and all(t.isdigit() for t in axes["xticks"])
    assert files.read_json(str(run / "config.json"))["rate_scale"] == "embedding"
    pd.DataFrame({"step": range(1, 301), "epoch": 1, "loss": [10 * 0.05 ** (i / 299) for i in range(300)]}).to_csv(
        run / "losses.csv", index=False)  # from 10 to 0.5: labelled at 1, 2 and 5 of a decade, not at 9, 8, 7, ...
    assert plots.description(plots.loss_curve(str(run)))["axes"][0]["yticks"] == ["0.5", "1", "2", "5", "10"]
