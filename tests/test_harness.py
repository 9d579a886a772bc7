import copy
import json

import pytest
import torch

import experiment
import prompt_short
from harness import cli, errors, frozen, hub, layouts, ledger, primers, runs, scoring


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    from conftest import overrides
    return runs.setup(cli.configure(overrides(tiny, tmp_path_factory.mktemp("harness"))))


def test_text_layout_is_the_chat_template_tokenized(task):
    layout = layouts.make_layout(task, prompt_short.SYSTEM, prompt_short.USER)
    ids, lengths = layouts.assemble(layout, task.test, torch.tensor([3]))
    review = task.tokenizer.decode(task.test.tokens[task.test.offsets[3]:task.test.offsets[4]].tolist())
    messages = [{"role": "system", "content": prompt_short.SYSTEM},
                {"role": "user", "content": prompt_short.USER.replace("{review}", review)}]
    text = task.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              date_string="26 Jul 2024")
    assert ids[0].tolist() == task.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert lengths.tolist() == [ids.shape[1]]


def test_primer_slot_is_the_system_message(task):
    layout = layouts.make_layout(task, None, primer_length=4)
    decode = lambda t: task.tokenizer.decode(t.tolist())
    assert decode(layout.prefix[:layout.slot.start]).endswith("system<|end_header_id|>\n\nToday Date: 26 Jul 2024\n\n")
    assert decode(layout.prefix[layout.slot.stop:]) == "<|eot_id|><|start_header_id|>user<|end_header_id|>"
    assert layout.joins == ("\n\n", "")  # tokenized with the review: no special token between them
    assert decode(layout.suffix) == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert layout.slot.stop - layout.slot.start == layout.prompt_tokens == 4


