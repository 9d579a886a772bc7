"""The shared harness: a frozen chat model, inputs built from its chat template, primer training and scoring, results."""
import functools
import itertools
import json
import math
import os
import platform
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jinja2.exceptions import TemplateError
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import cli
import data
import ledger
import parallel
import plots

PRIMER_SLOT = "\x00PRIMER\x00"  # stands for the primer while the chat template is rendered
REVIEW_SLOT = "\x00REVIEW\x00"  # stands for the review likewise
CHUNK_BATCHES = 64  # length grouping sorts reviews within chunks of this many batches
PRIMER_POSITIONS = ("system", "prefix", "suffix")  # the values PRIMER_POSITION may take (see make_layout)
PLAIN_ANSWER_CUE = "\nAnswer:"  # ends the prompt of a model with no chat template; the label token follows it
SYSTEM_SEPARATOR = "\n\n"  # between system content and the user message when both share the user turn (as Gemma's template does)


class Interrupted(cli.UserError):
    """Ctrl-C stopped training after a checkpoint was saved."""


class NonFiniteLoss(Exception):
    """The loss of a training batch was NaN or infinite; the primer was left as it was before that batch."""


@dataclass
class Task:
    """Everything a run needs: the config, the frozen model and tokenizer, the label tokens and the data."""
    cfg: SimpleNamespace
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    label_ids: torch.Tensor  # token id of LABELS[0] and LABELS[1], on device
    train: Optional[data.Split]
    test: data.Split
    val: Optional[data.Split] = None  # VAL_LIMIT reviews held out of the training sample, scored after each epoch


@dataclass
class Layout:
    """Token ids around the review: prefix (primer slot included, as placeholder ids), review, suffix."""
    prefix: torch.Tensor
    suffix: torch.Tensor
    slot: slice  # the primer's positions in the prefix (in the suffix when in_suffix); empty for a text prompt
    prompt_tokens: int  # tokens the prompt adds to the review: primer length, or the text prompt's own tokens
    in_suffix: bool = False  # the slot indexes the suffix: the primer follows the review (PRIMER_POSITION "suffix")
    joins: tuple[str, str] = ("", "")  # prompt text glued to the review on each side, tokenized together with it
    tokenizer: object = None  # needed only when joins are not empty

    def review_ids(self, reviews: list[list[int]]) -> list[list[int]]:
        """The ids of each review with the text joined to it: where a prompt's text runs into the review with no
        special token between them, a BPE tokenizer merges across the seam ("!" + "\\n" is one token "!\\n"), so
        that text is tokenized with the review, as the tokenizer would tokenize the whole prompt."""
        if self.joins == ("", ""):
            return reviews
        texts = self.tokenizer.batch_decode(reviews, clean_up_tokenization_spaces=False)
        head, tail = self.joins
        return self.tokenizer([head + t + tail for t in texts], add_special_tokens=False)["input_ids"]


