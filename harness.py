"""The shared harness: a frozen chat model, inputs built from its chat template, primer training and scoring, results."""
import json
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
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import cli
import data
import parallel

PRIMER_SLOT = "\x00PRIMER\x00"  # stands for the primer while the chat template is rendered
REVIEW_SLOT = "\x00REVIEW\x00"  # stands for the review likewise
CHUNK_BATCHES = 64  # length grouping sorts reviews within chunks of this many batches


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


@dataclass
class Layout:
    """Token ids around the review: prefix (primer slot included, as placeholder ids), review, suffix."""
    prefix: torch.Tensor
    suffix: torch.Tensor
    slot: slice  # the primer's positions in the prefix; empty for a text prompt
    prompt_tokens: int  # tokens the prompt adds to the review: primer length, or the text prompt's own tokens


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


def label_token_ids(tokenizer, labels: list[str]) -> list[int]:
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
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
    device = resolve_device(cfg.DEVICE)
    tokenizer = data.load_tokenizer(cfg.MODEL_ID)
    labels = torch.tensor(label_token_ids(tokenizer, cfg.LABELS), device=device)
    with parallel.local_main_first():  # under accelerate one process per machine prepares missing data
        train = data.load_split(cfg, tokenizer, "train") if with_train else None
        test = data.load_split(cfg, tokenizer, "test")
    torch.manual_seed(cfg.SEED)
    return Task(cfg, tokenizer, load_model(cfg, device), device, labels, train, test)


