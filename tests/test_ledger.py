"""The results ledger: rows appended under a lock by concurrent runs, damage found before a run starts, scores printed
with their half-width."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, overrides, run_script
from harness import errors, ledger

WRITER = """
import os, sys, types
from harness import ledger, rundir
results, go, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = types.SimpleNamespace(RESULTS_DIR=results, SEED=0)
print("ready", flush=True)
os.read(go, 1)  # returns when the test closes the pipe's other end: every writer at once
run_dir = rundir.new(cfg, "race")
for i in range(rows):
    ledger.add_row(results, {"run_id": run_dir.rsplit("/", 1)[1], "script": "race", "correct": i, "status": "finished"})
"""


def test_concurrent_runs_get_their_own_folders_and_keep_every_row(tmp_path):
    processes, rows = 4, 30
    go, start = os.pipe()  # closing `start` releases every writer together, so that they race for one folder name
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(go), str(rows)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, pass_fds=(go,)) for _ in range(processes)]
    os.close(go)
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * processes  # every writer has imported torch
    os.close(start)
    assert [p.wait(timeout=120) for p in procs] == [0] * processes
    folders = [d for d in os.listdir(tmp_path) if d.endswith("-race") or "-race-" in d]
    assert len(folders) == processes and all(os.path.isfile(tmp_path / d / "config.json") for d in folders)
    ledger.check(str(tmp_path))
    table = ledger.rows(str(tmp_path))
    assert len(table) == processes * rows
    assert sorted(r["run_id"] for r in table) == sorted(folders * rows)
    assert all(sorted(r["correct"] for r in table if r["run_id"] == d) == list(range(rows)) for d in folders)


WIDTH = len(ledger.COLUMNS)


@pytest.mark.parametrize("damage, message", [
    (b'x,y\n', f"line 3 has 2 fields, not {WIDTH}: fix that line or move the file aside"),
    (b'r,s,caf\xe9' + b',' * (WIDTH - 3) + b'\n', "line 3 has bytes that are not UTF-8"),
    (b'r,s,k,finished,m\n', f"line 3 has 5 fields, not {WIDTH}"),
    (b'r,s,' + b',' * (WIDTH - 3), "line 3 is cut short (no line end)"),
])
def test_a_damaged_ledger_is_one_line_before_any_work(tmp_path, damage, message):
    ledger.add_row(str(tmp_path), {"run_id": "good", "status": "finished"})
    with open(ledger.path(str(tmp_path)), "ab") as f:
        f.write(damage)
    with pytest.raises(errors.UserError, match=re.escape(message)):
        ledger.check(str(tmp_path))


OLD = ("run_id,script,kind,status,model_id,samples,tokens,primer_position,lr_schedule,correct,total,score,"
       "restricted_correct,restricted_score,label_answer_share,score_low,score_high,restricted_low,restricted_high,"
       "seed,primer_path,primer_init,val_limit,keep_best,best_epoch,train_seconds,score_seconds\n"
       "20261130-060000-experiment,experiment,trained primer,finished,m,100,4,system,1e-05,50,60,0.8333333333333334,55,"
       "0.9166666666666666,1.0,0.7,0.9,0.8,0.96,0,,random,0,False,,12.5,1.5\n")


def test_an_older_ledger_still_reads_and_takes_new_rows_with_its_text_kept(tmp_path):
    path = ledger.path(str(tmp_path))
    with open(path, "w") as f:
        f.write(OLD)
    ledger.check(str(tmp_path))
    ledger.add_row(str(tmp_path), {"run_id": "new", "method": "text prompt", "correct": 7, "status": "finished"})
    header, *lines = open(path).read().splitlines()
    assert header.split(",")[:WIDTH] == ledger.COLUMNS and "lr_schedule" in header and len(lines) == 2
    old = dict(zip(header.split(","), lines[0].split(",")))
    assert (old["lr_schedule"], old["score"], old["seed"], old["method"]) == ("1e-05", "0.8333333333333334", "0", "")
    first, second = ledger.rows(str(tmp_path))
    assert (first["script"], first["correct"]) == ("experiment", 50)
    assert (second["method"], second["correct"]) == ("text prompt", 7)


def test_a_file_that_is_no_ledger_stops_a_run_at_its_start(tiny, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "results.csv").write_text("name,score\nold,0.5\n")
    result = run_script("experiment.py", *overrides(tiny, tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {results}/results.csv is not a ledger (no run_id column): "
        f"move it aside (mv {results}/results.csv {results}/results.csv.old)")
    assert os.listdir(results) == ["results.csv"] and not os.path.exists(tmp_path / "data")  # no run, no data prep


def test_format_score_prints_the_half_width():
    row = {"score": 0.959, "score_low": 0.957, "score_high": 0.961, "restricted_score": 0.5, "restricted_low": 0.404,
           "restricted_high": 0.596}
    assert ledger.format_score(row, "score") == "95.9% ±0.2"
    assert ledger.format_score(row, "restricted") == "50.0% ±9.6"
