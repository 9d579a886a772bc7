"""In-context examples and contextual calibration (harness.shots, --shots and --calibrate of the text prompts) on the
tiny model: the examples are chat turns of training reviews, the layout is the template's own tokens, scores do not
depend on batch mates, and calibration divides by the content-free probabilities."""
import glob
import json
import re

import pytest
import torch

import prompt_short
from conftest import overrides
from harness import cli, errors, frozen, layouts, ledger, runs, scoring, shots


def shot_args(tiny, out, *more: str) -> list[str]:
    return overrides(tiny, out) + ["--val_limit=20", *more]


def settings():
    return {"SHOTS": prompt_short.SHOTS, "CALIBRATE": prompt_short.CALIBRATE}


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    return runs.setup(cli.configure(shot_args(tiny, tmp_path_factory.mktemp("shots"), "--shots=4"), settings()))


def test_examples_are_balanced_seeded_training_reviews_as_chat_turns(task):
    turns = shots.examples(task, 4)
    assert sorted(label for _, label in turns) == ["1", "1", "2", "2"]
    train_texts = set(task.tokenizer.batch_decode(
        [task.train.tokens[task.train.offsets[i]:task.train.offsets[i + 1]].tolist() for i in range(len(task.train))],
        clean_up_tokenization_spaces=False))
    assert all(text in train_texts for text, _ in turns)  # drawn from the training reviews, not validation or test
    assert shots.examples(task, 4) == turns and shots.examples(task, 0) == ()
    layout = layouts.make_layout(task, prompt_short.SYSTEM, prompt_short.USER, turns=turns)
    review = task.test.tokens[task.test.offsets[0]:task.test.offsets[1]].tolist()
    text = task.tokenizer.decode(review, clean_up_tokenization_spaces=False)
    messages = [{"role": "system", "content": prompt_short.SYSTEM}]
    for u, a in turns:
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": prompt_short.USER.replace("{review}", text)})
    whole = task.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                               **task.cfg.TEMPLATE_KWARGS)
    ids, lengths = layouts.assemble(layout, task.test, torch.tensor([0]))
    assert ids[0, :lengths[0]].tolist() == layouts.encode(task.tokenizer, whole)  # exactly the template's tokens
    plain = layouts.make_layout(task, prompt_short.SYSTEM, prompt_short.USER)
    assert layout.prompt_tokens > plain.prompt_tokens + sum(len(layouts.encode(task.tokenizer, u)) for u, _ in turns)


def test_a_few_shot_score_is_independent_of_batch_mates(task):
    layout = layouts.make_layout(task, prompt_short.SYSTEM, prompt_short.USER, turns=shots.examples(task, 4))
    ids, lengths = layouts.assemble(layout, task.test, torch.tensor([0]))
    with torch.no_grad():
        alone = frozen.forward(task.model, ids, lengths, layout).logits[0]
        ids, lengths = layouts.assemble(layout, task.test, torch.tensor([3, 0, 7]))
        together = frozen.forward(task.model, ids, lengths, layout).logits[1]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_calibration_divides_by_the_content_free_label_probabilities(task):
    layout = layouts.make_layout(task, prompt_short.SYSTEM, prompt_short.USER, turns=shots.examples(task, 2))
    bias = shots.label_bias(task, layout)
    assert torch.allclose(bias.exp().sum(), torch.tensor(1.0))
    # "": the prompt, no review
    ids, lengths = layouts.assemble(layout, shots.content_free_split(task), torch.tensor([1]))
    whole = layouts.prompt_text(task.tokenizer, prompt_short.SYSTEM, prompt_short.USER.replace("{review}", ""),
                                task.cfg.TEMPLATE_KWARGS, shots.examples(task, 2))
    assert ids[0, :lengths[0]].tolist() == layouts.encode(task.tokenizer, whole)
    predictions = scoring.predict(task, layout)
    calibrated = shots.calibrate(predictions, bias)
    raw = predictions["logprobs"].log_softmax(-1).exp()
    expected = (raw / bias.exp()) / (raw / bias.exp()).sum(-1, keepdim=True)
    torch.testing.assert_close(calibrated["logprobs"].exp(), expected)
    assert (torch.equal(calibrated["answer"], predictions["answer"])
            and torch.equal(calibrated["raw_logprobs"], predictions["logprobs"]))
    # a prompt that always prefers one label is balanced by its own bias: content-free inputs score 50:50 after it
    free = scoring.predict(task, layout, split=shots.content_free_split(task))
    assert torch.allclose(shots.calibrate(free, bias)["logprobs"].exp().mean(0), torch.tensor([0.5, 0.5]), atol=0.1)


def test_the_scripts_record_shots_and_calibration(tiny, tmp_path):
    cfg = cli.configure(shot_args(tiny, tmp_path, "--shots=2", "--calibrate=True"), settings())
    row = runs.score_text_prompt(cfg, "prompt_short", prompt_short.SYSTEM, prompt_short.USER, cfg.SHOTS, cfg.CALIBRATE)
    assert row["method"] == "text prompt (2 shots), calibrated" and row["samples"] == 0
    (run_dir,) = glob.glob(f"{tmp_path}/results/*-prompt_short")
    saved = json.load(open(f"{run_dir}/calibration.json"))
    assert saved["content_free"] == ["N/A", "", "[MASK]"] and abs(sum(saved["label_probabilities"]) - 1) < 1e-5
    plain = runs.score_text_prompt(cli.configure(shot_args(tiny, tmp_path, "--shots=2"), settings()), "prompt_short",
                                   prompt_short.SYSTEM, prompt_short.USER, 2)
    # the strict answer is the same
    assert plain["method"] == "text prompt (2 shots)" and plain["correct"] == row["correct"]
    assert saved["raw_restricted_correct"] == plain["restricted_correct"]
    assert len(ledger.rows(f"{tmp_path}/results")) == 2


@pytest.mark.parametrize("setting, message", [("--shots=-1", "--shots=-1 must be 0 or more"),
                                              ("--shots=500",
                                               "--shots=500 needs 500 training reviews, but there are 80")])
def test_bad_shots_are_one_line_errors(tiny, tmp_path, setting, message):
    with pytest.raises(errors.UserError, match="^" + re.escape(message)):
        cfg = cli.configure(shot_args(tiny, tmp_path, setting), settings())
        runs.score_text_prompt(cfg, "prompt_short", "Classify.", "{review}", cfg.SHOTS)
