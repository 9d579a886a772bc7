"""The shared harness: a frozen chat model, inputs built from its chat template, primer training and scoring, results."""
import functools
import json
import math
import os
import signal
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
import parallel
import plots

PRIMER_SLOT = "\x00PRIMER\x00"  # stands for the primer while the chat template is rendered
REVIEW_SLOT = "\x00REVIEW\x00"  # stands for the review likewise
CHUNK_BATCHES = 64  # length grouping sorts reviews within chunks of this many batches
PRIMER_POSITIONS = ("system", "prefix", "suffix")  # the values PRIMER_POSITION may take (see make_layout)
PLAIN_ANSWER_CUE = "\nAnswer:"  # ends the prompt of a model with no chat template; the label token follows it
SYSTEM_SEPARATOR = "\n\n"  # between system content and the user message when both share the user turn (as Gemma's template does)
RATE_SCALES = ("embedding", "absolute")  # the values RATE_SCALE may take (see train)
STALL_MOVE = 0.1  # a primer that moved less than this many embedding stds per coordinate (RMS) barely trained
STALL_LOSS = 0.9  # as did one whose loss ended above this share of where it started


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
    model = cli.from_hub(AutoModelForCausalLM.from_pretrained, cfg.MODEL_ID, cfg.GGUF_FILE, dtype=dtype, attn_implementation="sdpa")
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
    device = resolve_device(cfg.DEVICE)
    tokenizer = data.load_tokenizer(cfg.MODEL_ID, cfg.GGUF_FILE)
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


def check_rate_scale(scale: str) -> None:
    if scale not in RATE_SCALES:
        raise cli.UserError(f"--rate_scale={scale!r} is not one of {', '.join(RATE_SCALES)}")


def make_layout(task: Task, system: Optional[str], user: str = "{review}", primer_length: int = 0,
                position: str = "system") -> Layout:
    """The prompt (prompt_text) with `system` text, or a primer of primer_length vectors, at `position`: "system" in
    the system message, "prefix" before everything (bos included), "suffix" right after the review at the end of the
    user turn; `user` around {review}."""
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
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    if primer_length:
        in_suffix = PRIMER_SLOT in tail
        before, after = (tail if in_suffix else head).split(PRIMER_SLOT)
        start = len(encode(before))
        around = torch.tensor(encode(before) + [0] * primer_length + encode(after))
        slot = slice(start, start + primer_length)
        if in_suffix:
            return Layout(torch.tensor(encode(head)), around, slot, primer_length, in_suffix=True)
        return Layout(around, torch.tensor(encode(tail)), slot, primer_length)
    prompt_tokens = len(encode(system)) + sum(len(encode(part)) for part in user.split("{review}"))
    return Layout(torch.tensor(encode(head)), torch.tensor(encode(tail)), slice(0, 0), prompt_tokens)


def assemble(layout: Layout, split: data.Split, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, L] of reviews idx in their layout, and each row's real length [B]."""
    starts, n = split.offsets[idx], split.lengths[idx]
    p, s = len(layout.prefix), len(layout.suffix)
    lengths = p + n + s
    ids = torch.zeros(len(idx), int(lengths.max()), dtype=torch.long)
    ids[:, :p] = layout.prefix
    col = torch.arange(int(n.max()))
    review = split.tokens[(starts[:, None] + col).clamp(max=len(split.tokens) - 1)].long()
    ids[:, p:p + len(col)] = torch.where(col < n[:, None], review, 0)
    ids.scatter_(1, (p + n)[:, None] + torch.arange(s), layout.suffix.expand(len(idx), s))
    return ids, lengths


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
    last = hidden[torch.arange(len(ids), device=ids.device), lengths - 1]
    return model.get_output_embeddings()(last).float()


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
    return model.get_output_embeddings()(hidden[:, -1]).float()


def unpadded_embeds(model: torch.nn.Module, layout: Layout, review: torch.Tensor, primer: Optional[torch.Tensor]) -> torch.Tensor:
    """One review's input embeddings [T, hidden] in its layout, primer in its slot, no batch and no padding: the
    straightforward way (bench.py's baseline loop, and the reference the tests hold the batched paths to)."""
    embed = model.get_input_embeddings()
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