def test_assemble_right_pads_each_review_in_its_layout(task):
    layout = layouts.make_layout(task, None, primer_length=4)
    idx = torch.tensor([5, 0, 9])
    ids, lengths = layouts.assemble(layout, task.test, idx)
    for row, i in enumerate(idx):
        text = task.tokenizer.decode(task.test.tokens[task.test.offsets[i]:task.test.offsets[i + 1]])
        review = task.tokenizer("\n\n" + text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        expected = torch.cat([layout.prefix, review, layout.suffix])
        assert lengths[row] == len(expected)
        assert torch.equal(ids[row, :len(expected)], expected) and (ids[row, len(expected):] == 0).all()


def test_logits_do_not_depend_on_batch_mates_or_padding(task):
    layout = layouts.make_layout(task, None, primer_length=4)
    primer = primers.init_primer(task.model, 4, seed=1)
    lengths = task.test.lengths
    short, long_ = int(lengths.argmin()), int(lengths.argmax())
    assert lengths[long_] > lengths[short] + 10  # so the short review gets real padding below

    def logits(idx):
        ids, n = layouts.assemble(layout, task.test, torch.tensor(idx))
        return frozen.forward(task.model, ids, n, layout, primer).logits

    alone = logits([short])[0]
    for batch in ([short, long_], [long_, 7, short, 2], [short] * 3):
        together = logits(batch)[batch.index(short)]
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_score_matches_a_plain_full_forward(task):
    """score() against the model's own forward pass over each unpadded sequence, full logits, one review at a time."""
    layout = layouts.make_layout(task, prompt_short.SYSTEM, prompt_short.USER)
    metrics = scoring.score(task, layout, None)
    strict = restricted = answered = 0
    for i in range(len(task.test)):
        ids, _ = layouts.assemble(layout, task.test, torch.tensor([i]))
        logits = task.model(input_ids=ids).logits[0, -1]
        label = int(task.test.labels[i])
        strict += int(logits.argmax() == task.label_ids[label])
        restricted += int(logits[task.label_ids].argmax() == label)
        answered += int(logits.argmax() in task.label_ids.tolist())
    assert (metrics["correct"], metrics["restricted_correct"]) == (strict, restricted)
    assert metrics["label_answer_share"] == answered / len(task.test) and metrics["total"] == len(task.test)


# catches: the global mean and std (or those of the wrong axis) in place of each dimension's, dimensions shuffled,
# and norms that are not some embedding row's
def test_primer_init_matches_embedding_statistics(task):
    # its table given per-dimension means and spreads far apart, unlike a random init's
    model = copy.deepcopy(task.model)
    table = model.get_input_embeddings().weight
    hidden = table.shape[1]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        table.copy_(torch.linspace(-1, 1, hidden)[torch.randperm(hidden, generator=gen)]
                    + torch.linspace(0.5, 1.5, hidden) * torch.randn(table.shape, generator=gen))
    primer = primers.init_primer(model, 20000, seed=0)
    assert primer.dtype == torch.float32 and primer.shape == (20000, hidden)
    assert torch.equal(primer, primers.init_primer(model, 20000, seed=0))
    assert not torch.equal(primer, primers.init_primer(model, 20000, seed=1))
    mean, std = table.mean(0), table.std(0)
    # each vector rescaled to a row norm: close, not equal
    assert ((primer.mean(0) - mean).abs() < 0.03 * mean.abs() + 0.05 * std).all()
    assert ((primer.std(0) - std).abs() < 0.08 * std).all()  # a global std is 20-40% off in some dimension
    row_norms = table.norm(dim=1)
    assert all(torch.isclose(row_norms, n, rtol=1e-5).any() for n in primer[:16].norm(dim=1))  # each norm is some row's


def test_training_moves_only_the_primer_and_makes_the_model_answer_with_labels(task, tmp_path):
    layout = layouts.make_layout(task, None, primer_length=4)
    primer = primers.init_primer(task.model, 4, task.cfg.SEED)
    weights = {k: v.clone() for k, v in task.model.state_dict().items()}
    before = scoring.score(task, layout, primer)
    log, status, _ = experiment.train_primer(task, layout, primer, str(tmp_path))
    after = scoring.score(task, layout, primer)
    assert before["label_answer_share"] < 0.1 and after["label_answer_share"] > 0.9
    first, last = (sum(r["loss"] for r in log if r["epoch"] == e) for e in (1, 3))
    assert last < 0.7 * first
    assert all(torch.equal(v, weights[k]) for k, v in task.model.state_dict().items())
    assert not any(p.requires_grad for p in task.model.parameters())
    assert [r["lr"] for r in log][::10] == [0.1, 0.1, 0.1]  # 10 steps per epoch at the configured rates


def test_gradient_checkpointing_changes_memory_not_results(task):
    """The same loss and primer gradient with and without checkpointing the layers."""
    layout = layouts.make_layout(task, None, primer_length=4)
    ids, lengths = layouts.assemble(layout, task.train, torch.arange(6))
    targets = task.label_ids[task.train.labels[:6]]

    def loss_and_grad():
        primer = primers.init_primer(task.model, 4, seed=0).requires_grad_(True)
        logits = frozen.forward(task.model, ids, lengths, layout, primer).logits
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()
        return loss.detach(), primer.grad

    plain = loss_and_grad()
    hub.freeze(task.model, checkpointing=True)
    try:
        checkpointed = loss_and_grad()
        calls = []
        hook = task.model.base_model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        loss_and_grad()
        hook.remove()
    finally:
        task.model.activation_checkpointing_disable()
        task.model.eval()
    assert len(calls) == 2  # the first layer's MLP ran again in the backward pass: checkpointing really was on
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_non_finite_loss_stops_training_and_keeps_the_last_good_primer(tiny, tmp_path, capsys):
    from conftest import overrides
    # float16 activations overflow once one Adam step of this size has moved the primer
    cfg = cli.configure(overrides(tiny, tmp_path) + ["--dtype=float16", "--rate_by_epoch=[1e5]"])
    task = runs.setup(cfg)
    layout = layouts.make_layout(task, None, primer_length=4)
    primer = primers.init_primer(task.model, 4, seed=0)
    start = primer.clone()
    log, status, _ = experiment.train_primer(task, layout, primer, str(tmp_path))
    assert len(log) == 1 and torch.isfinite(torch.tensor(log[0]["loss"]))
    assert torch.equal(primer, start)  # the only primer whose loss was finite
    assert "training stopped at epoch 1, batch 1: loss nan; keeping the last good primer" in capsys.readouterr().out
    assert status == "stopped early at epoch 1, batch 1: non-finite loss nan"
    run_dir = runs.new_run_dir(cfg, "experiment")
    runs.record(task, "experiment", "primer", 4, scoring.predict(task, layout, primer), run_dir, log, primer.numel(),
                status)
    (row,) = ledger.rows(cfg.RESULTS_DIR)
    assert row["status"] == status and json.load(open(f"{run_dir}/metrics.json"))["status"] == status
    assert f"| {status} |" in capsys.readouterr().out


def test_answers_are_read_from_float32_logits_in_a_bfloat16_model(task):
    """Two label logits that tie in bfloat16 (its step is 0.25 at 50) but not in float32 pick the right label."""
    model = copy.deepcopy(task.model).to(torch.bfloat16)
    layout = layouts.make_layout(task, None, primer_length=0)
    ids, lengths = layouts.assemble(layout, task.test, torch.tensor([0]))
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state[0, -1]
        one, two = task.label_ids.tolist()
        head = model.get_output_embeddings().weight
        head[one] = (hidden.float() * 50 / hidden.float().square().sum()).to(torch.bfloat16)  # logit about 50
        head[two] = head[one]
        j = int(hidden.float().abs().argmax())
        head[two, j] = torch.nextafter(head[one, j], head[one, j] + hidden[j].sign())  # one bfloat16 step up the logit
        in_bf16 = model.get_output_embeddings()(hidden)[[one, two]]
        logits = frozen.forward(model, ids, lengths, layout, None).logits[0, [one, two]]
    assert in_bf16[0] == in_bf16[1], "the case no longer ties in bfloat16: pick another magnitude"
    assert logits.dtype == torch.float32 and logits[1] > logits[0]


def test_rates_are_in_embedding_stds_and_a_stalled_run_says_so(task, tmp_path, capsys):
    layout = layouts.make_layout(task, None, primer_length=4)
    for run in ("scaled", "stalled", "wrong"):
        (tmp_path / run).mkdir()
    task.cfg.RATE_BY_EPOCH, task.cfg.RATE_SCALE = [0.5], "embedding"
    try:
        primer = primers.init_primer(task.model, 4, seed=0)
        log, *_ = experiment.train_primer(task, layout, primer, str(tmp_path / "scaled"))
        assert [r["lr"] for r in log] == pytest.approx([0.5 * primers.embedding_std(task.model)] * 10)
        capsys.readouterr()
        task.cfg.RATE_BY_EPOCH = [0.0]
        experiment.train_primer(task, layout, primers.init_primer(task.model, 4, seed=0), str(tmp_path / "stalled"))
        assert "note: training barely changed the primer (it moved 0.00 embedding stds" in capsys.readouterr().out
        task.cfg.RATE_SCALE = "relative"
        with pytest.raises(errors.UserError, match="--rate_scale='relative' is not one of embedding, absolute"):
            runs._check_choices(task.cfg, with_train=True)  # in setup, before data prep and loading
    finally:
        task.cfg.RATE_BY_EPOCH, task.cfg.RATE_SCALE = [0.1, 0.1, 0.1], "absolute"
