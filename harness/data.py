"""Yelp Review Polarity CSVs -> tokenized, label-balanced splits in DATA_DIR (./prep.sh runs this)."""
import csv
import hashlib
import json
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from harness import cli, errors, files, hub

SPLITS = ("train", "test")
HF_DATASET = ("fancyzhx/yelp_polarity", "plain_text")  # the hub copy `datasets` fetches when the CSVs are absent
MAX_BAD_SHARE = 0.01  # more bad rows than this and prep refuses the file
OFFLINE = "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set, and the local Hugging Face cache has no copy"


@dataclass
class Split:
    """Ragged reviews as flat tokens plus offsets, with their labels (0 negative, 1 positive)."""
    tokens: torch.Tensor  # int32 [total tokens]
    offsets: torch.Tensor  # int64 [n + 1]
    labels: torch.Tensor  # int64 [n]
    meta: dict

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def subset(self, idx: torch.Tensor) -> "Split":
        """Reviews idx (in that order) as a Split of their own."""
        lengths = self.lengths[idx]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        positions = torch.repeat_interleave(self.offsets[idx] - offsets[:-1], lengths) + torch.arange(int(offsets[-1]))
        labels = self.labels[idx]
        return Split(self.tokens[positions], offsets, labels,
                     {**self.meta, "count": len(idx), "positives": int(labels.sum())})


def vocab_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def _bad_row(row: list[str]) -> Optional[str]:
    """Why a CSV row is not '"1" or "2","review"', or None when it is one."""
    if len(row) != 2:
        return f"{len(row)} fields, not 2"
    if row[0].strip() not in ("1", "2"):
        return f"label {row[0].strip()[:20]!r} is not \"1\" or \"2\""
    if not row[1].strip():
        return "empty review"
    try:
        row[1].encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes survive as lone surrogates
        return "bytes that are not UTF-8"
    return None


def read_csv(path: str) -> tuple[np.ndarray, list[str], list[int]]:
    """Labels (0/1), review texts with escapes decoded, and the line numbers of the rows skipped as bad: up to
    MAX_BAD_SHARE of the rows may be bad (each is named with its reason), more and the file is refused."""
    labels, texts, bad, reasons = [], [], [], []
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, skipinitialspace=True)  # so stray spaces before a quoted field leave it quoted
        for row in reader:
            reason = _bad_row(row)
            if reason:
                bad.append(reader.line_num)
                reasons.append(f"line {reader.line_num}: {reason}")
                continue
            labels.append(int(row[0]) - 1)
            texts.append(row[1].replace("\\n", "\n").strip())
    total, form = len(labels) + len(bad), "'\"1\" or \"2\",\"review\"'"
    lines = f"({'; '.join(reasons[:5])}{'; ...' if len(bad) > 5 else ''})"
    if not labels or len(bad) > MAX_BAD_SHARE * total:
        raise errors.UserError(f"{path}: {len(bad):,} of {total:,} rows are not {form} {lines}, more than the "
                               f"{MAX_BAD_SHARE:.0%} of rows tolerated: fix or replace the file")
    if bad:
        print(f"{path}: skipping {len(bad):,} of {total:,} rows that are not {form} {lines}; "
              f"up to {MAX_BAD_SHARE:.0%} may be")
    return np.array(labels), texts, bad


