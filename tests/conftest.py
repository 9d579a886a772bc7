"""Fixtures: a tiny Llama-architecture model and tokenizer saved like a real one, and small Yelp-format CSVs."""
import csv
import os
import random
import subprocess
import sys
import types

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub: everything they load is built here

import cli  # noqa: E402

# Llama 3's pre-tokenizer split, so that text pieces tokenize the same alone as inside the rendered template
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{% if m['role'] == 'system' and date_string is defined %}Today Date: {{ date_string }}\n\n{% endif %}"
                 "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GOOD = "great delicious friendly amazing love perfect tasty fresh wonderful best".split()
BAD = "awful rude cold terrible hate worst bland stale dirty slow".split()
FILLER = "the food service place we ordered table and was very our waiter pizza".split()


def make_review(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 30))]
    for _ in range(rng.randint(1, 4)):
        words.insert(rng.randrange(len(words)), rng.choice(GOOD if positive else BAD))
    text = " ".join(words).capitalize()
    if rng.random() < 0.3:  # the public format's quirks: escaped newlines, doubled quotes, commas
        text += '\n\nThey said "come back", so we will.'
    return text


def write_yelp_csv(path: str, rows: list[tuple[int, str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n")
        for label, text in rows:
            writer.writerow([str(label), text.replace("\n", "\\n")])


def build_tokenizer(corpus: list[str], path: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(path)
    return fast


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> types.SimpleNamespace:
    """Paths of a tiny random Llama (model_dir) and Yelp-format CSVs (csv_dir): 120 train, 60 test reviews."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("tiny")
    rng = random.Random(0)
    splits = {name: [(1 + i % 2, make_review(rng, i % 2 == 1)) for i in range(n)] for name, n in (("train", 120), ("test", 60))}
    csv_dir = root / "csv"
    csv_dir.mkdir()
    for name, rows in splits.items():
        write_yelp_csv(str(csv_dir / f"{name}.csv"), rows)
    model_dir = str(root / "model")
    tok = build_tokenizer([text for rows in splits.values() for _, text in rows], model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         initializer_range=0.2)  # at the default 0.02 attention barely carries context, so no primer could steer it
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return types.SimpleNamespace(root=root, model_dir=model_dir, csv_dir=str(csv_dir), splits=splits)


def overrides(tiny, out) -> list[str]:
    """Command-line overrides that point a script at the tiny model and CSVs, writing under `out`."""
    return [f"--model_id={tiny.model_dir}", f"--csv_dir={tiny.csv_dir}", f"--data_dir={out}/data",
            f"--results_dir={out}/results", "--device=cpu", "--train_limit=100", "--test_limit=60",
            "--batch_size=10", "--primer_length=4", "--rate_by_epoch=[0.1, 0.1, 0.1]",
            "--rate_scale=absolute"]


@pytest.fixture
def cfg(tiny, tmp_path):
    return cli.configure(overrides(tiny, tmp_path))


def run_script(*args: str) -> subprocess.CompletedProcess:
    """Run a repo command line (e.g. 'experiment.py', '--x=1') from the repo root; output captured."""
    cmd = [ROOT + "/" + args[0]] if args[0].endswith(".sh") else [sys.executable, args[0]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    return subprocess.run(cmd + list(args[1:]), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