def train(task: Task, layout: Layout, primer: torch.Tensor, run_dir: str) -> list[dict]:
    """Adam on the primer alone, one epoch per RATE_BY_EPOCH entry (in embedding stds unless RATE_SCALE is
    "absolute"), checkpointed in run_dir (and resumed from it);
    returns the loss log, one row per step. Ctrl-C saves a checkpoint and stops with the command that resumes."""
    cfg, std = task.cfg, embedding_std(task.model)
    check_rate_scale(cfg.RATE_SCALE)
    rates = [rate * (std if cfg.RATE_SCALE == "embedding" else 1.0) for rate in cfg.RATE_BY_EPOCH]  # Adam's own
    start_primer = primer.detach().clone()
    primer.requires_grad_(True)
    optimizer = torch.optim.Adam([primer], lr=rates[0])
    start_epoch, start_batch, log, validation = load_checkpoint(run_dir, primer, optimizer)
    last_good = primer.detach().clone()  # the last primer whose loss was finite
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
                    return log
                last_good, seen = before, seen + len(idx)
                running = value if running is None else 0.98 * running + 0.02 * value
                log.append({"step": len(log) + 1, "epoch": epoch + 1, "lr": rates[epoch], "loss": value})
                bar.set_postfix(loss=f"{running:.4f}", samples_s=f"{seen / (time.perf_counter() - start):.1f}")
                stop = parallel.anyone(bool(interrupted))  # under accelerate all processes stop after the same step
                if stop or (b + 1) % cfg.CHECKPOINT_EVERY == 0:
                    save_checkpoint(run_dir, primer, optimizer, epoch, b + 1, log, validation)
                if stop:
                    raise Interrupted(f"interrupted; checkpoint saved: resume with {parallel.launch_command()} experiment.py --resume={run_dir}")
            if task.val is not None:
                validate(task, layout, primer, epoch, validation, run_dir)
            save_checkpoint(run_dir, primer, optimizer, epoch + 1, 0, log, validation)
    finally:
        signal.signal(signal.SIGINT, previous)
    note_stall(log, primer.detach() - start_primer, std)
    keep_best(task, primer, validation)
    return log


def embedding_std(model: torch.nn.Module) -> float:
    """The std of the input embedding table's entries: the scale of a coordinate the primer's Adam steps move."""
    return model.get_input_embeddings().weight.float().std().item()