def balanced_sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded sample of at most `limit` rows, half from each label where possible."""
    rng = np.random.default_rng(seed)
    by_label = [rng.permutation(np.flatnonzero(labels == c)) for c in (0, 1)]
    small = min(len(by_label[0]), len(by_label[1]), limit // 2)
    take = [small, small]
    for c in (0, 1):  # the larger label fills what the smaller cannot
        take[c] += min(len(by_label[c]) - small, limit - sum(take))
    return np.sort(np.concatenate([by_label[c][: take[c]] for c in (0, 1)]))


def training_sets(split: Split, val_limit: int, train_reviews: int, seed: int) -> tuple[Split, Optional[Split]]:
    """The reviews to train on and `val_limit` validation reviews (seeded, label-balanced; None when 0), both from the
    TRAIN_LIMIT sample (the reviews prep sampled past it join training): with `train_reviews` fewer than it leaves, a
    seeded label-balanced subset is trained on. At one seed the validation reviews are the same for every
    train_reviews and a smaller training set lies inside a larger one."""
    base = split.meta.get("base", len(split))
    if not val_limit and base == len(split) and not 0 < train_reviews < base:
        return split, None
    if val_limit and not 0 < val_limit < base:
        raise errors.UserError(f"--val_limit={val_limit} must be between 1 and {base - 1}: validation "
                               f"reviews are held out of the {base:,} training reviews (--train_limit), and "
                               f"some must be left to train on")
    labels = split.labels[:base].numpy()
    held = torch.from_numpy(balanced_sample(labels, val_limit, seed)) if val_limit else torch.zeros(0, dtype=torch.long)
    rest = torch.ones(base, dtype=torch.bool)
    rest[held] = False
    train = torch.cat([rest.nonzero().squeeze(1), torch.arange(base, len(split))])
    if 0 < train_reviews < len(train):
        train = train[torch.from_numpy(balanced_sample(split.labels[train].numpy(), train_reviews, seed))]
    return split.subset(train), split.subset(held) if val_limit else None


def extra_reviews(train_limit: int, val_limit: int, train_reviews: int) -> int:
    """Training reviews prep samples past the TRAIN_LIMIT sample, so that `train_reviews` are left after the
    validation ones (0 when that sample has enough)."""
    return max(0, train_reviews - (train_limit - val_limit))


def write_csv(path: str, labels: list[int], texts: list[str]) -> None:
    """Reviews in the public Yelp polarity format (label "1" or "2" quoted, newlines as a literal \\n), atomically."""
    with files.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerows([str(label), text.replace("\n", "\\n")] for label, text in zip(labels, texts))


def _fetch_csvs(csv_dir: str) -> None:
    """Download Yelp polarity through `datasets` and write it back as the public CSVs; one line when it cannot."""
    unreachable = _dataset_unreachable()
    try:
        if unreachable and unreachable != OFFLINE:
            raise ConnectionError(unreachable)  # at once: offline mode alone may still find it in the cache
        import datasets
        dataset = datasets.load_dataset(*HF_DATASET)
    except Exception as e:
        raise errors.UserError(f"no CSVs in {csv_dir} and fetching {HF_DATASET[0]} failed "
                               f"({unreachable or type(e).__name__}); "
                               f"put the Yelp polarity train.csv and test.csv in {csv_dir} or set --csv_dir") from e
    for split in SPLITS:
        path = os.path.join(csv_dir, f"{split}.csv")
        with files.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            for row in tqdm(dataset[split], desc=f"write {path}", unit=" rows"):
                # the hub's text is the CSV field as it was, quotes still doubled and newlines still backslash-n
                f.write(f'"{row["label"] + 1}","{row["text"]}"\n')


def _dataset_unreachable() -> Optional[str]:
    """Why the hub cannot be asked for HF_DATASET now (OFFLINE, where `datasets` looks in its cache alone, at once; no
    network, DNS, proxy, timeout), or None when it answers. One quick request decides, where `datasets` would retry
    for about 30 s, printing each retry, before failing."""
    import datasets
    from huggingface_hub import constants, dataset_info
    from huggingface_hub.errors import HfHubHTTPError
    if datasets.config.HF_HUB_OFFLINE:
        return OFFLINE
    try:
        dataset_info(HF_DATASET[0], timeout=hub.HUB_TIMEOUT)
    except HfHubHTTPError:
        return None  # the hub answered; the download says what is wrong
    except Exception as e:  # no answer at all, in the HTTP client's own error types
        return f"cannot reach {constants.ENDPOINT}: {type(e).__name__}: {hub.first_line(e)}"
    return None


def tokenize(tokenizer, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat int32 tokens, int64 offsets, and how many reviews were cut to max_tokens."""
    pieces, truncated = [], 0
    with tqdm(total=len(texts), desc="tokenize", unit=" reviews") as bar:
        for start in range(0, len(texts), 1000):
            for ids in tokenizer(texts[start:start + 1000], add_special_tokens=False)["input_ids"]:
                truncated += len(ids) > max_tokens
                pieces.append(torch.tensor(ids[:max_tokens], dtype=torch.int32))
            bar.update(len(texts[start:start + 1000]))
    lengths = torch.tensor([0] + [len(p) for p in pieces])
    return torch.cat(pieces), lengths.cumsum(0), truncated


def _sample_seed(cfg: SimpleNamespace, split: str) -> int:
    """The seed of a split's sample: SEED for the training reviews; 0 for the test reviews at every SEED, so runs at
    different seeds are scored, and paired, on the same ones."""
    return cfg.SEED if split == "train" else 0


