"""CSVs to splits: quirks and dirty rows, seeded balanced samples, nested training sets and the validation hold-out,
splits prepared again when their sample or tokenizer changes."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY_RUN, overrides, run_script
from harness import cli, data, errors, hub, runs


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    return runs.setup(cli.configure(overrides(tiny, tmp_path_factory.mktemp("data")) + TINY_RUN))


def test_csv_quirks_are_decoded(tmp_path):
    path = tmp_path / "quirks.csv"
    good = [(2, 'Said "wow", then left.\n\nGreat!')] * 120
    data.write_csv(str(path), *zip(*good))
    raw = path.read_text(encoding="utf-8")
    assert '\\n\\nGreat' in raw and '""wow""' in raw  # the public format's escapes are really in the file
    path.write_text("\ufeff" + raw + '"3","a third label"\n', encoding="utf-8")  # a byte-order mark and one bad row
    labels, texts, bad = data.read_csv(str(path))
    assert texts[0] == 'Said "wow", then left.\n\nGreat!'
    assert len(texts) == 120 and set(labels) == {1} and bad == [121]


DIRTY_ROWS = [b'"3","a third label"', b'"1"', b'"2",""', b'"1","   "', b'"2","caf\xe9 au lait"', b'"label","text"']


def test_each_kind_of_dirty_row_is_counted_reported_and_skipped(tmp_path, capsys):
    path = tmp_path / "dirty.csv"
    good = [b'"1","fine"', b' "2" , "  stray whitespace around both fields  "'] * 400  # whitespace is stripped, kept
    # a byte-order mark first
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(good[:300] + DIRTY_ROWS + good[300:]) + b"\n")
    labels, texts, bad = data.read_csv(str(path))
    assert bad == list(range(301, 301 + len(DIRTY_ROWS)))  # every kind, at its own line
    assert (len(texts) == 800 and labels.tolist() == [0, 1] * 400
            and texts[:2] == ["fine", "stray whitespace around both fields"])
    assert capsys.readouterr().out == (
        f"{path}: skipping 6 of 806 rows that are not '\"1\" or \"2\",\"review\"' "
        "(line 301: label '3' is not \"1\" or \"2\"; "
        "line 302: 1 fields, not 2; line 303: empty review; line 304: empty review; "
        "line 305: bytes that are not UTF-8; ...); "
        "up to 1% may be\n")  # each row's reason, and the share tolerated


def test_prep_writes_nothing_when_one_csv_is_too_dirty(tiny, tmp_path):
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "train.csv").write_bytes(open(os.path.join(tiny.csv_dir, "train.csv"), "rb").read())
    (csv_dir / "test.csv").write_bytes(b'"1","fine"\n' * 50 + b'"x","y"\n')  # 2% bad
    result = run_script("prep.sh", *overrides(tiny, tmp_path), f"--csv_dir={csv_dir}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"error: {csv_dir}/test.csv: 1 of 51 rows are not "
                                                      "'\"1\" or \"2\",\"review\"' "
                                                      "(line 51: label 'x' is not \"1\" or \"2\"), "
                                                      "more than the 1% of rows tolerated: fix or replace the file")
    assert not os.path.exists(tmp_path / "data" / "train.pt")  # train.csv was fine, but nothing is written


def test_long_reviews_keep_their_first_tokens(tiny, tmp_path, cfg):
    cfg.MAX_REVIEW_TOKENS = 8
    tokenizer = hub.load_tokenizer(tiny.model_dir)
    split = data.load_split(cfg, tokenizer, "test")
    assert split.meta["truncated"] > 0 and int(split.lengths.max()) == 8
    full = {tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) for _, text in tiny.splits["test"]}
    for i in range(len(split)):
        head = tuple(split.tokens[split.offsets[i]:split.offsets[i + 1]].tolist())
        assert any(ids[:8] == head for ids in full)


def test_csv_with_too_many_bad_rows_is_refused_without_saying_skipped(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    rows = ['"1","fine"'] * 117 + ['"x","label"', '"2",""']  # 2 of 119: over 1%
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(errors.UserError, match=r"2 of 119 rows are not .* \(line 118: label 'x' is not \"1\" or \"2\"; "
                                               r"line 119: empty review\), more than the 1% of rows tolerated: fix"):
        data.read_csv(str(path))
    assert capsys.readouterr().out == ""  # nothing was skipped: the file is refused
    path.write_text("\n".join(rows[1:118]) + "\n", encoding="utf-8")  # 1 of 117: within 1%
    assert len(data.read_csv(str(path))[1]) == 116 and "skipping 1 of 117 rows" in capsys.readouterr().out


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
    tokenizer = hub.load_tokenizer(tiny.model_dir)
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


def test_a_data_curve_nests_its_training_sets_and_keeps_one_validation_set(tiny, tmp_path):
    """--train_reviews below, at and above what --train_limit leaves after --val_limit: one validation set, each
    training set inside the next, label-balanced, and train_reviews=0 the run it was before the setting existed."""
    tokenizer = hub.load_tokenizer(tiny.model_dir)
    ids = lambda split: {tuple(split.tokens[split.offsets[i]:split.offsets[i + 1]].tolist()) for i in range(len(split))}
    sets = {}
    for reviews in (0, 10, 30, 50, 90):  # the 40-review sample leaves 30; 50 and 90 take the next reviews of train.csv
        cfg = cli.configure([*overrides(tiny, tmp_path / str(reviews)), "--train_limit=40", "--val_limit=10",
                             f"--train_reviews={reviews}"])
        train, val = data.training_sets(data.load_split(cfg, tokenizer, "train"), 10, reviews, 0)
        assert len(train) == (reviews or 30) and train.labels.sum() == len(train) // 2 and len(val) == 10
        sets[reviews] = ids(train), ids(val)
    assert all(val == sets[0][1] for _, val in sets.values())  # the same validation reviews at every size
    assert sets[30] == sets[0]  # all that the sample leaves: train_reviews=0
    assert sets[10][0] < sets[30][0] < sets[50][0] < sets[90][0]  # nested
    assert not sets[90][0] & sets[0][1]  # validation reviews are never trained on
    stored = torch.load(tmp_path / "90" / "data" / "train.pt", weights_only=True)
    assert (stored["meta"]["base"], stored["meta"]["extra"]) == (40, 60)


def test_load_split_prepares_again_for_another_sample_or_tokenizer_and_refuses_pickles(tiny, tmp_path, cfg, capsys):
    tokenizer = hub.load_tokenizer(tiny.model_dir)
    assert len(data.load_split(cfg, tokenizer, "test")) == 60  # prepares the split itself when it is missing
    path, train = tmp_path / "data" / "test.pt", tmp_path / "data" / "train.pt"
    assert not train.exists()  # only the split asked for
    assert len(data.load_split(cfg, tokenizer, "train")) == 100
    before = train.read_bytes()
    cfg.TEST_LIMIT = 50
    capsys.readouterr()
    split = data.load_split(cfg, tokenizer, "test")  # another --test_limit: the CSVs are there, so prepared again
    assert len(split) == 50 and split.meta["limit"] == 50 and int(split.labels.sum()) == 25
    assert (f"{path} was prepared with limit=60, not 50: preparing it again from {tiny.csv_dir}"
            in capsys.readouterr().out)
    assert train.read_bytes() == before  # the other split is kept as it was
    # now current: loaded as is
    assert len(data.load_split(cfg, tokenizer, "test")) == 50 and capsys.readouterr().out == ""
    cfg.SEED, tested = 1, path.read_bytes()  # another seed: other training reviews, the same test reviews
    assert data.load_split(cfg, tokenizer, "train").meta["seed"] == 1 and train.read_bytes() != before
    assert data.load_split(cfg, tokenizer, "test").meta["seed"] == 0 and path.read_bytes() == tested
    assert "test.pt" not in capsys.readouterr().out
    stored = torch.load(path, weights_only=True)
    stored["meta"].update(model_id="other/model", vocab_fingerprint="0" * 16)
    torch.save(stored, path)
    assert data.load_split(cfg, tokenizer, "test").meta["vocab_fingerprint"] == data.vocab_fingerprint(tokenizer)
    assert f"prepared with the tokenizer of other/model, not {tiny.model_dir}'s" in capsys.readouterr().out
    with open(path, "wb") as f:
        pickle.dump({"meta": os.system}, f, protocol=2)  # a crafted pickle that would call a function if unpickled
        # (protocol 2, torch.save's own: another makes torch.load warn before it refuses the file)
    with pytest.raises(errors.UserError, match="not a file prep wrote"):
        data.load_split(cfg, tokenizer, "test")


def test_tokenizing_counts_reviews_not_thousands(tiny, capfd):
    tokenizer = hub.load_tokenizer(tiny.model_dir)
    tokens, offsets, truncated = data.tokenize(tokenizer, ["good food"] * 1500, 1024)
    assert len(offsets) == 1501 and int(offsets[-1]) == len(tokens) and truncated == 0
    bar = capfd.readouterr().err
    assert "1500/1500" in bar and " reviews/s" in bar and "x1000" not in bar


PUBLIC_LINES = ['"2","Said ""wow"", then left.\\n\\nGreat!"',
                '"1","Caf\u00e9 na\u00efve \u2014 \u201csmart\u201d quotes, \u00fcber-bad."',
                '"2","A backslash-n at the end\\n"', '"1","Line one.\\nLine two ""quoted"" here?"'] * 30
# the first two rows of the public train.csv, as huggingface/datasets' dummy data for yelp_polarity holds them
REAL_LINES = [('"1","Unfortunately, the frustration of being Dr. Goldberg\'s patient is a repeat of the experience '
               'I\'ve had with so many other doctors in NYC -- good doctor, terrible staff.  It seems that his '
               'staff simply never answers the phone.  It usually takes 2 hours of repeated calling to get an '
               'answer.  Who has time for that or wants to deal with it?  I have run into this problem with many '
               'other doctors and I just don\'t get it.  You have office workers, you have patients with medical '
               'needs, why isn\'t anyone answering the phone?  It\'s incomprehensible and not work the '
               'aggravation.  It\'s with regret that I feel that I have to give Dr. Goldberg 2 stars."'),
              ('"2","Been going to Dr. Goldberg for over 10 years. I think I was one of his 1st patients when he '
               'started at MHMG. He\'s been great over the years and is really all about the big picture. It is '
               'because of him, not my now former gyn Dr. Markoff, that I found out I have fibroids. He explores '
               'all options with you and is very patient and understanding. He doesn\'t judge and asks all the '
               'right questions. Very thorough and wants to be kept in the loop on every aspect of your medical '
               'health and your life."')]


@pytest.fixture
def hub_yelp_polarity():
    """A stand-in for datasets.load_dataset("fancyzhx/yelp_polarity", "plain_text"), built as the hub builds it: the
    dataset script's features (Value("string") text, ClassLabel(names=["1", "2"]) label) and its row rule
    {"text": line[5:-2].strip(), "label": line[1]} (the CSV field as it was: quotes doubled, newlines backslash-n),
    applied to the public CSV lines."""
    import datasets
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["1", "2"])})
    lines = [line + "\n" for line in REAL_LINES + PUBLIC_LINES]
    rows = {"text": [line[5:-2].strip() for line in lines],
            "label": [features["label"].str2int(line[1]) for line in lines]}
    return datasets.DatasetDict({split: datasets.Dataset.from_dict(rows, features=features) for split in data.SPLITS})


# catches: the labels written back off by one (the hub's 0/1 against the CSV's "1"/"2"), the hub's escapes decoded
# twice or not at all, and a stand-in drifted from what `datasets` gives users
def test_fetched_reviews_equal_the_public_csv_token_for_token(tiny, tmp_path, monkeypatch, hub_yelp_polarity):
    import datasets
    served = hub_yelp_polarity["train"]
    # the schema the dataset card documents: text a string, label a class label "1" (0) or "2" (1)
    assert served.features == datasets.Features({"text": datasets.Value("string"),
                                                 "label": datasets.ClassLabel(names=["1", "2"])})
    assert served.features["label"].int2str([0, 1]) == ["1", "2"]
    assert served[0]["label"] == 0 and served[0]["text"].startswith(
        "Unfortunately, the frustration of being Dr. Goldberg's patient")
    assert served[1]["label"] == 1 and served[2] == {"label": 1, "text": 'Said ""wow"", then left.\\n\\nGreat!'}
    public = tmp_path / "public"
    public.mkdir()
    for split in data.SPLITS:
        (public / f"{split}.csv").write_text("".join(line + "\n" for line in REAL_LINES + PUBLIC_LINES),
                                             encoding="utf-8")

    def load_dataset(path, name=None, **kwargs):
        if (path, name) != ("fancyzhx/yelp_polarity", "plain_text"):
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        return hub_yelp_polarity
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    tokenizer = hub.load_tokenizer(tiny.model_dir)
    stored = {}
    for source in ("public", "fetched"):
        cfg = cli.configure(overrides(tiny, tmp_path / source)
                            + [f"--csv_dir={tmp_path / source}", "--train_limit=100", "--test_limit=100"])
        data.prepare(cfg, tokenizer)
        stored[source] = torch.load(tmp_path / source / "data" / "train.pt", weights_only=True)
    assert stored["fetched"]["meta"]["bad_rows"] == 0
    for key in ("tokens", "offsets", "labels"):
        assert torch.equal(stored["fetched"][key], stored["public"][key])
    assert ((tmp_path / "fetched" / "train.csv").read_text(encoding="utf-8")
            == (public / "train.csv").read_text(encoding="utf-8"))
    labels, texts, _ = data.read_csv(str(tmp_path / "fetched" / "train.csv"))
    assert labels[:3].tolist() == [0, 1, 1] and texts[1].startswith("Been going to Dr. Goldberg for over 10 years.")
    assert texts[2:4] == ['Said "wow", then left.\n\nGreat!',
                          "Caf\u00e9 na\u00efve \u2014 \u201csmart\u201d quotes, \u00fcber-bad."]


def test_written_csvs_read_back_as_written(tmp_path):
    texts = ['Said "wow", then left.\n\nGreat!', "plain, with a comma", "back\\slash"]
    data.write_csv(str(tmp_path / "r.csv"), [2, 1, 2], texts)
    labels, read, bad = data.read_csv(str(tmp_path / "r.csv"))
    assert labels.tolist() == [1, 0, 1] and read == texts and bad == []


def test_a_split_drawn_from_an_edited_csv_is_drawn_again_and_one_whose_csv_is_gone_is_kept(tiny, tmp_path, cfg, capsys):
    tokenizer = hub.load_tokenizer(tiny.model_dir)
    cfg.CSV_DIR = str(tmp_path / "csv")
    shutil.copytree(tiny.csv_dir, cfg.CSV_DIR)
    first = data.load_split(cfg, tokenizer, "test")
    test_csv = tmp_path / "csv" / "test.csv"
    rows = test_csv.read_text().splitlines(keepends=True)
    test_csv.write_text("".join(rows[:-2]))  # two reviews fewer, as a deduplication would leave it
    capsys.readouterr()
    again = data.load_split(cfg, tokenizer, "test")
    assert (f"test.pt was prepared with another test.csv than {cfg.CSV_DIR}'s: preparing it again"
            in capsys.readouterr().out)
    assert again.meta["rows"] == first.meta["rows"] - 2 and again.meta["csv"] != first.meta["csv"]
    test_csv.unlink()  # the CSVs deleted after prep (Yelp's take 430 MB): the split is used as it is
    assert torch.equal(data.load_split(cfg, tokenizer, "test").tokens, again.tokens) and capsys.readouterr().out == ""


def test_validation_reviews_are_held_out_balanced_and_seeded(task):
    train, val = data.training_sets(task.train, 10, 0, 0)
    assert (len(train), len(val)) == (30, 10) and val.labels.sum() == 5
    reviews = lambda split: sorted(tuple(split.tokens[split.offsets[i]:split.offsets[i + 1]].tolist())
                                   for i in range(len(split)))
    assert sorted(reviews(train) + reviews(val)) == reviews(task.train)  # every review in exactly one of them
    assert reviews(data.training_sets(task.train, 10, 0, 0)[1]) == reviews(val)
    assert reviews(data.training_sets(task.train, 10, 0, 1)[1]) != reviews(val)
    unchanged, none = data.training_sets(task.train, 0, 0, 0)
    assert unchanged is task.train and none is None  # VAL_LIMIT=0: the reference


@pytest.mark.parametrize("args, message", [
    (["--val_limit=40"], "--val_limit=40 must be between 1 and 39: validation reviews are held out of the 40 training"),
    (["--rate_grid=[[1e-2], [1e-3]]"], "--rate_grid chooses the rates on validation reviews: set --val_limit"),
    (["--train_reviews=-5"], "--train_reviews=-5 must be a whole number of reviews, 0 for all that --val_limit leaves"),
])
def test_bad_validation_settings_are_refused(task, args, message):
    cfg = cli.configure(args)
    with pytest.raises(errors.UserError, match=message.replace("(", r"\(")):
        runs._check_choices(cfg, with_train=True)
        data.training_sets(task.train, cfg.VAL_LIMIT, cfg.TRAIN_REVIEWS, cfg.SEED)