def resolve_device(name: str) -> torch.device:
    if parallel.started():  # each process has a device of its own, which DEVICE may name only by its type
        mine = parallel.device()
        if name not in ("auto", mine.type):
            raise cli.UserError(f"--device={name}, but under accelerate launch this process runs on {mine}: "
                                f"use --device=auto (each process then takes its own GPU) or --device={mine.type}")
        return mine
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise cli.UserError(f"--device={name} but torch sees no CUDA GPU: use --device=cpu or --device=auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("bfloat16", "float16", "float32"):
        raise cli.UserError(f"--dtype={name} is not one of auto, bfloat16, float16, float32")
    return getattr(torch, name)


def label_token_ids(tokenizer, labels: list[str], context: str = "") -> list[int]:
    """Each label's token id where it follows `context` (the prompt's end): the tokens of context + label after those
    of context alone, so a tokenizer that spells a text's first word differently (a leading space) gets the id the
    model answers with."""
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    before = encode(context)
    ids = []
    for label in labels:
        whole = encode(context + label)
        if whole[:len(before)] != before:
            raise cli.UserError(f"label {label!r} merges with the prompt's last token {context[-12:]!r} for {tokenizer.name_or_path}: "
                                f"set --labels to strings that tokenize apart from it")
        ids.append(whole[len(before):])
    for label, tokens in zip(labels, ids):
        if len(tokens) != 1:
            raise cli.UserError(f"label {label!r} is {len(tokens)} tokens for {tokenizer.name_or_path}, not one: set --labels to single-token strings")
    if ids[0] == ids[1]:
        raise cli.UserError(f"labels {labels} are the same token: set --labels to two different strings")
    return [t[0] for t in ids]


def load_model(cfg: SimpleNamespace, device: torch.device) -> torch.nn.Module:
    """The frozen model: eval mode, no parameter ever requires a gradient."""
    from transformers import AutoModelForCausalLM
    dtype = resolve_dtype(cfg.DTYPE, device)
    model = cli.from_hub(AutoModelForCausalLM.from_pretrained, cfg.MODEL_ID, dtype=dtype, attn_implementation="sdpa")
    return freeze(model.to(device), cfg.GRADIENT_CHECKPOINTING)


def freeze(model: torch.nn.Module, checkpointing: bool) -> torch.nn.Module:
    """The model in eval mode with no parameter requiring a gradient, optionally checkpointing its layers."""
    model.requires_grad_(False).eval()
    if checkpointing:
        from transformers.modeling_layers import GradientCheckpointingLayer
        model.activation_checkpointing_enable()
        for layer in model.modules():  # HF checkpoints only layers in training mode: flag those alone, dropout stays off
            if isinstance(layer, GradientCheckpointingLayer):
                layer.training = True
    return model


def setup(cfg: SimpleNamespace, with_train: bool = True) -> Task:
    ledger.check(cfg.RESULTS_DIR)  # a damaged ledger is found before the work, not after it
    device = resolve_device(cfg.DEVICE)
    tokenizer = data.load_tokenizer(cfg.MODEL_ID)
    labels = torch.tensor(label_token_ids(tokenizer, cfg.LABELS, answer_context(tokenizer, cfg.TEMPLATE_KWARGS)), device=device)
    with parallel.local_main_first():  # under accelerate one process per machine prepares missing data
        train, val = hold_out(data.load_split(cfg, tokenizer, "train"), cfg) if with_train else (None, None)
        test = data.load_split(cfg, tokenizer, "test")
    torch.manual_seed(cfg.SEED)
    return Task(cfg, tokenizer, load_model(cfg, device), device, labels, train, test, val)


def hold_out(train: data.Split, cfg: SimpleNamespace) -> tuple[data.Split, Optional[data.Split]]:
    """The reviews to train on and the VAL_LIMIT validation reviews held out of them (seeded, label-balanced),
    or all of them and None when VAL_LIMIT is 0."""
    if cfg.KEEP_BEST and not cfg.VAL_LIMIT:
        raise cli.UserError("--keep_best=True picks the best epoch on validation reviews, but --val_limit is 0: "
                            "set --val_limit (e.g. --val_limit=1000) or --keep_best=False")
    if not cfg.VAL_LIMIT:
        return train, None
    if not 0 < cfg.VAL_LIMIT < len(train):
        raise cli.UserError(f"--val_limit={cfg.VAL_LIMIT} must be between 1 and {len(train) - 1}: validation reviews are "
                            f"held out of the {len(train):,} training reviews (--train_limit), and some must be left to train on")
    held = torch.from_numpy(data.balanced_sample(train.labels.numpy(), cfg.VAL_LIMIT, cfg.SEED))
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[held] = False
    return train.subset(rest.nonzero().squeeze(1)), train.subset(held)


@functools.cache
def say_once(message: str) -> None:
    print(message, flush=True)


def prompt_text(tokenizer, system: Optional[str], user: str, template_kwargs: dict) -> str:
    """The prompt as text up to the answer: the chat template with `system` as its system message, or at the start of
    the user turn when the template refuses or drops one; with no chat template, bos + system + user + PLAIN_ANSWER_CUE."""
    if tokenizer.chat_template is None:
        say_once(f"{tokenizer.name_or_path} has no chat template: the prompt is bos, the system content or primer, "
                 f"the review and {PLAIN_ANSWER_CUE!r}")
        return (tokenizer.bos_token or "") + (system + SYSTEM_SEPARATOR if system else "") + user + PLAIN_ANSWER_CUE
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)
    if system is None:
        return render([{"role": "user", "content": user}])
    try:
        text = render([{"role": "system", "content": system}, {"role": "user", "content": user}])
        if system.strip() in text:
            return text
    except TemplateError:
        pass
    say_once(f"the chat template of {tokenizer.name_or_path} takes no system message: the system content or primer "
             f"goes at the start of the user turn")
    return render([{"role": "user", "content": system + SYSTEM_SEPARATOR + user}])


def answer_context(tokenizer, template_kwargs: dict) -> str:
    """The prompt's text after the review, which the answer follows (the same for every PRIMER_POSITION)."""
    return prompt_text(tokenizer, None, REVIEW_SLOT, template_kwargs).split(REVIEW_SLOT)[1]


