import os
import pickle

import numpy as np
import pytest
import torch

import cli
import data
from conftest import overrides, run_script, write_yelp_csv


def test_csv_quirks_are_decoded(tmp_path):
    path = tmp_path / "quirks.csv"
    good = [(2, 'Said "wow", then left.\n\nGreat!')] * 120
    write_yelp_csv(str(path), good)
    raw = path.read_text(encoding="utf-8")
    assert '\\n\\nGreat' in raw and '""wow""' in raw  # the public format's escapes are really in the file
    path.write_text("\ufeff" + raw + '"3","a third label"\n', encoding="utf-8")  # a byte-order mark and one bad row
    labels, texts, bad = data.read_csv(str(path))
    assert texts[0] == 'Said "wow", then left.\n\nGreat!'
    assert len(texts) == 120 and set(labels) == {1} and bad == [121]


def test_csv_with_too_many_bad_rows_is_refused(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('"1","fine"\n"x","label"\n', encoding="utf-8")
    with pytest.raises(cli.UserError, match="rows are not"):
        data.read_csv(str(path))


def test_balanced_sample_is_seeded_and_balanced():
    labels = np.array([0] * 70 + [1] * 30)
    sample = data.balanced_sample(labels, 40, seed=0)
    assert np.bincount(labels[sample]).tolist() == [20, 20]
    assert (sample == data.balanced_sample(labels, 40, seed=0)).all()
    assert not (sample == data.balanced_sample(labels, 40, seed=1)).all()
    assert np.bincount(labels[data.balanced_sample(labels, 80, seed=0)]).tolist() == [50, 30]  # too few positives
    assert len(data.balanced_sample(labels, 1000, seed=0)) == 100


def test_prep_writes_safe_tokenized_splits(tiny, tmp_path):
    result = run_script("prep.sh", *overrides(tiny, tmp_path))
    assert result.returncode == 0, result.stderr
    tokenizer = data.load_tokenizer(tiny.model_dir)
    for split, count in (("train", 100), ("test", 60)):
        stored = torch.load(tmp_path / "data" / f"{split}.pt", weights_only=True)
        meta = stored["meta"]
        assert meta["model_id"] == tiny.model_dir and meta["count"] == count and meta["limit"] == count
        assert meta["vocab_fingerprint"] == data.vocab_fingerprint(tokenizer) and meta["vocab_size"] == len(tokenizer)
        assert stored["labels"].sum() == count // 2
        offsets = stored["offsets"]
        assert offsets[-1] == len(stored["tokens"])
        texts = {text for _, text in tiny.splits[split]}
        decoded = [tokenizer.decode(stored["tokens"][offsets[i]:offsets[i + 1]].tolist()) for i in range(count)]
        assert all(text in texts for text in decoded)  # reviews round-trip, escapes decoded
        assert any("\n\nThey said \"come back\"" in text for text in decoded)


def test_load_split_refuses_other_tokenizer_stale_config_and_pickles(tiny, tmp_path, cfg):
    tokenizer = data.load_tokenizer(tiny.model_dir)
    data.load_split(cfg, tokenizer, "test")  # prepares both splits itself when they are missing
    path = tmp_path / "data" / "test.pt"
    stored = torch.load(path, weights_only=True)
    cfg.TEST_LIMIT = 50
    with pytest.raises(cli.UserError, match=r"prepared with limit=60: run ./prep.sh --test_limit=50"):
        data.load_split(cfg, tokenizer, "test")
    stored["meta"].update(model_id="other/model", vocab_fingerprint="0" * 16)
    torch.save(stored, path)
    with pytest.raises(cli.UserError, match=f"tokenized for other/model, not for {tiny.model_dir}"):
        data.load_split(cfg, tokenizer, "test")
    with open(path, "wb") as f:
        pickle.dump({"meta": os.system}, f)  # a crafted pickle that would call a function if unpickled
    with pytest.raises(cli.UserError, match="not a file prep wrote"):
        data.load_split(cfg, tokenizer, "test")