def make_layout(task: Task, system: Optional[str], user: str = "{review}", primer_length: int = 0) -> Layout:
    """The chat template rendered with `system` (or a primer of primer_length vectors) and `user` around {review}."""
    tok = task.tokenizer
    messages = [{"role": "system", "content": PRIMER_SLOT if primer_length else system},
                {"role": "user", "content": user.replace("{review}", REVIEW_SLOT)}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **task.cfg.TEMPLATE_KWARGS)
    head, tail = text.split(REVIEW_SLOT)
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    if primer_length:
        before, middle = head.split(PRIMER_SLOT)
        start = len(encode(before))
        prefix = encode(before) + [0] * primer_length + encode(middle)
        return Layout(torch.tensor(prefix), torch.tensor(encode(tail)), slice(start, start + primer_length), primer_length)
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
    the LM head runs only at the last real positions, never over the whole sequence."""
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


def load_primer(path: str, model: torch.nn.Module) -> torch.Tensor:
    if not os.path.isfile(path):
        raise cli.UserError(f"--primer_path={path} does not exist: give the primer.safetensors of a run in results/")
    primer = load_file(path)["primer"].float()
    width = model.get_input_embeddings().weight.shape[1]
    if primer.ndim != 2 or primer.shape[1] != width:
        raise cli.UserError(f"--primer_path={path} holds vectors of shape {tuple(primer.shape)}, but this model's "
                            f"embeddings are {width} wide: use a primer trained for --model_id")
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
                    log: list[dict]) -> None:
    """Atomically write where training stands: the next batch to run is `batch` of epoch `epoch` (0-based)."""
    state = {"primer": primer.detach().cpu(), "optimizer": optimizer.state_dict(), "epoch": epoch, "batch": batch,
             "log": log, "torch_rng": torch.get_rng_state()}
    path = os.path.join(run_dir, "checkpoint.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(run_dir: str, primer: torch.Tensor, optimizer: torch.optim.Optimizer) -> tuple[int, int, list[dict]]:
    """Restore primer, optimizer and RNG from run_dir's checkpoint if there is one; (epoch, batch, log) to go on from."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        return 0, 0, []
    state = torch.load(path, weights_only=True)
    with torch.no_grad():
        primer.copy_(state["primer"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resuming {run_dir} at epoch {state['epoch'] + 1}, batch {state['batch']}", flush=True)
    return state["epoch"], state["batch"], state["log"]


def train(task: Task, layout: Layout, primer: torch.Tensor, run_dir: str) -> list[dict]:
    """Adam on the primer alone, one epoch per RATE_BY_EPOCH entry, checkpointed in run_dir (and resumed from it);
    returns the loss log, one row per step. Ctrl-C saves a checkpoint and stops with the command that resumes."""
    cfg, rates = task.cfg, task.cfg.RATE_BY_EPOCH
    primer.requires_grad_(True)
    optimizer = torch.optim.Adam([primer], lr=rates[0])
    start_epoch, start_batch, log = load_checkpoint(run_dir, primer, optimizer)
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
            for b, idx in enumerate(batches[first:], start=first):
                before = primer.detach().clone()
                try:
                    value = train_step(task, layout, primer, optimizer, idx).item()
                except NonFiniteLoss as e:
                    with torch.no_grad():
                        primer.copy_(last_good)
                    save_checkpoint(run_dir, primer, optimizer, epoch, b, log)
                    print(f"training stopped at epoch {epoch + 1}, batch {b}: {e}; keeping the last good primer", flush=True)
                    return log
                last_good, seen = before, seen + len(idx)
                running = value if running is None else 0.98 * running + 0.02 * value
                log.append({"step": len(log) + 1, "epoch": epoch + 1, "lr": rates[epoch], "loss": value})
                bar.set_postfix(loss=f"{running:.4f}", samples_s=f"{seen / (time.perf_counter() - start):.1f}")
                stop = parallel.anyone(bool(interrupted))  # under accelerate all processes stop after the same step
                if stop or (b + 1) % cfg.CHECKPOINT_EVERY == 0:
                    save_checkpoint(run_dir, primer, optimizer, epoch, b + 1, log)
                if stop:
                    raise cli.UserError(f"interrupted; checkpoint saved: resume with {parallel.launch_command()} experiment.py --resume={run_dir}")
            save_checkpoint(run_dir, primer, optimizer, epoch + 1, 0, log)
    finally:
        signal.signal(signal.SIGINT, previous)
    return log


@torch.inference_mode()
def score_batch(task: Task, layout: Layout, primer: Optional[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Counts [strict correct, label-restricted correct, answered with a label token] over test reviews idx."""
    ids, lengths = assemble(layout, task.test, idx)
    logits = last_logits(task.model, ids.to(task.device), lengths.to(task.device), layout, primer)
    truth, labels = task.test.labels[idx].to(task.device), task.label_ids
    answer = logits.argmax(-1)
    return torch.stack([(answer == labels[truth]).sum(), (logits[:, labels].argmax(-1) == truth).sum(),
                        torch.isin(answer, labels).sum()])


def score(task: Task, layout: Layout, primer: Optional[torch.Tensor]) -> dict:
    """Strict score (label token is the argmax over the whole vocabulary, the reference's metric), the
    label-restricted score (argmax over the two label tokens) and how often the answer is a label token at all."""
    order = task.test.lengths.argsort(descending=True)  # longest first, so a batch too big for memory fails at once
    batches = parallel.shard(order).split(task.cfg.SCORE_BATCH_SIZE)  # under accelerate, this process's share
    counts = sum((score_batch(task, layout, primer, idx) for idx in tqdm(batches, desc="score", unit="batch",
                                                                         disable=not parallel.is_main())),
                 torch.zeros(3, dtype=torch.long, device=task.device))
    strict, restricted, answered = parallel.sum_across(counts).tolist()
    total = len(task.test)
    return {"correct": strict, "total": total, "score": strict / total, "restricted_correct": restricted,
            "restricted_score": restricted / total, "label_answer_share": answered / total}


def write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


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


def resumed_config(run_dir: str) -> SimpleNamespace:
    """The config a run folder was started with, to resume it."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise cli.UserError(f"--resume={run_dir} is not a run folder (no config.json): give results/<run id>")
    with open(path) as f:
        saved = json.load(f)
    cfg = cli.configure([f"--{k}={v!r}" for k, v in saved.items() if k != "resume"])
    cfg.RESUME = run_dir
    return cfg


def format_table(rows: list[dict]) -> str:
    """Ledger rows in the reference's form: Samples | Tokens | LR Schedule | Score | Correct / Total, plus the
    label-restricted score."""
    lines = ["| Run | Samples | Tokens | LR Schedule | Score | Correct / Total | Label-restricted |", "|---" * 7 + "|"]
    for r in rows:
        samples = f"{int(r['samples']):,}" if r["samples"] else "–"
        lines.append(f"| {r['script']} | {samples} | {int(r['tokens'])} | {r['lr_schedule'] or '–'} | {100 * r['score']:.1f}% "
                     f"| {int(r['correct']):,} / {int(r['total']):,} | {100 * r['restricted_score']:.1f}% |")
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
           "lr_schedule": ", ".join(f"{r:g}" for r in cfg.RATE_BY_EPOCH) if trained else "",
           **metrics, "seed": cfg.SEED, "primer_path": cfg.PRIMER_PATH or ""}
    write_atomic(os.path.join(run_dir, "metrics.json"), json.dumps(row, indent=2))
    if primer is not None:
        save_file({"primer": primer.detach().float().cpu().contiguous()}, os.path.join(run_dir, "primer.safetensors.tmp"),
                  metadata={"model_id": cfg.MODEL_ID})
        os.replace(os.path.join(run_dir, "primer.safetensors.tmp"), os.path.join(run_dir, "primer.safetensors"))
    if log:
        write_atomic(os.path.join(run_dir, "losses.csv"), pd.DataFrame(log).to_csv(index=False))
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
    return record(task, script, layout, score(task, layout, None))