def check_primer_position(position: str, checkpointing: bool) -> None:
    if position not in PRIMER_POSITIONS:
        raise cli.UserError(f"--primer_position={position!r} is not one of {', '.join(PRIMER_POSITIONS)}")
    if position == "suffix" and checkpointing:  # HF's checkpointed layers drop the review cache that suffix runs on
        raise cli.UserError("--primer_position=suffix does not combine with --gradient_checkpointing=True (its backward "
                            "pass covers only the primer and the answer cue, so it needs little memory): set it to False")


def make_layout(task: Task, system: Optional[str], user: str = "{review}", primer_length: int = 0,
                position: str = "system") -> Layout:
    """The prompt (prompt_text) with `system` text, or a primer of primer_length vectors, at `position`: "system" in
    the system message, "prefix" before everything (bos included), "suffix" right after the review at the end of the
    user turn; `user` around {review}. The ids equal the tokenizer's own ids of the whole prompt text, but for the
    primer's placeholder ids."""
    check_primer_position(position, task.cfg.GRADIENT_CHECKPOINTING)
    tok, kwargs = task.tokenizer, task.cfg.TEMPLATE_KWARGS
    content, user_text = PRIMER_SLOT if primer_length else system, user.replace("{review}", REVIEW_SLOT)
    if position == "system":
        text = prompt_text(tok, content, user_text, kwargs)
    elif position == "prefix":
        text = content + prompt_text(tok, None, user_text, kwargs)
    else:
        text = prompt_text(tok, None, user_text + content, kwargs)
    head, tail = text.split(REVIEW_SLOT)
    seams = [re.escape(t) for t in (PRIMER_SLOT, *tok.added_tokens_encoder)]  # text is tokenized apart across these
    seam = re.compile("|".join(sorted(seams, key=len, reverse=True)))
    head_end = max((m.end() for m in seam.finditer(head)), default=0)
    tail_start = next((m.start() for m in seam.finditer(tail)), len(tail))
    prefix, head_slot = encode_around_slot(tok, head[:head_end], primer_length)
    suffix, tail_slot = encode_around_slot(tok, tail[tail_start:], primer_length)
    in_suffix = tail_slot is not None
    if system is not None:
        encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
        prompt_tokens = len(encode(system)) + sum(len(encode(part)) for part in user.split("{review}"))
    else:
        prompt_tokens = primer_length
    return Layout(prefix, suffix, (tail_slot if in_suffix else head_slot) or slice(0, 0), prompt_tokens, in_suffix,
                  (head[head_end:], tail[:tail_start]), tok)


def encode_around_slot(tokenizer, text: str, primer_length: int) -> tuple[torch.Tensor, Optional[slice]]:
    """The ids of text with primer_length placeholder ids where the primer slot is, and the slot (None if absent)."""
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    if PRIMER_SLOT not in text:
        return torch.tensor(encode(text), dtype=torch.long), None
    before, after = text.split(PRIMER_SLOT)
    start = len(encode(before))
    return torch.tensor(encode(before) + [0] * primer_length + encode(after)), slice(start, start + primer_length)


def assemble(layout: Layout, split: data.Split, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, L] of reviews idx in their layout, and each row's real length [B]."""
    reviews = layout.review_ids([split.tokens[split.offsets[i]:split.offsets[i + 1]].tolist() for i in idx.tolist()])
    rows = [torch.cat([layout.prefix, torch.tensor(r, dtype=torch.long), layout.suffix]) for r in reviews]
    lengths = torch.tensor([len(r) for r in rows])
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths


def last_logits(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, layout: Layout,
                primer: Optional[torch.Tensor]) -> torch.Tensor:
    """Float32 next-token logits [B, vocab] at each row's last real position, the primer spliced into its slot.

    Right padding with an attention mask and explicit positions keeps every row's logits independent of its batch mates;
    the LM head runs only at the last real positions, never over the whole sequence. A primer after the review
    runs on a cache of the rest (suffix_last_logits)."""
    if layout.in_suffix:
        return suffix_last_logits(model, ids, lengths, layout, primer)
    embeds = model.get_input_embeddings()(ids)
    if primer is not None:
        spliced = primer.to(embeds.dtype).expand(len(ids), -1, -1)
        embeds = torch.cat([embeds[:, :layout.slot.start], spliced, embeds[:, layout.slot.stop:]], dim=1)
    positions = torch.arange(ids.shape[1], device=ids.device)
    mask = (positions < lengths[:, None]).long()
    hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions.expand_as(ids),
                              use_cache=False).last_hidden_state
    return float32_logits(model, hidden[torch.arange(len(ids), device=ids.device), lengths - 1])


