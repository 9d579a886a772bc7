"""steer.py on the tiny model: each vector source, the sweep's outputs, selection on validation only, re-scoring a
saved vector, the learned vector's training and resume, and its errors."""
import glob
import os
import re
import types

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import steer
import table
from conftest import overrides, record_reads, run_until_first_checkpoint
from harness import chat, cli, errors, files, frozen, generation, layouts, ledger, primers, runs, scoring
from harness.layouts import make_layout, prompt_text


def steer_args(tiny, out, *more: str) -> list[str]:
    return overrides(tiny, out) + ["--val_limit=30", "--vector_reviews=20", *more]


@pytest.fixture(scope="module")
def swept(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("steer")
    with pytest.MonkeyPatch.context() as monkeypatch:  # scoring.predict calls, "chosen" once steer_sweep.csv exists
        calls = record_reads(monkeypatch, scoring, "predict", "steer_sweep.csv")
        steer.run(cli.configure(steer_args(tiny, out, "--steer_layers=[1, 2]", "--coefficients=[0.0, 0.5, 2.0]"),
                                steer.SETTINGS))
    (run_dir,) = glob.glob(f"{out}/results/*-steer")
    return types.SimpleNamespace(out=out, calls=calls, run_dir=run_dir, table=pd.read_csv(f"{run_dir}/steer_sweep.csv"))


def test_the_sweep_writes_its_table_heatmap_vector_and_ledger_row(swept):
    grid = list(zip(swept.table["layer"], swept.table["coefficient"]))
    assert grid == [(1, 0.0), (1, 0.5), (1, 2.0), (2, 0.0), (2, 0.5), (2, 2.0)]
    assert (swept.table["val_total"] == 30).all()
    assert os.path.getsize(f"{swept.run_dir}/steer_sweep.png") > 0
    (row,) = ledger.rows(f"{swept.out}/results")
    best = swept.table.sort_values(["val_score", "val_restricted_score"], ascending=False, kind="stable").iloc[0]
    assert row["method"] == (f"steering vector (mean of short, layer {int(best['layer'])}, x{best['coefficient']:g} "
                             f"residual norm, every position)")
    assert row["tokens"] == 0 and row["trainable_params"] == 0 and row["samples"] == 20
    assert load_file(f"{swept.run_dir}/steering.safetensors")["vector"].shape == (64,)
    metrics = files.read_json(f"{swept.run_dir}/metrics.json")  # its cost: the vector's and the sweep's CPU seconds
    cost = table.load_runs(f"{swept.out}/results").set_index("run_id")["core_seconds"][row["run_id"]]
    assert cost == pytest.approx(metrics["train_cpu_seconds"] + metrics["score_cpu_seconds"])


def test_selection_never_reads_the_test_split(swept):
    *sweep, final = swept.calls
    assert len(sweep) == 5  # coefficient 0 is scored once, not once per layer
    assert not any(c["test"] for c in sweep) and final["test"] and final["chosen"]


def test_coefficient_zero_is_exactly_no_steering(tiny, tmp_path):
    task = runs.setup(cli.configure(overrides(tiny, tmp_path)), with_train=False)
    plain, vector = make_layout(task, None), torch.randn(64, generator=torch.Generator().manual_seed(0)) * 50
    unsteered = scoring.predict(task, plain)
    for after_review in (False, True):
        zero = scoring.predict(task, plain, steer=frozen.Steer(vector, (1, 2), 0.0, after_review))
        assert torch.equal(zero["logprobs"], unsteered["logprobs"]) and torch.equal(zero["answer"], unsteered["answer"])
    steered = scoring.predict(task, plain, steer=frozen.Steer(vector, (1,), 1.0))
    assert not torch.equal(steered["logprobs"], unsteered["logprobs"])


def test_a_saved_vector_scores_the_same_by_path(swept, tiny, tmp_path):
    steer.run(cli.configure(steer_args(tiny, tmp_path, f"--vector_path={swept.run_dir}/steering.safetensors",
                                       f"--results_dir={swept.out}/results"), steer.SETTINGS))
    first, again = ledger.rows(f"{swept.out}/results")
    assert again["method"].startswith("saved steering vector (mean of short, layer ")
    assert (again["correct"], again["restricted_correct"]) == (first["correct"], first["restricted_correct"])


def test_a_contrast_pair_runs_after_the_review_only(tiny, tmp_path):
    args = steer_args(tiny, tmp_path, "--vector=pair", "--pair=['Love', 'Hate']", "--after_review=True",
                      "--steer_layers=[2]", "--coefficients=[1.0]")
    steer.run(cli.configure(args, steer.SETTINGS))
    (row,) = ledger.rows(f"{tmp_path}/results")
    assert row["method"] == "steering vector (pair, layer 2, x1 residual norm, after the review)"


def test_the_learned_vector_trains_and_resumes_bitwise_after_a_kill(tiny, tmp_path, monkeypatch):
    args = steer_args(tiny, tmp_path, "--vector=learned", "--learned_layer=2", "--batch_size=4", "--checkpoint_every=5",
                      "--rate_by_epoch=[0.3, 0.3, 0.3, 0.3]")
    straight = f"{tmp_path}/straight"
    steer.run(cli.configure(args + [f"--results_dir={straight}"], steer.SETTINGS))
    (run,) = glob.glob(f"{straight}/*-steer")
    log = pd.read_csv(f"{run}/losses.csv")
    tenth = len(log) // 10
    assert log["loss"][-tenth:].mean() < 0.7 * log["loss"][:tenth].mean()
    (row,) = ledger.rows(straight)
    assert row["trainable_params"] == 64 and row["method"] == "steering vector (learned, layer 2, every position)"
    killed = f"{tmp_path}/killed"
    run_until_first_checkpoint(lambda: steer.run(cli.configure(args + [f"--results_dir={killed}"], steer.SETTINGS)),
                               monkeypatch)
    (run_killed,) = glob.glob(f"{killed}/*-steer")
    assert not os.path.exists(f"{run_killed}/steering.safetensors")
    steer.run(cli.configure([f"--resume={run_killed}"], steer.SETTINGS))
    resumed, straight = (load_file(f"{r}/steering.safetensors")["vector"] for r in (run_killed, run))
    assert torch.equal(resumed, straight)


@pytest.mark.parametrize("pipeline", [["--vector=learned", "--learned_layer=2"], ["--vector=pair"],
                                      ["--generate=True", "--sentiment=reviews"]])
def test_too_many_vector_reviews_are_refused_by_every_pipeline_never_clipped(tiny, tmp_path, judge_primer, pipeline):
    args = steer_args(tiny, tmp_path, *pipeline, f"--judge_path={judge_primer}", "--vector_reviews=71")
    with pytest.raises(errors.UserError, match=r"^--vector_reviews=71 must be between 1 and the 70 training reviews"):
        steer.run(cli.configure(args, steer.SETTINGS))


@pytest.fixture(scope="module")
def judge_primer(tiny, tmp_path_factory) -> str:
    """A primer file for the tiny model, to judge answers with: random vectors, but the real file and code path."""
    out = tmp_path_factory.mktemp("judge")
    task = runs.setup(cli.configure(overrides(tiny, out)), with_train=False)
    primers.save_primer(str(out), primers.init_primer(task.model, 4, 0), tiny.model_dir, "system")
    return f"{out}/primer.safetensors"


@pytest.mark.parametrize("judge", ["primer", "probe"])
def test_generation_writes_every_answer_its_judgement_and_the_curve(tiny, tmp_path, judge_primer, judge):
    if judge == "probe":  # a linear probe's file as probe.py writes it
        judge_primer = f"{tmp_path}/probe.safetensors"
        probe = {"weight": torch.randn(64, generator=torch.Generator().manual_seed(0)), "bias": torch.zeros(1)}
        save_file(probe, judge_primer,
                  metadata={"layer": "1", "pooling": "mean", "condition": "none", "model_id": tiny.model_dir})
    args = steer_args(tiny, tmp_path, "--generate=True", f"--judge_path={judge_primer}", "--samples=2",
                      "--max_new_tokens=8", "--generate_coefficients=[-1.0, 0.0, 1.0]", "--sentiment=reviews")
    steer.run(cli.configure(args, steer.SETTINGS))
    (run,) = glob.glob(f"{tmp_path}/results/*-steer")
    answers = pd.read_csv(f"{run}/generations.csv", keep_default_na=False)
    assert len(answers) == 5 * 3 * 2  # (3 coefficients + 2 text prompts) x 3 user messages x 2 samples
    # each judged below, against the judge alone
    assert answers["p_positive"].nunique() > 1 and (answers["fluency"] < 0).all()
    assert list(answers["prompt"][:2]) == [steer.GENERATE_PROMPTS[0]] * 2
    summary = pd.read_csv(f"{run}/generation_summary.csv")
    assert list(summary["steering"]) == ["vector at layer 1"] * 3 + ["prompt: make it positive",
                                                                     "prompt: make it negative"]
    assert (summary["answers"] == 6).all() and os.path.getsize(f"{run}/generation.png") > 0
    assert list(summary["judged_positive"]) == [int((answers["p_positive"][6 * i:6 * i + 6] > 0.5).sum())
                                                for i in range(5)]

    # catches: coefficient 0 still steered (or the rows' coefficients mislabelled), the text prompts' rows steered,
    # answers and judgements out of step, a judgement depending on its batch mates or padding, the wrong layer pooled
    task = runs.setup(cli.configure(steer_args(tiny, tmp_path), steer.SETTINGS), with_train=False)
    cfg, tok, messages = task.cfg, task.tokenizer, [m for m in steer.GENERATE_PROMPTS for _ in range(2)]
    coefficient = pd.to_numeric(answers["coefficient"], errors="coerce")  # read as text: the prompts' rows hold ""
    for steering, asked in (("vector at layer 1", messages),
                            ("prompt: make it positive", [f"{m} Make it positive." for m in messages])):
        unsteered = chat.sample(task.model, tok, asked, cfg.TEMPLATE_KWARGS, 8, cfg.TEMPERATURE, cfg.SEED)
        rows = answers[(answers["steering"] == steering) & ((coefficient == 0.0) | coefficient.isna())]
        assert list(rows["text"]) == unsteered.texts
        assert list(rows["fluency"]) == pytest.approx(chat.mean_logprob(task.model, unsteered).tolist(), abs=1e-5)
    # the vector did steer
    assert list(answers["text"][coefficient == -1.0]) != list(answers["text"][coefficient == 0.0])
    assert list(answers["p_positive"]) == pytest.approx([judged_alone(task, judge, judge_primer, t)
                                                         for t in answers["text"]], abs=1e-5)


@torch.no_grad()
def judged_alone(task, judge: str, path: str, text: str) -> float:
    """The judge's probability that text is positive, computed for it alone: its unpadded prompt through the whole
    model, then the two label tokens' softmax (primer) or the probe on the review's mean layer-1 state (probe)."""
    review = torch.tensor(task.tokenizer(text, add_special_tokens=False)["input_ids"][:task.cfg.MAX_REVIEW_TOKENS],
                          dtype=torch.long)
    if judge == "primer":
        primer = load_file(path)["primer"]
        layout = make_layout(task, None, primer_length=len(primer))
        logits = task.model(
            inputs_embeds=layouts.unpadded_embeds(task.model, layout, review, primer)[None]).logits[0, -1]
        return logits[task.label_ids].double().softmax(-1)[1].item()
    probe, layout = load_file(path), make_layout(task, None)
    rows = layouts.unpadded_embeds(task.model, layout, review, None)
    # decoder layer 1's output
    states = task.model(inputs_embeds=rows[None], output_hidden_states=True).hidden_states[1][0]
    (head, tail), = layouts.joined_ids(layout, [review.tolist()])[1].tolist()  # prompt text tokenized with review
    pooled = states[len(layout.prefix) + head:len(rows) - len(layout.suffix) - tail].double()  # its own tokens
    mean = pooled.mean(0) if len(pooled) else torch.zeros(states.shape[1], dtype=torch.float64)
    return torch.sigmoid(mean @ probe["weight"].double() + probe["bias"].double()).item()


def test_generation_is_independent_of_batch_mates_and_coefficient_zero_is_unsteered(tiny, tmp_path, judge_primer):
    # each message's draws are its own: batched answers and fluency must equal lone ones, at any temperature
    args = steer_args(tiny, tmp_path, "--temperature=1.0", "--max_new_tokens=6", "--samples=2",
                      f"--judge_path={judge_primer}")
    task = runs.setup(cli.configure(args, steer.SETTINGS), with_train=False)
    settings = steer.generation_of(task.cfg)
    messages = ["Hi", "Write a much longer request about the food at a restaurant, please."]
    texts, fluency = generation._sample(task, settings, messages, None)
    assert texts[0] != texts[1] or texts[2] != texts[3]  # two samples of a message are two draws
    for i, message in enumerate(messages):
        alone, alone_fluency = generation._sample(task, settings, [message], None)
        assert alone == texts[2 * i:2 * i + 2]
        torch.testing.assert_close(alone_fluency, fluency[2 * i:2 * i + 2], atol=1e-4, rtol=1e-4)
    prompt = prompt_text(task.tokenizer, None, messages[0], task.cfg.TEMPLATE_KWARGS)
    ids = task.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    greedy = task.model.generate(**ids, do_sample=False, max_new_tokens=6)
    near_zero = chat.sample(task.model, task.tokenizer, messages[:1], task.cfg.TEMPLATE_KWARGS, 6, 1e-6, 0)
    assert near_zero.ids.equal(greedy)  # near temperature 0, the greedy answer
    zero = generation._sample(task, settings, messages, frozen.Steer(torch.randn(64) * 50, (1,), 0.0))
    assert zero[0] == texts and torch.equal(zero[1], fluency)


@pytest.mark.parametrize("setting, message", [
    ("--judge_path=None", "--generate=True judges each answer with a trained classifier: set --judge_path"),
    ("--sentiment=joy", "--sentiment='joy' is not one of pair, reviews"),
    ("--prompts_file=nowhere.txt", "--prompts_file=nowhere.txt does not exist"),
])
def test_bad_generation_settings_are_one_line_errors(tiny, tmp_path, judge_primer, setting, message):
    with pytest.raises(errors.UserError, match="^" + re.escape(message)):
        args = steer_args(tiny, tmp_path, "--generate=True", f"--judge_path={judge_primer}", setting)
        steer.run(cli.configure(args, steer.SETTINGS))
