"""search_prompt.py on the tiny model: each method's candidates, curve and ledger row, the batched screening forwards
against each candidate alone, each token step against an independent loss and gradient, the budget against an
independent count of forward passes, reproducibility, validation-only scoring, and its errors."""
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
import table
from conftest import overrides, record_reads
from harness import cli, errors, files, frozen, layouts, ledger, rundir, runs, scoring, screening
from harness.layouts import make_layout

BUDGET = 300  # reviews through forward passes: a few steps of each search on the tiny model


def search_args(tiny, out, *more: str) -> list[str]:
    return overrides(tiny, out) + ["--val_limit=30", f"--forward_budget={BUDGET}", "--candidates=3", "--swaps=16",
                                   "--val_every=2", "--proposer_tokens=8", *more]


@pytest.mark.parametrize("method", search_prompt.SEARCHES)
def test_each_method_writes_its_candidates_curve_and_ledger_row_and_never_scores_on_test(tiny, tmp_path, monkeypatch,
                                                                                         method):
    calls = record_reads(monkeypatch, scoring, "predict", "prompt.json")
    search_prompt.run(cli.configure(search_args(tiny, tmp_path, f"--search={method}"), search_prompt.SETTINGS))
    reads = [c["test"] for c in calls]
    finals = 2 if method == "tokens" else 1  # the exact ids and their decoded text
    assert not any(reads[:-finals]) and all(reads[-finals:]) and calls[-1]["chosen"]
    run = sorted(glob.glob(f"{tmp_path}/results/*-search_prompt"))[0]
    candidates = pd.read_csv(f"{run}/candidates.csv", keep_default_na=False)
    assert len(candidates) >= 2 and (candidates["forwards"].diff().dropna() > 0).all()
    assert os.path.getsize(f"{run}/search.png") > 0
    rows, saved = ledger.rows(f"{tmp_path}/results"), files.read_json(f"{run}/prompt.json")
    assert len(rows) == finals and rows[0]["method"].startswith("token search, exact ids" if method == "tokens"
                                                                else f"prompt search ({method}")
    # the budget in the row
    assert f"{int(candidates['forwards'].iloc[-1]):,} fwd" in rows[0]["method"] or method != "edit"
    if method == "tokens":  # the short prompt's system tokens, its user message kept
        assert saved["user"] == prompt_short.USER and rows[0]["tokens"] == len(saved["token_ids"])
        assert rows[1]["method"].startswith("prompt search (tokens, decoded text")
        # the decoded text's folder names the search, which alone pays for it in table.py's cost
        decoded = f"{tmp_path}/results/{rows[1]['run_id']}"
        assert files.read_json(f"{decoded}/prompt.json")["search_run"] == rows[0]["run_id"]
        cost = table.load_runs(f"{tmp_path}/results").set_index("run_id")["core_seconds"]
        assert cost[rows[1]["run_id"]] == pytest.approx(files.read_json(f"{decoded}/metrics.json")["score_cpu_seconds"])
        # the search's own CPU seconds, the budget it counted (its last candidate's, a little before the end)
        metrics = files.read_json(f"{run}/metrics.json")
        assert cost[rows[0]["run_id"]] == pytest.approx(metrics["train_cpu_seconds"] + metrics["score_cpu_seconds"])
        assert metrics["train_cpu_seconds"] >= 60 * candidates["cpu_minutes"].iloc[-1] - 0.6
        assert metrics["train_cpu_seconds"] > 0


def losses_one_by_one(task, layout, reviews, slot_ids=None, slots=None) -> torch.Tensor:
    """The mean label cross-entropy over reviews, each review alone through the model's own forward, no padding;
    the slot holds the embeddings of slot_ids, or `slots` (so a gradient reaches them)."""
    table, losses = task.model.get_input_embeddings().weight, []
    if slot_ids is not None:
        slots = table[slot_ids].float()
    for i in reviews.tolist():
        review = task.train.tokens[task.train.offsets[i]:task.train.offsets[i + 1]].long()
        embeds = layouts.unpadded_embeds(task.model, layout, review, slots)
        logits = task.model(inputs_embeds=embeds[None]).logits[0, -1].float()
        losses.append(F.cross_entropy(logits, task.label_ids[task.train.labels[i]]))
    return torch.stack(losses).mean()


def test_the_batched_screening_forwards_equal_each_candidate_alone(tiny, tmp_path):
    task = runs.setup(cli.configure(search_args(tiny, tmp_path, "--forward_batch=5"), search_prompt.SETTINGS))
    layout, table = make_layout(task, None, primer_length=3), task.model.get_input_embeddings().weight
    candidates, reviews = (torch.randint(5, 300, (4, 3), generator=torch.Generator().manual_seed(0)),
                           torch.tensor([0, 9, 4]))
    together = screening.label_losses(task, layout, table[candidates].float(), reviews, 5)
    for c, ids in enumerate(candidates):
        torch.testing.assert_close(together[c], losses_one_by_one(task, layout, reviews, slot_ids=ids), atol=1e-5,
                                   rtol=1e-5)
    # text prompts of different lengths and user messages, padded together in chunks that split a prompt's rows
    texts = [(prompt_short.SYSTEM, prompt_short.USER), (prompt_long.SYSTEM, prompt_long.USER),
             ("Say 1 or 2.", "{review}")]
    together = screening.text_losses(task, texts, reviews, 5)
    for c, prompt in enumerate(texts):
        alone = losses_one_by_one(task, make_layout(task, *prompt), reviews)
        torch.testing.assert_close(together[c], alone, atol=1e-5, rtol=1e-5)