def suffix_last_logits(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, layout: Layout,
                       primer: torch.Tensor) -> torch.Tensor:
    """last_logits for a primer after the review: prefix and review run once without gradients into a key-value
    cache, then only the primer and the tokens after it run on that cache, so backward covers those few tokens alone.

    The cached part is left-padded so every row ends at the same column and the suffix block is one dense block for
    all rows; the mask hides the left padding and explicit positions (0.. for the review part, then on from each
    row's own length) keep every row independent of its batch mates."""
    suffix = layout.suffix.to(ids.device)
    context = lengths - len(suffix)  # each row's prefix and review tokens
    width = int(context.max())
    columns = torch.arange(width, device=ids.device)
    positions = columns - (width - context)[:, None]  # negative in the left padding
    mask = (positions >= 0).long()
    with torch.no_grad():
        cache = model.base_model(input_ids=ids.gather(1, positions.clamp(min=0)), attention_mask=mask,
                                 position_ids=positions.clamp(min=0), use_cache=True).past_key_values
    embeds = model.get_input_embeddings()(suffix)
    embeds = torch.cat([embeds[:layout.slot.start], primer.to(embeds.dtype), embeds[layout.slot.stop:]])
    hidden = model.base_model(inputs_embeds=embeds.expand(len(ids), -1, -1), past_key_values=cache, use_cache=True,
                              attention_mask=torch.cat([mask, mask.new_ones(len(ids), len(suffix))], dim=1),
                              position_ids=context[:, None] + torch.arange(len(suffix), device=ids.device)).last_hidden_state
    return float32_logits(model, hidden[:, -1])


