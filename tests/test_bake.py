"""bake.py on the tiny model: a text prompt and a primer baked into LoRA weights, the student's start, the teacher's
logits, resume after a kill, re-scoring a saved adapter, and its errors."""
import glob
import json
import os
import re
import types

import pandas as pd
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import bake
from conftest import overrides, run_until_first_checkpoint
from harness import adapters, chat, cli, errors, frozen, ledger, primers, prompts, runs
from harness.layouts import assemble, make_layout

LORA_PARAMS_PER_RANK = 2 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64)  # tiny: 2 layers of q, k, v (2 kv heads of 16), o


def bake_args(tiny, out, *more: str) -> list[str]:
    return overrides(tiny, out) + ["--lora_rank=4", "--rate_by_epoch=[1e-2, 1e-2, 1e-2]", *more]


@pytest.fixture(scope="module")
def baked(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("bake")
    bake.run(cli.configure(bake_args(tiny, out, "--val_limit=20"), bake.SETTINGS))
    (run_dir,) = glob.glob(f"{out}/results/*-bake")
    return types.SimpleNamespace(out=out, run_dir=run_dir)


def test_baking_a_text_prompt_lowers_the_kl_and_writes_its_adapter_row_and_validation(baked):
    log = pd.read_csv(f"{baked.run_dir}/losses.csv")
    tenth = len(log) // 10
    assert log["loss"][-tenth:].mean() < 0.5 * log["loss"][:tenth].mean()
    validation = pd.read_csv(f"{baked.run_dir}/validation.csv")
    assert list(validation["epoch"]) == [1, 2, 3] and {"kl", "agreement", "score"} <= set(validation.columns)
    assert os.path.isfile(f"{baked.run_dir}/adapter/adapter_model.safetensors")
    (row,) = ledger.rows(f"{baked.out}/results")
    assert row["method"] == "baked long (LoRA r4, q_proj, k_proj, v_proj, o_proj)"
    assert row["trainable_params"] == 4 * LORA_PARAMS_PER_RANK and row["samples"] == 80


def last_logits(model, layout, split, i: int) -> torch.Tensor:
    """Review i of split alone in layout, unpadded, through the whole model: its answer logits in float64."""
    ids, _ = assemble(layout, split, torch.tensor([i]))
    return model(input_ids=ids).logits[0, -1].double()


# catches: KL taken the other way (student || teacher) or over the label tokens alone, agreement or the student's
# answers from the prompted student or the unadapted one, the teacher scored with the adapter on, rows mixed up
def test_the_recovered_teacher_behaviour_equals_a_plain_recount_from_the_saved_adapter(baked, tiny):
    task = runs.setup(cli.configure(bake_args(tiny, baked.out), bake.SETTINGS), with_train=False)
    teacher, student = make_layout(task, *prompts.text_prompt("long")), make_layout(task, None)
    label_ids, test = task.label_ids, task.test
    with torch.no_grad():
        taught = torch.stack([last_logits(task.model, teacher, test, i) for i in range(len(test))])
        with adapters.quiet_peft():
            baked_model = PeftModel.from_pretrained(task.model, f"{baked.run_dir}/adapter").eval()
        learned = torch.stack([last_logits(baked_model, student, test, i) for i in range(len(test))])
    kl = (taught.softmax(-1) * (taught.log_softmax(-1) - learned.log_softmax(-1))).sum(-1)
    recovered = json.load(open(f"{baked.run_dir}/bake.json"))
    assert recovered["kl"] == pytest.approx(kl.mean().item(), rel=1e-4)
    share = lambda same: pytest.approx(same.double().mean().item(), abs=1e-6)  # one review apart is 1/60
    assert recovered["agreement"] == share(taught.argmax(-1) == learned.argmax(-1))
    assert recovered["teacher_score"] == share(taught.argmax(-1) == label_ids[test.labels])
    assert recovered["teacher_restricted_score"] == share(taught[:, label_ids].argmax(-1) == test.labels)
    # the student's answers, as the ledger row counts them
    saved = load_file(f"{baked.run_dir}/predictions.safetensors")
    assert torch.equal(saved["answer"], learned.argmax(-1)) and torch.equal(saved["label"], test.labels)


def test_a_saved_adapter_scores_the_same_counts(baked, tiny):
    bake.run(cli.configure(bake_args(tiny, baked.out, f"--adapter_path={baked.run_dir}/adapter"), bake.SETTINGS))
    first, again = ledger.rows(f"{baked.out}/results")
    assert again["method"].startswith("saved baked adapter")
    assert (again["correct"], again["restricted_correct"]) == (first["correct"], first["restricted_correct"])


def test_the_student_starts_as_the_unprompted_model_and_the_teacher_is_the_plain_model(tiny, tmp_path):
    task = runs.setup(cli.configure(bake_args(tiny, tmp_path), bake.SETTINGS), with_train=False)
    plain, idx = make_layout(task, None), torch.arange(12)
    ids, lengths = assemble(plain, task.test, idx)
    before = frozen.forward(task.model, ids, lengths, plain).logits
    task.model = bake.with_adapter(task)
    assert torch.equal(frozen.forward(task.model, ids, lengths, plain).logits, before)  # B starts at zero
    with torch.no_grad():
        for name, p in task.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert not torch.allclose(frozen.forward(task.model, ids, lengths, plain).logits, before)
    with task.model.disable_adapter():
        assert torch.equal(frozen.forward(task.model, ids, lengths, plain).logits, before)


def test_baking_a_primer_along_sampled_answers_resumes_bitwise_after_a_kill(tiny, tmp_path, monkeypatch):
    task = runs.setup(cli.configure(overrides(tiny, tmp_path)), with_train=False)
    primers.save_primer(str(tmp_path), primers.init_primer(task.model, 4, 0), tiny.model_dir, "system")
    args = bake_args(tiny, tmp_path, "--teacher=primer", f"--primer_path={tmp_path}/primer.safetensors",
                     "--batch_size=4", "--checkpoint_every=5", "--continuations=1", "--continuation_tokens=3",
                     "--val_limit=20")
    bake.run(cli.configure(args + [f"--results_dir={tmp_path}/straight"], bake.SETTINGS))
    (straight,) = glob.glob(f"{tmp_path}/straight/*-bake")
    killed = f"{tmp_path}/killed"
    run_until_first_checkpoint(lambda: bake.run(cli.configure(args + [f"--results_dir={killed}"], bake.SETTINGS)),
                               monkeypatch)
    (killed,) = glob.glob(f"{killed}/*-bake")
    assert not os.path.exists(f"{killed}/adapter")
    sampled = load_file(f"{killed}/continuations.safetensors")["answers"]
    assert sampled.shape == (80, 1, 3)
    monkeypatch.setattr(bake, "sample_continuations",
                        lambda *args: pytest.fail("a resume samples the teacher's answers again"))
    bake.run(cli.configure([f"--resume={killed}"], bake.SETTINGS))
    first, second = (load_file(f"{run}/adapter/adapter_model.safetensors") for run in (straight, killed))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    (row,) = ledger.rows(f"{tmp_path}/killed")
    assert row["method"].startswith("baked primer (LoRA r4")
    pd.testing.assert_frame_equal(pd.read_csv(f"{killed}/validation.csv"), pd.read_csv(f"{straight}/validation.csv"))


def test_sampled_answers_are_each_reviews_own_and_follow_the_teachers_distribution(tiny, tmp_path):
    args = bake_args(tiny, tmp_path, "--continuations=2", "--continuation_tokens=3")
    task = runs.setup(cli.configure(args, bake.SETTINGS))
    task.model = bake.with_adapter(task)
    teacher, _ = prompts.layout_of(task, task.cfg.TEACHER)
    sampled = {}
    for batch_size, temperature in ((7, 1.0), (3, 1.0), (7, 1e-4)):  # other batch mates (as other processes get)
        task.cfg.SCORE_BATCH_SIZE, task.cfg.CONTINUATION_TEMPERATURE = batch_size, temperature
        sampled[batch_size, temperature] = bake.sample_continuations(task, teacher, None)
    assert sampled[7, 1.0].shape == (len(task.train), 2, 3) and torch.equal(sampled[7, 1.0], sampled[3, 1.0])
    rows = torch.arange(len(task.train))
    with torch.no_grad(), task.model.disable_adapter():
        greedy = bake.answer_logits(task, teacher, task.train, rows, None).argmax(-1)
    assert (sampled[7, 1e-4][:, :, 0] == greedy[:, None]).all()  # near temperature 0, the argmax
    assert (sampled[7, 1.0][:, :, 0] != greedy[:, None]).float().mean() > 0.5  # the tiny model's answers are spread
    assert (sampled[7, 1.0][:, 0] != sampled[7, 1.0][:, 1]).any()  # two answers per review, drawn apart
    evenly = (torch.arange(1000) + 0.5) / 1000  # uniforms spread evenly: each token drawn in proportion to its chance
    for temperature, share in ((1.0, 0.2), (0.5, 0.04 / 0.68)):
        drawn = chat.draw(torch.tensor([[0.2, 0.8]]).log().expand(1000, 2), evenly, temperature)
        assert drawn.bincount().tolist() == [round(1000 * share), 1000 - round(1000 * share)]


def test_logits_along_appended_answers_are_each_rows_own(tiny, tmp_path):
    task = runs.setup(cli.configure(overrides(tiny, tmp_path)), with_train=False)
    layout, idx = make_layout(task, "Be brief."), torch.tensor([0, 7, 3])  # reviews of different lengths
    answers = torch.randint(10, 300, (3, 4), generator=torch.Generator().manual_seed(0))
    logits = bake.answer_logits(task, layout, task.test, idx, answers=answers)
    assert logits.shape == (3, 5, task.model.config.vocab_size)
    for row, i in enumerate(idx.tolist()):
        ids, lengths = assemble(layout, task.test, torch.tensor([i]))
        alone = task.model(input_ids=torch.cat([ids[0, :lengths[0]], answers[row]])[None]).logits[0, -5:]
        torch.testing.assert_close(logits[row], alone.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("settings, message", [
    ("--teacher=medium", "--teacher='medium' is not one of none, short, long, text:<words> or primer"),
    ("--teacher=primer", "--teacher=primer needs --primer_path="),
    ("--lora_rank=0", "--lora_rank=0 must be at least 1"),
    ("--rate_scale=embedding", "--rate_scale='embedding': a LoRA adapter's rates are Adam's own"),
    ("--continuations=1 --teacher=primer --primer_path=x --primer_position=suffix",
     "--continuations needs the teacher's prompt before the review"),
    ("--lora_targets=['attention']", "--lora_targets=['attention'] names none of this model's modules"),
    ("--adapter_path=nowhere", "--adapter_path=nowhere holds no adapter"),
    ("--teacher=primer --primer_path=WIDE",
     "--primer_path=WIDE holds vectors of shape (4, 32), but this model's embeddings are 64 wide"),
])
def test_bad_settings_are_one_line_errors(tiny, tmp_path, settings, message):
    wide = f"{tmp_path}/wide.safetensors"
    save_file({"primer": torch.zeros(4, 32)}, wide)
    settings, message = settings.replace("WIDE", wide), message.replace("WIDE", wide)
    with pytest.raises(errors.UserError, match="^" + re.escape(message)):
        bake.run(cli.configure(bake_args(tiny, tmp_path, *settings.split()), bake.SETTINGS))
