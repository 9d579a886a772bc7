"""search_prompt.py on the tiny model: each method's candidates, curve and ledger row, the batched per-row prompt
forward, the token search's loss, reproducibility, validation-only scoring, and its errors."""
import glob
import os
import re

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import prompt_long
import prompt_short
import search_prompt
from conftest import overrides, record_reads
from harness import cli, errors, frozen, ledger, runs, scoring
from harness.layouts import assemble, make_layout


def search_args(tiny, out, *more: str) -> list[str]:
    return overrides(tiny, out) + ["--val_limit=30", "--steps=2", "--candidates=3", "--proposer_tokens=8", *more]


@pytest.mark.parametrize("method", search_prompt.SEARCHES)
def test_each_method_writes_its_candidates_curve_and_ledger_row_and_never_scores_on_test(tiny, tmp_path, monkeypatch, method):
    calls = record_reads(monkeypatch, scoring, "predict", "prompt.json")
    search_prompt.run(cli.configure(search_args(tiny, tmp_path, f"--search={method}"), search_prompt.SETTINGS))
    reads = [c["test"] for c in calls]
    finals = 2 if method == "tokens" else 1  # the exact ids and their decoded text
    assert not any(reads[:-finals]) and all(reads[-finals:]) and calls[-1]["chosen"]
    run = sorted(glob.glob(f"{tmp_path}/results/*-search_prompt"))[0]
    candidates = pd.read_csv(f"{run}/candidates.csv", keep_default_na=False)
    assert len(candidates) >= 2 and (candidates["forwards"].diff().dropna() > 0).all()
    assert os.path.getsize(f"{run}/search.png") > 0
    rows = ledger.rows(f"{tmp_path}/results")
    assert len(rows) == finals and rows[0]["method"].startswith("token search, exact ids" if method == "tokens" else f"prompt search ({method})")
    if method == "tokens":
        assert rows[0]["tokens"] == 8 and rows[1]["method"].startswith("prompt search (tokens, decoded text)")


def test_the_batched_per_row_prompt_forward_equals_each_candidate_alone(tiny, tmp_path):
    task = runs.setup(cli.configure(search_args(tiny, tmp_path), search_prompt.SETTINGS))
    layout, table = make_layout(task, None, primer_length=3), task.model.get_input_embeddings().weight
    candidates, reviews = torch.randint(5, 300, (4, 3), generator=torch.Generator().manual_seed(0)), torch.tensor([0, 9, 4])
    together = search_prompt.label_losses(task, layout, table[candidates].float(), reviews)
    for c, ids in enumerate(candidates):
        batch, lengths = assemble(layout, task.train, reviews)
        logits = frozen.forward(task.model, batch, lengths, layout, table[ids].float()).logits
        alone = F.cross_entropy(logits, task.label_ids[task.train.labels[reviews]])
        torch.testing.assert_close(together[c], alone, atol=1e-5, rtol=1e-5)


def test_the_token_search_lowers_the_loss_on_its_batch(tiny, tmp_path):
    cfg = cli.configure(search_args(tiny, tmp_path, "--search=tokens", "--steps=4", "--candidates=8", "--patience=10"),
                        search_prompt.SETTINGS)
    task = runs.setup(cfg)
    search = search_prompt.Search(task, runs.start_run(cfg, "search_prompt"))
    search_prompt.search_tokens(task, search)
    assert len(search.losses) == 4 and all(after <= before for before, after in search.losses)
    assert any(after < before for before, after in search.losses)
    # the budget: a gradient pass on the batch, the 8 swaps on it, and each distinct prompt on validation
    assert search.backwards == 4 * 8 and search.forwards == 4 * 8 * 9 + 30 * len(search.rows)


def test_edit_search_starts_from_the_baselines_as_they_score_and_is_reproducible(tiny, tmp_path):
    texts = []
    for attempt in ("a", "b"):
        cfg = cli.configure(search_args(tiny, tmp_path / attempt, "--steps=3"), search_prompt.SETTINGS)
        search_prompt.run(cfg)
        (run,) = glob.glob(f"{tmp_path}/{attempt}/results/*-search_prompt")
        texts.append(pd.read_csv(f"{run}/candidates.csv", keep_default_na=False).drop(columns="seconds"))
    pd.testing.assert_frame_equal(*texts)
    task, first = runs.setup(cfg), texts[0].iloc[:2]
    for baseline, row in zip((prompt_short, prompt_long), first.itertuples()):
        alone = scoring.score(task, make_layout(task, baseline.SYSTEM, baseline.USER), None, task.val)
        assert (row.text, row.user, row.val_correct) == (baseline.SYSTEM, baseline.USER, alone["correct"])
    assert set(texts[0]["user"]) <= {prompt_short.USER, prompt_long.USER}


@pytest.mark.parametrize("setting, message", [
    ("--search=beam", "--search='beam' is not one of edit, propose, tokens"),
    ("--val_limit=0", "candidates are scored on validation reviews: set --val_limit"),
    ("--top_k=0", "--steps, --candidates, --pool, --tokens, --top_k and --search_batch must all be at least 1"),
    ("--token_init=nearest", "--token_init='nearest' is not one of random, text:<words>, primer:<path>"),
])
def test_bad_settings_are_one_line_errors(tiny, tmp_path, setting, message):
    with pytest.raises(errors.UserError, match="^" + re.escape(message)):
        search_prompt.run(cli.configure(search_args(tiny, tmp_path, setting), search_prompt.SETTINGS))