def note_stall(log: list[dict], moved: torch.Tensor, std: float) -> None:
    """One line when training barely moved the primer or left the loss where it started: the rates are too small."""
    if not log:
        return
    tenth = max(1, len(log) // 10)
    first, last = (float(np.mean([r["loss"] for r in part])) for part in (log[:tenth], log[-tenth:]))
    rms = moved.float().pow(2).mean().sqrt().item() / std
    if rms < STALL_MOVE or last > STALL_LOSS * first:
        print(f"note: training barely changed the primer (it moved {rms:.2f} embedding stds per coordinate; loss "
              f"{first:.3g} over the first and {last:.3g} over the last tenth of the steps): raise --rate_by_epoch", flush=True)


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
    print(f"epoch {epoch + 1}/{len(task.cfg.RATE_BY_EPOCH)} validation: score {format_score(row, 'score')} "
          f"({row['correct']:,} / {row['total']:,}), label-restricted {format_score(row, 'restricted')}; "
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
def score_batch(task: Task, layout: Layout, primer: Optional[torch.Tensor], idx: torch.Tensor,
                split: Optional[data.Split] = None) -> torch.Tensor:
    """Counts [strict correct, label-restricted correct, answered with a label token] over reviews idx of split
    (the test split unless given)."""
    split = task.test if split is None else split
    ids, lengths = assemble(layout, split, idx)
    logits = last_logits(task.model, ids.to(task.device), lengths.to(task.device), layout, primer)
    truth, labels = split.labels[idx].to(task.device), task.label_ids
    answer = logits.argmax(-1)
    return torch.stack([(answer == labels[truth]).sum(), (logits[:, labels].argmax(-1) == truth).sum(),
                        torch.isin(answer, labels).sum()])


def score(task: Task, layout: Layout, primer: Optional[torch.Tensor], split: Optional[data.Split] = None) -> dict:
    """Strict score (label token is the argmax over the whole vocabulary, the reference's metric), the
    label-restricted score (argmax over the two label tokens), their 95% Wilson intervals (_low, _high) and how
    often the answer is a label token at all, over split (the test split unless given). Under accelerate each
    process scores its share of the split and the counts are summed."""
    split = task.test if split is None else split
    order = split.lengths.argsort(descending=True)  # longest first, so a batch too big for memory fails at once
    batches = parallel.shard(order).split(task.cfg.SCORE_BATCH_SIZE)
    counts = sum((score_batch(task, layout, primer, idx, split) for idx in tqdm(batches, desc="score", unit="batch",
                                                                                disable=not parallel.is_main())),
                 torch.zeros(3, dtype=torch.long, device=task.device))
    strict, restricted, answered = parallel.sum_across(counts).tolist()
    total = len(split)
    score_low, score_high = wilson_interval(strict, total)
    restricted_low, restricted_high = wilson_interval(restricted, total)
    return {"correct": strict, "total": total, "score": strict / total, "restricted_correct": restricted,
            "restricted_score": restricted / total, "label_answer_share": answered / total, "score_low": score_low,
            "score_high": score_high, "restricted_low": restricted_low, "restricted_high": restricted_high}


def timed_score(task: Task, layout: Layout, primer: Optional[torch.Tensor]) -> dict:
    """score() on the test split, plus its wall time (score_seconds) for the run's metrics."""
    start = time.perf_counter()
    return {**score(task, layout, primer), "score_seconds": time.perf_counter() - start}


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (low, high) of the share correct / total, 95% for z = 1.96: unlike the normal
    approximation it stays inside [0, 1] and is sound for shares near 0 or 1 and for small totals."""
    p, z2 = correct / total, z * z / total
    center = (p + z2 / 2) / (1 + z2)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total)) / (1 + z2)
    return max(0.0, center - half), min(1.0, center + half)


def format_score(row: dict, name: str) -> str:
    """Score `name` ("score" or "restricted") of a metrics row as a percentage with its 95% Wilson interval's
    half-width in points, e.g. "95.9% ±0.2" (the interval is asymmetric: its bounds are in the ledger)."""
    share = row["score"] if name == "score" else row["restricted_score"]
    return f"{100 * share:.1f}% ±{50 * (row[name + '_high'] - row[name + '_low']):.1f}"


def write_atomic(path: str, text: str) -> None:
    with cli.atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


@parallel.made_by_main
def start_run(cfg: SimpleNamespace, kind: str) -> str:
    """A new run folder, results/<time>-<kind>, holding the run's effective config (under accelerate the main
    process makes it and every process gets its path)."""
    base = os.path.join(cfg.RESULTS_DIR, f"{datetime.now():%Y%m%d-%H%M%S}-{kind}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    os.makedirs(path)
    write_atomic(os.path.join(path, "config.json"), json.dumps({k.lower(): v for k, v in vars(cfg).items()}, indent=2))
    return path


def run_config(run_dir: str, overrides: list[str] = ()) -> SimpleNamespace:
    """The config run_dir was started with (its config.json, less keys config.py no longer has), overrides on top."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise cli.UserError(f"{run_dir} is not a run folder (no config.json): give results/<run id>")
    known = cli.defaults()
    saved = {k: v for k, v in read_json(path).items() if k.upper() in known and k != "resume"}
    return cli.configure(cli.as_args(saved) + list(overrides))


def read_json(path: str) -> dict:
    """A run folder's JSON file; a one-line error when it is damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise cli.UserError(f"{path} is not valid JSON ({e}): give the folder of a finished run") from e


def resumed_config(run_dir: str) -> SimpleNamespace:
    """The config a run folder was started with, to resume it."""
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise cli.UserError(f"--resume={run_dir} is not a run folder (no config.json): give results/<run id>")
    cfg = run_config(run_dir)
    cfg.RESUME = run_dir
    return cfg


def format_table(rows: list[dict]) -> str:
    """Ledger rows in the reference's form: Samples | Tokens | LR Schedule | Score | Correct / Total, plus the
    primer's position, the label-restricted score, each score with its 95% interval's half-width, then the research
    knobs and best epoch."""
    lines = ["| Run | Samples | Tokens | Position | LR Schedule | Score | Correct / Total | Label-restricted | Primer init "
             "| Val reviews | Best epoch | Keep best |", "|---" * 12 + "|"]
    for r in rows:
        samples = f"{int(r['samples']):,}" if r["samples"] else "–"
        lines.append(f"| {r['script']} | {samples} | {int(r['tokens'])} | {r.get('primer_position') or '–'} "
                     f"| {r['lr_schedule'] or '–'} | {format_score(r, 'score')} "
                     f"| {int(r['correct']):,} / {int(r['total']):,} | {format_score(r, 'restricted')} "
                     f"| {r['primer_init'] or '–'} | {int(r['val_limit']) or '–'} | {r['best_epoch'] or '–'} "
                     f"| {'yes' if r['keep_best'] else '–'} |")
    return "\n".join(lines)


def record(task: Task, script: str, layout: Layout, metrics: dict, primer: Optional[torch.Tensor] = None,
           log: Optional[list[dict]] = None, run_dir: Optional[str] = None) -> str:
    """Write the run folder (metrics, primer, loss log), append the results.csv ledger, print the table row."""
    cfg = task.cfg
    run_dir = run_dir or start_run(cfg, script)
    if not parallel.is_main():
        return run_dir  # under accelerate the main process alone writes the run folder and the ledger
    trained = log is not None
    row = {"run_id": os.path.basename(run_dir), "script": script, "model_id": cfg.MODEL_ID,
           "samples": len(task.train) if trained else 0, "tokens": layout.prompt_tokens,
           "primer_position": cfg.PRIMER_POSITION if primer is not None else "",
           "lr_schedule": ", ".join(f"{r:g}" for r in cfg.RATE_BY_EPOCH) if trained else "",
           **metrics, "seed": cfg.SEED, "primer_path": cfg.PRIMER_PATH or "",
           "primer_init": cfg.PRIMER_INIT if trained else "", "val_limit": cfg.VAL_LIMIT if trained else 0,
           "keep_best": cfg.KEEP_BEST if trained else False, "best_epoch": best_epoch(run_dir)}
    write_atomic(os.path.join(run_dir, "metrics.json"), json.dumps(row, indent=2))
    if primer is not None:
        with cli.atomic_path(os.path.join(run_dir, "primer.safetensors")) as tmp:
            save_file({"primer": primer.detach().float().cpu().contiguous()}, tmp,
                      metadata={"model_id": cfg.MODEL_ID, "primer_position": cfg.PRIMER_POSITION})
    if log:
        write_atomic(os.path.join(run_dir, "losses.csv"), pd.DataFrame(log).to_csv(index=False))
        plots.loss_curve(run_dir)
    ledger = os.path.join(cfg.RESULTS_DIR, "results.csv")
    rows = pd.read_csv(ledger) if os.path.exists(ledger) else pd.DataFrame()
    write_atomic(ledger, pd.concat([rows, pd.DataFrame([row])], ignore_index=True).to_csv(index=False))
    print(format_table([row]))
    print(f"saved {run_dir} and a row of {ledger}")
    return run_dir


def score_text_prompt(cfg: SimpleNamespace, script: str, system: str, user: str) -> str:
    """Score a hand-written prompt (system message, and user message around {review}) and record it."""
    task = setup(cfg, with_train=False)
    layout = make_layout(task, system, user)
    return record(task, script, layout, timed_score(task, layout, None))
