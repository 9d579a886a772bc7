"""Stand-ins that let bench.py time a model with no prepared data, tokenizer or weights: Yelp-length reviews of random
ids, a layout of Llama 3's template lengths, and a model of a named architecture with random weights."""
import os

import numpy as np
import torch

from harness import data, errors, hub, layouts

# log-normal fit of Yelp polarity review lengths: median 110, tail past 1,000
YELP_MEDIAN_TOKENS, YELP_SIGMA = 110, 0.85
LLAMA3_TEMPLATE = (26, 5, 5)  # Llama 3 template tokens before the system content, between it and the review, after


def split(n: int, vocab: int, max_tokens: int, seed: int) -> data.Split:
    """n reviews of random ids, their lengths drawn from Yelp's, their labels at random."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(YELP_MEDIAN_TOKENS), YELP_SIGMA, n).astype(int), 1, max_tokens)
    offsets = torch.from_numpy(np.concatenate([[0], lengths.cumsum()]))
    tokens = torch.from_numpy(rng.integers(0, vocab, int(lengths.sum()), dtype=np.int32))
    return data.Split(tokens, offsets, torch.from_numpy(rng.integers(0, 2, n)), {"source": "synthetic"})


def layout(vocab: int, primer_length: int, position: str) -> layouts.Layout:
    """Random ids of Llama 3's template lengths, the primer at position (layouts.make_layout's positions)."""
    before, middle, after = LLAMA3_TEMPLATE
    ids = lambda n: torch.randint(vocab, (n,))
    if position == "suffix":
        return layouts.Layout(ids(before + middle), ids(primer_length + after), slice(0, primer_length), primer_length,
                              in_suffix=True)
    start = 0 if position == "prefix" else before
    return layouts.Layout(ids(before + primer_length + middle), ids(after), slice(start, start + primer_length),
                          primer_length)


def random_model(model_id: str, dtype: str, gradient_checkpointing: bool, device: torch.device) -> torch.nn.Module:
    """model_id's architecture (a folder's config.json, or architectures/<its name>/) with random weights, frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM
    folder = model_id if os.path.isdir(model_id) else os.path.join("architectures", os.path.basename(model_id))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise errors.UserError(f"no architecture config for {model_id} in {folder}/config.json: add one, "
                               "or set --model_id to a folder with one")
    with device:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder),
                                                 dtype=hub.resolve_dtype(dtype, device), attn_implementation="sdpa")
    return hub.freeze(model, gradient_checkpointing)
