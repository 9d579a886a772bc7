"""The primer's own pieces: its initializations, training that moves it alone, rates in embedding stds."""
import copy
import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import experiment
from conftest import TINY_RUN, overrides
from harness import cli, errors, layouts, primers, runs, scoring

TEXT = "text:great food"  # three tokens for the tiny tokenizer


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


def test_primer_inits_are_the_embeddings_they_name(task):
    table = task.model.get_input_embeddings().weight
    start = lambda init, length=5, seed=0: primers.initial_primer(task, init, length, seed)
    assert torch.equal(start("random"), primers.init_primer(task.model, 5, 0))  # the reference's, unchanged

    vocab = start("vocab")
    tokens = primers.primer_init_tokens(task, "vocab", 5, 0)
    assert torch.equal(vocab, table[tokens]) and len(set(tokens.tolist())) == 5
    assert not set(tokens.tolist()) & set(task.tokenizer.added_tokens_decoder)  # no special tokens
    assert torch.equal(vocab, start("vocab")) and not torch.equal(vocab, start("vocab", seed=1))

    l0, l1 = table[task.label_ids]
    assert torch.equal(start("labels"), torch.stack([l0, l1, l0, l1, l0]))

    words = task.tokenizer("great food", add_special_tokens=False)["input_ids"]
    assert 1 < len(words) < 5
    assert torch.equal(start(TEXT), table[(words * 5)[:5]])  # cycled
    assert torch.equal(start(TEXT, length=1), table[words[:1]])  # cut

    for init in ("random", "vocab", "labels", TEXT):
        primer = start(init)
        assert primer.dtype == torch.float32 and primer.shape == (5, table.shape[1]) and primer.device == task.device
        assert not primer.requires_grad and primer.data_ptr() != table.data_ptr()


@pytest.mark.parametrize("init, message", [("zeros", "is not one of 'random', 'vocab', 'labels', 'text:<words>'"),
                                           ("text:", "has no text")])
def test_bad_primer_init_is_refused(task, init, message):
    with pytest.raises(errors.UserError, match=message):
        primers.initial_primer(task, init, 4, 0)


@pytest.mark.parametrize("init", ["vocab", "labels", TEXT])
def test_each_primer_init_is_where_a_run_starts(tiny, tmp_path_factory, task, init):
    """At learning rate 0 Adam leaves the primer as it started, so the saved primer is the initial one."""
    out = tmp_path_factory.getbasetemp() / "knob_inits"  # one data folder for the three runs
    experiment.run(cli.configure([*overrides(tiny, out), *TINY_RUN, "--rate_by_epoch=[0.0]", f"--primer_init={init}"]))
    run = out / "results" / pd.read_csv(out / "results" / "results.csv")["run_id"].iloc[-1]
    assert json.loads((run / "config.json").read_text())["primer_init"] == init
    assert torch.equal(load_file(str(run / "primer.safetensors"))["primer"], primers.initial_primer(task, init, 4, 0))
