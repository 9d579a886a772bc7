import json
import os
import re

import pytest
import torch

import inspect_primer
from conftest import run_script
from harness import errors, layouts, ledger, primers, rundir, runs, scoring

WORDS = [" great", " awful", " food"]  # one token each in the tiny vocabulary
SCALES = [3.0, 1.0, 0.5]  # cosine ignores a vector's length; the norm column shows it


@pytest.fixture
def known_primer_run(cfg):
    """A recorded run whose primer is (scaled) embedding rows of WORDS, so its nearest tokens are known exactly."""
    task = runs.setup(cfg, with_train=False)
    ids = [task.tokenizer(w, add_special_tokens=False)["input_ids"] for w in WORDS]
    assert all(len(i) == 1 for i in ids)
    table = task.model.get_input_embeddings().weight.detach()
    primer = torch.stack([s * table[i[0]] for s, i in zip(SCALES, ids)])
    layout = layouts.make_layout(task, None, primer_length=len(primer))
    run_dir = rundir.new(cfg, "experiment")
    primers.save_primer(run_dir, primer, cfg.MODEL_ID, cfg.PRIMER_POSITION)
    row = runs.record(task, "experiment", "primer", len(primer), scoring.predict(task, layout, primer), run_dir)
    return task, primer, os.path.join(cfg.RESULTS_DIR, row["run_id"])


def test_nearest_tokens_and_hard_primer_through_the_command_line(known_primer_run):
    task, primer, run_dir = known_primer_run
    result = run_script("inspect_primer.py", run_dir, "--score_batch_size=7")  # model, data etc. come from the run
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if re.match(r"\| \d+ \| [\d.]+ \| ", line)]
    assert len(rows) == len(WORDS)
    for n, (row, word, vector) in enumerate(zip(rows, WORDS, primer), 1):
        assert row.startswith(f"| {n} | {vector.norm():.3f} | {word!r} (1.000)  ")  # itself first, at cosine 1
        assert len(re.findall(r" \(-?\d\.\d{3}\)", row)) == inspect_primer.TOP_K
    hard = "".join(WORDS)
    assert f"hard primer: {hard!r}" in result.stdout
    original = json.loads(open(os.path.join(run_dir, "metrics.json")).read())
    assert inspect_primer.score_line("primer", original) in result.stdout

    rows = ledger.rows(task.cfg.RESULTS_DIR)
    assert [r["script"] for r in rows] == ["experiment", "inspect_primer"]
    row = rows[-1]
    assert row["method"] == "hard primer" and row["total"] == 60
    config = json.loads(open(os.path.join(task.cfg.RESULTS_DIR, row["run_id"], "config.json")).read())
    assert config["primer_path"] == os.path.join(run_dir, "primer.safetensors")
    assert config["score_batch_size"] == 7  # the override
    assert config["model_id"] == task.cfg.MODEL_ID  # and the run's own

    layout = layouts.make_layout(task, hard, "{review}")  # the hard primer scored as a plain text prompt
    expected = scoring.score(task, layout, None)
    assert (row["correct"], row["restricted_correct"], row["tokens"]) == (expected["correct"],
                                                                         expected["restricted_correct"], len(WORDS))
    assert inspect_primer.score_line("hard primer", expected) in result.stdout


def test_a_folder_without_a_primer_is_a_one_line_error(cfg, tmp_path):
    row = runs.score_text_prompt(cfg, "prompt_short", "Classify.", "{review}")
    run_dir = os.path.join(cfg.RESULTS_DIR, row["run_id"])
    with pytest.raises(errors.UserError, match="no primer.safetensors"):
        inspect_primer.configure([run_dir])
    with pytest.raises(errors.UserError, match="give a run folder first"):
        inspect_primer.configure(["--device=cpu"])
    with open(os.path.join(run_dir, "primer.safetensors"), "w"):
        pass
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        f.write("{")
    with pytest.raises(errors.UserError, match="config.json is not valid JSON"):
        inspect_primer.configure([run_dir])
    result = run_script("inspect_primer.py", str(tmp_path / "missing"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == (f"error: {tmp_path}/missing is not the folder of a run with a primer (no "
                                     f"config.json, metrics.json, primer.safetensors): give results/<run id> of an "
                                     f"experiment.py run")