def count_forwards(monkeypatch) -> list[tuple[int, bool]]:
    """Wrap frozen.forward to log each call's rows and whether it builds a graph for a backward pass."""
    real, calls = frozen.forward, []

    def counted(model, ids, *args, **kwargs):
        calls.append((len(ids), torch.is_grad_enabled() and not torch.is_inference_mode_enabled()))
        return real(model, ids, *args, **kwargs)
    monkeypatch.setattr(frozen, "forward", counted)
    return calls


def test_each_token_step_takes_a_gradient_token_that_lowers_the_loss_as_measured_alone(tiny, tmp_path, monkeypatch):
    cfg = cli.configure(search_args(tiny, tmp_path, "--search=tokens"), search_prompt.SETTINGS)
    task = runs.setup(cfg)
    calls = count_forwards(monkeypatch)
    search = screening.Search(task, rundir.new(cfg, "search_prompt"), cfg.BUDGET, cfg.FORWARD_BUDGET)
    _, user = search_prompt.search_tokens(task, search)
    table = task.model.get_input_embeddings().weight.float()
    layout = make_layout(task, None, user, primer_length=len(search.steps[0]["before"]))
    assert len(search.steps) >= 2
    for step in search.steps:  # would fail if a candidate's loss were another's, or the gradient's sign or slot wrong
        before, after, reviews = step["before"], step["after"], step["reviews"]
        onehot = F.one_hot(before, len(table)).float().requires_grad_(True)
        loss = losses_one_by_one(task, layout, reviews, slots=onehot @ table)
        loss.backward()
        assert step["loss_before"] == pytest.approx(loss.item(), abs=1e-4)
        assert step["loss_after"] == pytest.approx(losses_one_by_one(task, layout, reviews, slot_ids=after).item(),
                                                   abs=1e-4)
        assert step["loss_after"] <= step["loss_before"]
        changed = (after != before).nonzero().flatten().tolist()
        assert len(changed) <= 1
        if changed:  # one slot swapped, to one of its TOP_K most loss-lowering tokens by the gradient
            grad = onehot.grad[changed[0]]
            # special tokens and rows past the vocabulary
            grad[list(task.tokenizer.added_tokens_decoder)] = float("inf")
            grad[len(task.tokenizer):] = float("inf")
            assert int(after[changed[0]]) in grad.topk(cfg.TOP_K, largest=False).indices.tolist()
            assert step["loss_after"] < step["loss_before"]
    assert any(s["loss_after"] < s["loss_before"] for s in search.steps)
    # the budget, counted independently at the model: each row through a forward pass, a backward pass counting two
    rows, graphs = sum(n for n, _ in calls), sum(n for n, grad in calls if grad)
    assert (search.forwards, search.backwards) == (rows, graphs)
    last_step = max(i for i, (_, grad) in enumerate(calls) if grad)  # the last step begins with its gradient
    spent_before = sum(n * (3 if grad else 1) for n, grad in calls[:last_step])
    assert spent_before < BUDGET <= search.forwards + 2 * search.backwards


def test_edit_search_starts_from_the_baselines_as_they_score_and_is_reproducible(tiny, tmp_path):
    texts, folders = [], []
    for attempt in ("a", "b"):
        cfg = cli.configure(search_args(tiny, tmp_path / attempt), search_prompt.SETTINGS)
        search_prompt.run(cfg)
        (run,) = glob.glob(f"{tmp_path}/{attempt}/results/*-search_prompt")
        folders.append(run)
        texts.append(pd.read_csv(f"{run}/candidates.csv", keep_default_na=False)
                     .drop(columns=["seconds", "cpu_minutes"]))
    pd.testing.assert_frame_equal(*texts)
    task, first = runs.setup(cfg), texts[0].iloc[:2]
    for baseline, row in zip((prompt_short, prompt_long), first.itertuples()):
        alone = scoring.score(task, make_layout(task, baseline.SYSTEM, baseline.USER), None, task.val)
        assert (row.text, row.user, row.val_correct) == (baseline.SYSTEM, baseline.USER, alone["correct"])
    assert set(texts[0]["user"]) <= {prompt_short.USER, prompt_long.USER} and len(texts[0]) > 2
    search_prompt.run(cli.configure(search_args(tiny, tmp_path, f"--curves={folders}"), search_prompt.SETTINGS))
    assert os.path.getsize(f"{tmp_path}/results/search_curves.png") > 0


@pytest.mark.parametrize("setting, message", [
    ("--search=beam", "--search='beam' is not one of edit, propose, tokens"),
    ("--val_limit=0", "candidates are scored on validation reviews: set --val_limit"),
    ("--top_k=0", "--candidates, --validate, --pool, --tokens, --swaps, --top_k, --search_batch, --val_every and "
                  "--forward_batch must all be at least 1"),
    ("--forward_budget=0", "the search needs a budget: set --budget"),
    ("--token_init=nearest", "--token_init='nearest' is not one of short, long, text:<words>, random, primer:<path>"),
])
def test_bad_settings_are_one_line_errors(tiny, tmp_path, setting, message):
    extra = ["--budget=0"] if setting == "--forward_budget=0" else []
    with pytest.raises(errors.UserError, match="^" + re.escape(message)):
        search_prompt.run(cli.configure(search_args(tiny, tmp_path, setting, *extra), search_prompt.SETTINGS))
