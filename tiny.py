"""A tiny model and data set built here, to try the whole pipeline on a CPU in about a minute with no download.

    python tiny.py      # writes data/tiny/model (a random 2-layer Llama and its tokenizer) and data/tiny/csv

then trains and scores a primer on them with the command it prints (the README's quick start). The model's weights
are random, so its scores say nothing about primers: this checks an install, end to end. The tests build the same
model and CSVs (tests/conftest.py imports this file).
"""
import os
import random

TINY_DIR = "data/tiny"  # where `python tiny.py` writes: model/, csv/, and the runs of EXPERIMENT
REVIEWS = {"train": 120, "test": 60}  # rows of each CSV
EXPERIMENT = (f"python experiment.py --model_id={TINY_DIR}/model --csv_dir={TINY_DIR}/csv --data_dir={TINY_DIR} "
              f"--results_dir={TINY_DIR}/results --train_limit={REVIEWS['train']} --test_limit={REVIEWS['test']} "
              "--batch_size=10 '--rate_by_epoch=[0.5,0.5,0.5]' "
              "--threads=1")  # the smoke run on it, as the README's quick
# start gives it: one thread, so that other jobs on the machine do not slow it down many times over

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


def build_tokenizer(corpus: list[str], path: str):
    """A byte-level BPE tokenizer trained on corpus, with Llama 3's special tokens, split and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(path)
    return fast


def build(root: str) -> dict[str, list[tuple[int, str]]]:
    """Write root/csv/{train,test}.csv (REVIEWS rows, labels alternating) and root/model, a random Llama with a
    tokenizer trained on those reviews, saved like a real model; returns each split's (label, review) rows."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    from harness import data
    rng = random.Random(0)
    splits = {name: [(1 + i % 2, make_review(rng, i % 2 == 1)) for i in range(n)] for name, n in REVIEWS.items()}
    os.makedirs(os.path.join(root, "csv"), exist_ok=True)
    for name, rows in splits.items():
        data.write_csv(os.path.join(root, "csv", f"{name}.csv"), *zip(*rows))
    model_dir = os.path.join(root, "model")
    tok = build_tokenizer([text for rows in splits.values() for _, text in rows], model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         # at the default 0.02 attention barely carries context, so no primer could steer it
                         initializer_range=0.2)
    logging.disable_progress_bar()  # its one "Writing model shards" bar says nothing here
    LlamaForCausalLM(config).save_pretrained(model_dir)
    logging.enable_progress_bar()
    return splits


def run(cfg) -> None:
    build(TINY_DIR)
    print(f"wrote {TINY_DIR}/model and {TINY_DIR}/csv; now train and score a primer on them:\n{EXPERIMENT}")


if __name__ == "__main__":
    from harness import cli
    cli.main(run, shared=())  # no settings: it always writes TINY_DIR