def _csv_fingerprint(path: str) -> Optional[str]:
    """A digest of a CSV's bytes (None when it is gone): a split drawn from an edited or other CSV is drawn again."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def _expected_meta(cfg: SimpleNamespace, tokenizer, split: str) -> dict:
    """What a split file must have been prepared with to be used under cfg (its CSV's digest while the CSV is there)."""
    digest = _csv_fingerprint(os.path.join(cfg.CSV_DIR, f"{split}.csv"))
    return {"model_id": cfg.MODEL_ID, "vocab_size": len(tokenizer), "vocab_fingerprint": vocab_fingerprint(tokenizer),
            "limit": cfg.TRAIN_LIMIT if split == "train" else cfg.TEST_LIMIT,
            "extra": extra_reviews(cfg.TRAIN_LIMIT, cfg.VAL_LIMIT, cfg.TRAIN_REVIEWS) if split == "train" else 0,
            "max_review_tokens": cfg.MAX_REVIEW_TOKENS, "seed": _sample_seed(cfg, split),
            **({"csv": digest} if digest else {})}


def split_path(cfg: SimpleNamespace, split: str) -> str:
    return os.path.join(cfg.DATA_DIR, f"{split}.pt")


def prepare(cfg: SimpleNamespace, tokenizer, splits: tuple[str, ...] = SPLITS) -> None:
    """Write DATA_DIR/<split>.pt for each of `splits` from the CSVs, fetching those first when absent."""
    missing = not all(os.path.isfile(os.path.join(cfg.CSV_DIR, f"{s}.csv")) for s in splits)
    files.folder(cfg.CSV_DIR, "--csv_dir", write=missing)  # a file in its place is refused before any download
    files.folder(cfg.DATA_DIR, "--data_dir")  # as is an unwritable data folder
    if missing:
        _fetch_csvs(cfg.CSV_DIR)
    sources = {split: os.path.join(cfg.CSV_DIR, f"{split}.csv") for split in splits}
    rows = {split: read_csv(source) for split, source in sources.items()}  # all checked before anything is written
    for split, source in sources.items():
        labels, texts, bad = rows[split]
        meta = _expected_meta(cfg, tokenizer, split)
        keep = balanced_sample(labels, meta["limit"], meta["seed"])
        more = np.setdiff1d(balanced_sample(labels, meta["limit"] + meta["extra"], meta["seed"]), keep)
        meta["base"], keep = len(keep), np.concatenate([keep, more])  # the next reviews of the same seeded order
        tokens, offsets, truncated = tokenize(tokenizer, [texts[i] for i in keep], cfg.MAX_REVIEW_TOKENS)
        meta.update(source=source, rows=len(labels), bad_rows=len(bad), count=len(keep), truncated=truncated,
                    positives=int(labels[keep].sum()))
        path = split_path(cfg, split)
        with files.atomic_path(path) as tmp:
            torch.save({"tokens": tokens, "offsets": offsets, "labels": torch.from_numpy(labels[keep]), "meta": meta},
                       tmp)
        print(f"{path}: {len(keep):,} of {len(labels):,} reviews ({meta['positives']:,} positive), "
              f"{len(tokens):,} tokens, {truncated:,} cut to {cfg.MAX_REVIEW_TOKENS} tokens")


def load_split(cfg: SimpleNamespace, tokenizer, split: str) -> Split:
    """A prepared split, preparing it from the CSVs when absent or prepared for another tokenizer or sample (the
    other split is left as it is)."""
    path = split_path(cfg, split)
    if not os.path.exists(path):
        print(f"{path} is missing: preparing it as ./prep.sh would", flush=True)
        prepare(cfg, tokenizer, (split,))
    stored = _read_split(path)
    meta, want = {"extra": 0, **stored["meta"]}, _expected_meta(cfg, tokenizer, split)  # "extra": 0 before it existed
    stale = {k: (meta.get(k), v) for k, v in want.items() if k != "model_id" and meta.get(k) != v}
    if stale:
        why = [f"{k}={old}, not {new}" for k, (old, new) in stale.items()
               if k not in ("vocab_fingerprint", "vocab_size", "csv")]
        why = ([f"the tokenizer of {meta.get('model_id')}, not {cfg.MODEL_ID}'s"]
               if "vocab_fingerprint" in stale else []) + why
        why += [f"another {split}.csv than {cfg.CSV_DIR}'s"] if "csv" in stale else []
        print(f"{path} was prepared with {'; '.join(why)}: preparing it again from {cfg.CSV_DIR}", flush=True)
        prepare(cfg, tokenizer, (split,))
        stored = _read_split(path)
    return Split(stored["tokens"], stored["offsets"], stored["labels"], stored["meta"])


def _read_split(path: str) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:
        raise errors.UserError(f"{path} is not a file prep wrote ({type(e).__name__}); "
                               f"delete it and run ./prep.sh") from e


if __name__ == "__main__":
    cli.main(lambda cfg: prepare(cfg, hub.load_tokenizer(cfg.MODEL_ID, cfg.GGUF_FILE)))