def float32_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head in float32 on hidden states [B, hidden]: in bfloat16 logits step by about 0.1 at Llama's
    magnitudes, so close label logits would tie and argmax would take the first."""
    head = model.get_output_embeddings()
    bias = None if head.bias is None else head.bias.float()
    return F.linear(hidden.float(), head.weight.float(), bias)


def unpadded_embeds(model: torch.nn.Module, layout: Layout, review: torch.Tensor, primer: Optional[torch.Tensor]) -> torch.Tensor:
    """One review's input embeddings [T, hidden] in its layout, primer in its slot, no batch and no padding: the
    straightforward way (bench.py's baseline loop, and the reference the tests hold the batched paths to)."""
    embed = model.get_input_embeddings()
    review = torch.tensor(layout.review_ids([review.tolist()])[0], dtype=torch.long)
    rows = embed(torch.cat([layout.prefix, review, layout.suffix]).to(embed.weight.device))
    if primer is None:
        return rows
    start = layout.slot.start + (len(layout.prefix) + len(review) if layout.in_suffix else 0)
    return torch.cat([rows[:start], primer.to(rows.dtype), rows[start + len(primer):]])


def init_primer(model: torch.nn.Module, length: int, seed: int) -> torch.Tensor:
    """Float32 [length, hidden] vectors with the embedding table's per-dimension mean and spread,
    rescaled to the norms of random embedding rows (the reference's initialization)."""
    table = model.get_input_embeddings().weight.detach()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(length, table.shape[1], generator=gen).to(table.device)
    rows = torch.randint(len(table), (length,), generator=gen).to(table.device)
    mean, std = table.float().mean(0), table.float().std(0)
    vectors = mean + std * noise
    return vectors / vectors.norm(dim=1, keepdim=True) * table[rows].float().norm(dim=1, keepdim=True)


def initial_primer(task: Task, init: str, length: int, seed: int) -> torch.Tensor:
    """Float32 [length, hidden] starting vectors on the model's device, as PRIMER_INIT says: "random" (init_primer),
    or the embeddings of the tokens of primer_init_tokens."""
    if init == "random":
        return init_primer(task.model, length, seed)
    table = task.model.get_input_embeddings().weight.detach()
    return table[primer_init_tokens(task, init, length, seed).to(table.device)].float()


def primer_init_tokens(task: Task, init: str, length: int, seed: int) -> torch.Tensor:
    """Token ids [length] whose embeddings start the primer, cycled to length: "vocab" seeded random ordinary tokens
    (no special or added ones, which may be untrained), "labels" the label tokens, "text:<words>" that text's tokens."""
    tok = task.tokenizer
    if init == "vocab":
        ordinary = torch.tensor(sorted(set(range(len(tok))) - set(tok.added_tokens_decoder)))
        ids = ordinary[torch.randperm(len(ordinary), generator=torch.Generator().manual_seed(seed))[:length]].tolist()
    elif init == "labels":
        ids = task.label_ids.tolist()
    elif init.startswith("text:"):
        ids = tok(init[len("text:"):], add_special_tokens=False)["input_ids"]
        if not ids:
            raise cli.UserError(f"--primer_init={init!r} has no text: write the words after 'text:', e.g. --primer_init='text:Classify the review'")
    else:
        raise cli.UserError(f"--primer_init={init!r} is not one of 'random', 'vocab', 'labels', 'text:<words>'")
    return torch.tensor(ids).repeat(-(-length // len(ids)))[:length]


def load_primer(path: str, model: torch.nn.Module, position: str) -> torch.Tensor:
    """A saved primer, checked against the model's width; a note when it was trained at another PRIMER_POSITION."""
    if not os.path.isfile(path):
        raise cli.UserError(f"--primer_path={path} does not exist: give the primer.safetensors of a run in results/")
    try:
        with safe_open(path, "pt") as f:
            primer, trained_at = f.get_tensor("primer").float(), (f.metadata() or {}).get("primer_position", position)
    except Exception as e:  # not safetensors, or no "primer" tensor in it
        raise cli.UserError(f"--primer_path={path} is not a primer file ({type(e).__name__}): give the "
                            f"primer.safetensors of a run in results/") from e
    width = model.get_input_embeddings().weight.shape[1]
    if primer.ndim != 2 or primer.shape[1] != width:
        raise cli.UserError(f"--primer_path={path} holds vectors of shape {tuple(primer.shape)}, but this model's "
                            f"embeddings are {width} wide: use a primer trained for --model_id")
    if trained_at != position:
        print(f"note: {path} was trained at --primer_position={trained_at} and is scored at {position}", flush=True)
    return primer.to(model.device)


def length_grouped_batches(lengths: torch.Tensor, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Seeded batches of similar-length reviews: shuffle, sort within chunks of CHUNK_BATCHES batches, shuffle batches."""
    rng = np.random.default_rng(seed)
    order = torch.from_numpy(rng.permutation(len(lengths)))
    chunks = order.split(batch_size * CHUNK_BATCHES)
    batches = [batch for chunk in chunks for batch in chunk[lengths[chunk].argsort(stable=True)].split(batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def shard_loss(task: Task, layout: Layout, primer: torch.Tensor, shard: torch.Tensor, batch_size: int) -> torch.Tensor:
    """This process's part of the mean cross-entropy over a batch of batch_size reviews, shard being its share of
    them (all of them on one process): summed over processes, the parts make the batch mean. An empty shard gives a
    zero whose gradient is zero, so that its process still joins the gradient sum."""
    if not len(shard):
        return primer.sum() * 0.0
    ids, lengths = assemble(layout, task.train, shard)
    logits = last_logits(task.model, ids.to(task.device), lengths.to(task.device), layout, primer)
    targets = task.label_ids[task.train.labels[shard].to(task.device)]
    return F.cross_entropy(logits, targets) * (len(shard) / batch_size)


def train_step(task: Task, layout: Layout, primer: torch.Tensor, optimizer: torch.optim.Optimizer,
               idx: torch.Tensor) -> torch.Tensor:
    """One Adam step on the primer over training reviews idx; returns the batch's mean loss (a 0-dim tensor).
    A non-finite loss raises NonFiniteLoss before anything is updated. Under accelerate idx is the global batch:
    each process runs its shard, and the summed gradient is the one of the mean over idx on every process."""
    loss = shard_loss(task, layout, primer, parallel.shard(idx), len(idx))
    total = parallel.sum_across(loss.detach())  # every process sees the same loss, so all of them stop on a NaN
    if not torch.isfinite(total):
        raise NonFiniteLoss(f"loss {total.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    primer.grad = parallel.sum_across(primer.grad)  # same gradient, same Adam step: the primer stays identical everywhere
    optimizer.step()
    return total


@parallel.main_writes
def save_checkpoint(run_dir: str, primer: torch.Tensor, optimizer: torch.optim.Optimizer, epoch: int, batch: int,
                    log: list[dict], validation: dict) -> None:
    """Atomically write where training stands: the next batch to run is `batch` of epoch `epoch` (0-based)."""
    state = {"primer": primer.detach().cpu(), "optimizer": optimizer.state_dict(), "epoch": epoch, "batch": batch,
             "log": log, "validation": validation, "torch_rng": torch.get_rng_state()}
    with cli.atomic_path(os.path.join(run_dir, "checkpoint.pt")) as tmp:
        torch.save(state, tmp)


def load_checkpoint(run_dir: str, primer: torch.Tensor,
                    optimizer: torch.optim.Optimizer) -> tuple[int, int, list[dict], dict]:
    """Restore primer, optimizer and RNG from run_dir's checkpoint if there is one; (epoch, batch, log, validation)
    to go on from, validation being {"rows": one score row per epoch, "best_primer": the best epoch's primer}."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        return 0, 0, [], {"rows": [], "best_primer": None}
    state = torch.load(path, weights_only=True)
    with torch.no_grad():
        primer.copy_(state["primer"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resuming {run_dir} at epoch {state['epoch'] + 1}, batch {state['batch']}", flush=True)
    validation = state.get("validation", {"rows": [], "best_primer": None})  # checkpoints from before VAL_LIMIT have none
    return state["epoch"], state["batch"], state["log"], validation


def train(task: Task, layout: Layout, primer: torch.Tensor, run_dir: str) -> tuple[list[dict], str]:
    """Adam on the primer alone, one epoch per RATE_BY_EPOCH entry, checkpointed in run_dir (and resumed from it);
    returns the loss log, one row per step with the training seconds so far, and the status: "finished", or why
    training stopped early. Ctrl-C saves a checkpoint and stops with the command that resumes."""
    cfg, rates = task.cfg, task.cfg.RATE_BY_EPOCH
    primer.requires_grad_(True)
    optimizer = torch.optim.Adam([primer], lr=rates[0])
    start_epoch, start_batch, log, validation = load_checkpoint(run_dir, primer, optimizer)
    last_good = primer.detach().clone()  # the last primer whose loss was finite
    clock = time.perf_counter() - (log[-1]["seconds"] if log else 0.0)  # a resumed run counts its earlier seconds
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))  # stop between steps, never inside one
    try:
        for epoch in range(start_epoch, len(rates)):
            for group in optimizer.param_groups:
                group["lr"] = rates[epoch]
            batches = length_grouped_batches(task.train.lengths, cfg.BATCH_SIZE, cfg.SEED + epoch)
            first = start_batch if epoch == start_epoch else 0
            bar = tqdm(batches[first:], desc=f"epoch {epoch + 1}/{len(rates)} lr {rates[epoch]:g}", unit="batch",
                       initial=first, total=len(batches), disable=not parallel.is_main())
            running, seen, start = None, 0, time.perf_counter()
            for b, idx in enumerate(bar, start=first):
                before = primer.detach().clone()
                try:
                    value = train_step(task, layout, primer, optimizer, idx).item()
                except NonFiniteLoss as e:
                    with torch.no_grad():
                        primer.copy_(last_good)
                    save_checkpoint(run_dir, primer, optimizer, epoch, b, log, validation)
                    print(f"training stopped at epoch {epoch + 1}, batch {b}: {e}; keeping the last good primer", flush=True)
                    keep_best(task, primer, validation)
                    return log, f"stopped early at epoch {epoch + 1}, batch {b}: non-finite {e}"
                last_good, seen = before, seen + len(idx)
                running = value if running is None else 0.98 * running + 0.02 * value
                log.append({"step": len(log) + 1, "epoch": epoch + 1, "lr": rates[epoch], "loss": value,
                            "seconds": time.perf_counter() - clock})
                bar.set_postfix(loss=f"{running:.4f}", samples_s=f"{seen / (time.perf_counter() - start):.1f}")
                stop = parallel.anyone(bool(interrupted))  # under accelerate all processes stop after the same step
                if stop or (b + 1) % cfg.CHECKPOINT_EVERY == 0:
                    save_checkpoint(run_dir, primer, optimizer, epoch, b + 1, log, validation)
                if stop:
                    raise Interrupted(resume_hint(run_dir))
            if task.val is not None:
                save_checkpoint(run_dir, primer, optimizer, epoch, len(batches), log, validation)
                signal.signal(signal.SIGINT, signal.default_int_handler)  # validation stops at once: resume redoes it
                try:
                    validate(task, layout, primer, epoch, validation, run_dir)
                except KeyboardInterrupt:
                    raise Interrupted(resume_hint(run_dir)) from None
                signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
            save_checkpoint(run_dir, primer, optimizer, epoch + 1, 0, log, validation)
    finally:
        signal.signal(signal.SIGINT, previous)
    keep_best(task, primer, validation)
    return log, "finished"


def resume_hint(run_dir: str) -> str:
    return f"interrupted; checkpoint saved: resume with {parallel.launch_command()} experiment.py --resume={run_dir}"


def validate(task: Task, layout: Layout, primer: torch.Tensor, epoch: int, validation: dict, run_dir: str) -> None:
    """Score the validation reviews after epoch `epoch` (0-based), print the scores, add them to validation["rows"]
    and run_dir/validation.csv (rewritten every epoch, to follow a long run), and copy the primer if it is the best."""
    row = {"epoch": epoch + 1, **score(task, layout, primer, task.val)}
    validation["rows"].append(row)
    best = best_validation(validation["rows"])
    if best is row:
        validation["best_primer"] = primer.detach().cpu().clone()
    if parallel.is_main():
        write_atomic(os.path.join(run_dir, "validation.csv"), pd.DataFrame(validation["rows"]).to_csv(index=False))
    print(f"epoch {epoch + 1}/{len(task.cfg.RATE_BY_EPOCH)} validation: score {ledger.format_score(row, 'score')} "
          f"({row['correct']:,} / {row['total']:,}), label-restricted {ledger.format_score(row, 'restricted')}; "
          f"best epoch so far {best['epoch']}", flush=True)


def best_validation(rows: list[dict]) -> Optional[dict]:
    """The validation row of the best epoch: most strict answers right, then most label-restricted ones right,
    then the earliest; None without rows."""
    return max(rows, key=lambda r: (r["correct"], r["restricted_correct"]), default=None)


def keep_best(task: Task, primer: torch.Tensor, validation: dict) -> None:
    """With KEEP_BEST, put the primer of the best validation epoch in place of the last one."""
    best = best_validation(validation["rows"])
    if task.cfg.KEEP_BEST and best is not None:
        with torch.no_grad():
            primer.copy_(validation["best_primer"])
        print(f"keeping the primer of epoch {best['epoch']}, the best on the validation reviews", flush=True)


def best_epoch(run_dir: str) -> Optional[int]:
    """The best epoch on the validation reviews by run_dir's validation.csv; None when the run validated none."""
    path = os.path.join(run_dir, "validation.csv")
    return int(best_validation(pd.read_csv(path).to_dict("records"))["epoch"]) if os.path.exists(path) else None


@torch.inference_mode()
def predict_batch(task: Task, layout: Layout, primer: Optional[torch.Tensor], idx: torch.Tensor,
                  split: Optional[data.Split] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer (argmax token over the whole vocabulary) [B] and the log-probabilities of the two label tokens
    [B, 2] at each of reviews idx of split (the test split unless given)."""
    split = task.test if split is None else split
    ids, lengths = assemble(layout, split, idx)
    logits = last_logits(task.model, ids.to(task.device), lengths.to(task.device), layout, primer)
    return logits.argmax(-1), logits.log_softmax(-1)[:, task.label_ids]


def predict(task: Task, layout: Layout, primer: Optional[torch.Tensor], split: Optional[data.Split] = None) -> dict:
    """Per review of split (the test split unless given), in its order: "label" (0 negative, 1 positive), "answer"
    (the argmax token over the whole vocabulary), "logprobs" ([n, 2], of the two label tokens); and "seconds" taken.
    Under accelerate each process predicts its share of the split and the shares are summed into place."""
    split, start = task.test if split is None else split, time.perf_counter()
    order = split.lengths.argsort(descending=True)  # longest first, so a batch too big for memory fails at once
    answers = torch.zeros(len(split), dtype=torch.long, device=task.device)
    logprobs = torch.zeros(len(split), 2, device=task.device)
    for idx in tqdm(parallel.shard(order).split(task.cfg.SCORE_BATCH_SIZE), desc="score", unit="batch",
                    disable=not parallel.is_main()):
        answers[idx], logprobs[idx] = predict_batch(task, layout, primer, idx, split)
    return {"label": split.labels.clone(), "answer": parallel.sum_across(answers).cpu(),
            "logprobs": parallel.sum_across(logprobs).cpu(), "seconds": time.perf_counter() - start}


def metrics(task: Task, predictions: dict) -> dict:
    """Strict score (label token is the argmax over the whole vocabulary, the reference's metric), the
    label-restricted score (the right label's log-probability is the larger), their 95% Wilson intervals (_low,
    _high), and how often the answer is a label token at all."""
    label_ids = task.label_ids.cpu()
    truth = predictions["label"]
    strict = int((predictions["answer"] == label_ids[truth]).sum())
    restricted = int((predictions["logprobs"].argmax(-1) == truth).sum())
    answered = int(torch.isin(predictions["answer"], label_ids).sum())
    total = len(truth)
    score_low, score_high = wilson_interval(strict, total)
    restricted_low, restricted_high = wilson_interval(restricted, total)
    return {"correct": strict, "total": total, "score": strict / total, "restricted_correct": restricted,
            "restricted_score": restricted / total, "label_answer_share": answered / total, "score_low": score_low,
            "score_high": score_high, "restricted_low": restricted_low, "restricted_high": restricted_high}


def score(task: Task, layout: Layout, primer: Optional[torch.Tensor], split: Optional[data.Split] = None) -> dict:
    """metrics() of predict()."""
    return metrics(task, predict(task, layout, primer, split))


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (low, high) of the share correct / total, 95% for z = 1.96: unlike the normal
    approximation it stays inside [0, 1] and is sound for shares near 0 or 1 and for small totals."""
    p, z2 = correct / total, z * z / total
    center = (p + z2 / 2) / (1 + z2)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total)) / (1 + z2)
    return max(0.0, center - half), min(1.0, center + half)


def write_atomic(path: str, text: str) -> None:
    with cli.atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


@parallel.made_by_main
def start_run(cfg: SimpleNamespace, kind: str) -> str:
    """A new run folder, results/<time>-<kind>, holding the run's effective config (under accelerate the main
    process makes it and every process gets its path)."""
    base = os.path.join(cfg.RESULTS_DIR, f"{datetime.now():%Y%m%d-%H%M%S}-{kind}")
    for n in itertools.count(1):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.makedirs(path)  # fails if another run made it first: two runs in one second get two folders
            break
        except FileExistsError:
            continue
    write_atomic(os.path.join(path, "config.json"), json.dumps({k.lower(): v for k, v in vars(cfg).items()}, indent=2))
    return path


def record(task: Task, script: str, layout: Layout, predictions: dict, primer: Optional[torch.Tensor] = None,
           log: Optional[list[dict]] = None, run_dir: Optional[str] = None, status: str = "finished") -> dict:
    """Write the run folder (metrics, per-review predictions, environment, primer, loss log), append a row to the
    results.csv ledger, print the row; returns the row."""
    cfg = task.cfg
    run_dir = run_dir or start_run(cfg, script)
    scores = metrics(task, predictions)
    if not parallel.is_main():
        return scores  # under accelerate the main process alone writes the run folder and the ledger
    trained = log is not None
    kind = "trained primer" if trained else "saved primer" if primer is not None else "text prompt"
    row = {"run_id": os.path.basename(run_dir), "script": script, "kind": kind, "status": status,
           "model_id": cfg.MODEL_ID, "samples": len(task.train) if trained else 0, "tokens": layout.prompt_tokens,
           "primer_position": cfg.PRIMER_POSITION if primer is not None else "",
           "lr_schedule": ", ".join(f"{r:g}" for r in cfg.RATE_BY_EPOCH) if trained else "",
           **scores, "seed": cfg.SEED, "primer_path": cfg.PRIMER_PATH or "",
           "primer_init": cfg.PRIMER_INIT if trained else "", "val_limit": cfg.VAL_LIMIT if trained else 0,
           "keep_best": cfg.KEEP_BEST if trained else False, "best_epoch": best_epoch(run_dir),
           "train_seconds": round(log[-1]["seconds"], 1) if log else 0.0, "score_seconds": round(predictions["seconds"], 1)}
    write_atomic(os.path.join(run_dir, "metrics.json"), json.dumps(row, indent=2))
    write_atomic(os.path.join(run_dir, "environment.json"), json.dumps(environment(task), indent=2))
    with cli.atomic_path(os.path.join(run_dir, "predictions.safetensors")) as tmp:
        save_file({**{k: v.contiguous() for k, v in predictions.items() if k != "seconds"}, "label_ids": task.label_ids.cpu()}, tmp)
    if primer is not None:
        with cli.atomic_path(os.path.join(run_dir, "primer.safetensors")) as tmp:
            save_file({"primer": primer.detach().float().cpu().contiguous()}, tmp,
                      metadata={"model_id": cfg.MODEL_ID, "primer_position": cfg.PRIMER_POSITION})
    if log:
        write_atomic(os.path.join(run_dir, "losses.csv"), pd.DataFrame(log).to_csv(index=False))
        plots.loss_curve(run_dir)
    ledger.append(cfg.RESULTS_DIR, row)
    print(ledger.format_table([row]))
    print(f"saved {run_dir} and a row of {ledger.path(cfg.RESULTS_DIR)}")
    return row


def environment(task: Task) -> dict:
    """What the config cannot say about a run: the code's commit, the libraries, the device and dtype it resolved."""
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                capture_output=True, text=True).stdout.strip() or None
    except OSError:  # no git installed
        commit = None
    gpu = torch.cuda.get_device_name(task.device) if task.device.type == "cuda" else None
    return {"git_commit": commit, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(task.device), "gpu": gpu,
            "dtype": str(next(task.model.parameters()).dtype).removeprefix("torch."), "processes": parallel.world_size()}


def score_text_prompt(cfg: SimpleNamespace, script: str, system: str, user: str) -> dict:
    """Score a hand-written prompt (system message, and user message around {review}) and record it."""
    task = setup(cfg, with_train=False)
    layout = make_layout(task, system, user)
    return record(task, script, layout, predict(task, layout, None))
