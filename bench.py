"""Throughput and model-FLOP utilization of the real training step, scoring and probe feature extraction, against a
straightforward loop.

    python bench.py                                           # MODEL_ID's weights, DATA_DIR's split if prepared
    python bench.py --random_init=True                        # MODEL_ID's architecture (architectures/), random weights
    python bench.py --random_init=True --model_id=architectures/llama-small-cpu --device=cpu

FLOPs per sample and utilization: harness/flops.py.
Training and scoring are also timed with forward's full pass, the prompt before the review run in every row rather
than once for the batch (frozen.forward), and the speed-up printed. Training is timed with the primer at the other
of PRIMER_POSITION "system" and "suffix", on the same batches, and the suffix position's speed-up printed, in a first
epoch and once each review's key-value cache is kept; and a learned steering vector at the middle layer, the full
forward against the layers above it on that layer's kept outputs. Rows that skip work count the FLOPs of the full
pass, so their rates are effective.
"""
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from harness import activations, cli, data, decoder, frozen, hub, layouts, primers, runs, scoring, synthetic, training
from harness.flops import batch_flops, device_name, matmul_tflops, model_shape, peak_memory_gb, sync

BENCH = {
    "RANDOM_INIT": False,  # MODEL_ID's architecture (architectures/<name>/ or a folder's config.json), random weights
    "STEPS": 10,  # timed batches per measurement
    "WARMUP": 2,  # untimed batches first (allocator, kernels)
    "BASELINE": True,  # also time the straightforward loop on the same batches
    "REF_TRAIN": 58000 * 5,  # training samples of the reference run (58,000 reviews x 5 epochs), for the projection
    "REF_TEST": 38000,  # test reviews of the reference run
    "INVARIANCE": 148,  # reviews scored alone and in batches of SCORE_BATCH_SIZE, to count the answers batching changes
    "CUDNN_ATTENTION": False,  # keep cuDNN among SDPA's CUDA kernels (it plans anew for every sequence length: slow)
    "PAD_MULTIPLE": 1,  # pad every batch to a multiple of this many tokens (layouts.PAD_MULTIPLE): fewer shapes
}
SYNTHETIC_REVIEWS = 20000  # synthetic split size when no prepared split is used
def bench_layout(task: runs.Task, position: str, primer_length: int) -> layouts.Layout:
    """MODEL_ID's own layout with the primer at position, or a synthetic one when there is no tokenizer."""
    layouts.check_primer_position(position, task.cfg.GRADIENT_CHECKPOINTING)
    if task.tokenizer is None:
        return synthetic.layout(task.model.get_input_embeddings().weight.shape[0], primer_length, position)
    return layouts.make_layout(task, None, primer_length=primer_length, position=position)


def attention_line(task: runs.Task, batches: dict[str, list[torch.Tensor]], layout: layouts.Layout) -> str:
    """The attention kernel in use, and how many distinct padded shapes each timed run meets: a kernel that plans or
    compiles per shape pays that many times."""
    shapes = {name: len({layouts.assemble(layout, task.train, idx)[0].shape for idx in found})
              for name, found in batches.items()}
    # an epoch's widths, from the lengths alone
    lengths, fixed = task.train.lengths, len(layout.prefix) + len(layout.suffix)
    epoch = training.length_grouped_batches(lengths, task.cfg.BATCH_SIZE, task.cfg.SEED)
    widths = len({layouts.padded_width(int(lengths[idx].max()) + fixed) for idx in epoch})
    return (f"attention: {decoder.attention_backend(task.model, task.device)} "
            f"(cuDNN {'allowed' if task.cfg.CUDNN_ATTENTION else 'off'}"
            f" on CUDA), batches padded to a multiple of {layouts.PAD_MULTIPLE}; distinct padded shapes: "
            + ", ".join(f"{name} {n} in {len(batches[name])} batches" for name, n in shapes.items())
            + f"; a training epoch meets about {widths} padded lengths in {len(epoch):,} batches")


def bench_task(cfg) -> tuple[runs.Task, layouts.Layout]:
    """The task to time: MODEL_ID (or its random twin) on the prepared train split, or on synthetic reviews."""
    device = hub.resolve_device(cfg.DEVICE)
    layouts.PAD_MULTIPLE = cfg.PAD_MULTIPLE
    if cfg.RANDOM_INIT:
        model = synthetic.random_model(cfg.MODEL_ID, cfg.DTYPE, cfg.GRADIENT_CHECKPOINTING, device)
        tokenizer = None
    else:
        tokenizer = hub.load_tokenizer(cfg.MODEL_ID, cfg.GGUF_FILE)
        model = hub.load_model(cfg.MODEL_ID, cfg.GGUF_FILE, device, cfg.DTYPE, cfg.GRADIENT_CHECKPOINTING)
    hub.choose_attention(device, cfg.CUDNN_ATTENTION)  # after load_model, which takes cuDNN out
    vocab = model.get_input_embeddings().weight.shape[0]
    prepared = tokenizer is not None and os.path.exists(data.split_path(cfg, "train"))
    split = (data.load_split(cfg, tokenizer, "train") if prepared
             else synthetic.split(SYNTHETIC_REVIEWS, vocab, cfg.MAX_REVIEW_TOKENS, cfg.SEED))
    labels = (layouts.label_token_ids(tokenizer, cfg.LABELS, layouts.answer_context(tokenizer, cfg.TEMPLATE_KWARGS))
              if tokenizer else [vocab - 2, vocab - 1])
    task = runs.Task(cfg, tokenizer, model, device, torch.tensor(labels, device=device), split, split)
    layout = bench_layout(task, cfg.PRIMER_POSITION, cfg.PRIMER_LENGTH)
    print(f"model {cfg.MODEL_ID}{' (random weights)' if cfg.RANDOM_INIT else ''} on {device_name(device)}, "
          f"{'reviews of ' + split.meta['source'] if prepared else 'synthetic Yelp-length reviews'}", flush=True)
    return task, layout


def measure(name: str, step, batches: list[torch.Tensor], lengths_of, padded_of, flops_of, task, peak: float) -> dict:
    """Run step(idx) over warm-up then timed batches; throughput, padding share, memory and utilization."""
    device, warmup = task.device, task.cfg.WARMUP
    for idx in batches[:warmup]:
        step(idx)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = batches[warmup:]
    start = time.perf_counter()
    for idx in timed:
        step(idx)
    sync(device)
    seconds = time.perf_counter() - start
    samples = sum(len(idx) for idx in timed)
    real = sum(int(lengths_of(idx).sum()) for idx in timed)
    padded = sum(padded_of(idx) for idx in timed)
    tflops = sum(flops_of(idx) for idx in timed) / seconds / 1e12
    return {"run": name, "samples/s": samples / seconds, "tokens/s": real / seconds, "padding": 1 - real / padded,
            "peak memory": peak_memory_gb(device), "TFLOP/s": tflops, "MFU": tflops / peak}


def naive_logits(task: runs.Task, layout: layouts.Layout, primer: torch.Tensor, idx: torch.Tensor,
                 pad_to: int) -> torch.Tensor:
    """The straightforward loop: each review embedded and concatenated in Python, every row padded to the longest
    review of the split, logits over the whole vocabulary at every position."""
    split, device = task.train, task.device
    rows, lengths = [], []
    for i in idx.tolist():
        review = split.tokens[split.offsets[i]:split.offsets[i + 1]].long()
        row = layouts.unpadded_embeds(task.model, layout, review, primer)
        lengths.append(len(row))
        rows.append(F.pad(row, (0, 0, 0, pad_to - len(row))))
    lengths = torch.tensor(lengths, device=device)
    mask = (torch.arange(pad_to, device=device) < lengths[:, None]).long()
    logits = task.model(inputs_embeds=torch.stack(rows), attention_mask=mask).logits
    return logits[torch.arange(len(idx), device=device), lengths - 1].float()


@torch.inference_mode()
def batch_invariance(task: runs.Task, layout: layouts.Layout, primer: torch.Tensor, n: int) -> str:
    """How scoring reviews in batches of SCORE_BATCH_SIZE, padded to the longest, moves their logits and answers
    from scoring each review alone: in float32 on the CPU the answers are equal and the logits within ~5e-5, not so in
    every dtype and kernel."""
    def logits(idx: torch.Tensor) -> torch.Tensor:
        ids, lengths = layouts.assemble(layout, task.train, idx)
        return frozen.forward(task.model, ids, lengths, layout, primer).logits
    idx = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(task.cfg.SEED))[:n]
    alone = torch.cat([logits(i[None]) for i in idx])
    batched = torch.cat([logits(b) for b in idx.split(task.cfg.SCORE_BATCH_SIZE)])
    labels = task.label_ids
    changed = (alone.argmax(-1) != batched.argmax(-1)).sum()
    changed_label = (alone[:, labels].argmax(-1) != batched[:, labels].argmax(-1)).sum()
    return (f"batch size 1 vs {task.cfg.SCORE_BATCH_SIZE}: {changed} of {n} answers over the vocabulary and "
            f"{changed_label} "
            f"between the labels change; logits move by at most {(alone - batched).abs().max():.3g} "
            f"(label logit gap median {(alone[:, labels[0]] - alone[:, labels[1]]).abs().median():.3g})")


def vector_rows(task: runs.Task, shape: dict, batches: list[torch.Tensor], peak: float) -> list[dict]:
    """steer.py's learned vector trained at the middle layer on the same batches: the full forward, then the layers
    above it on its kept outputs (reuse.steered_logits), every batch's kept first (a later epoch's steps)."""
    plain, count = bench_layout(task, "system", 0), len(task.model.get_decoder().layers)
    steer = frozen.Steer(torch.zeros(shape["d"], device=task.device, requires_grad=True), ((count + 1) // 2,))
    optimizer = torch.optim.Adam([steer.vector], lr=1e-3)
    real = lambda idx: task.train.lengths[idx] + len(plain.prefix) + len(plain.suffix)

    def step(idx: torch.Tensor, layers: tuple[int, ...]) -> None:  # layers: forward's full pass, the hidden states kept
        ids, lengths = layouts.assemble(plain, task.train, idx)
        logits = frozen.forward(task.model, ids, lengths, plain, steer=steer, layers=layers).logits
        loss = F.cross_entropy(logits, task.label_ids[task.train.labels[idx].to(task.device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    keep_every(lambda idx: frozen.forward(task.model, *layouts.assemble(plain, task.train, idx), plain, steer=steer),
               batches)
    return [measure(name, lambda idx: step(idx, layers), batches, real,
                    lambda idx: len(idx) * layouts.padded_width(int(real(idx).max())),
                    lambda idx: batch_flops(shape, real(idx), False, True), task, peak)
            for name, layers in (("train, learned vector, full forward", (count,)),
                                 ("train, learned vector, layers below kept", ()))]


@torch.no_grad()
def keep_every(forward, batches: list[torch.Tensor]) -> None:
    """Run forward(idx) on every batch once, so that what it keeps of each review is there before timing starts."""
    for idx in batches:
        forward(idx)


def print_table(rows: list[dict]) -> None:
    print("| Run | Samples/s | Real tokens/s | Padding | Peak memory | TFLOP/s | MFU |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['samples/s']:,.1f} | {r['tokens/s']:,.0f} | {100 * r['padding']:.0f}% "
              f"| {r['peak memory']} "
              f"| {r['TFLOP/s']:.3g} | {100 * r['MFU']:.1f}% |")


def score_rows(task: runs.Task, layout: layouts.Layout, primer: torch.Tensor, shape: dict, batches: list[torch.Tensor],
               peak: float, baseline: bool) -> list[dict]:
    """Scoring (with BASELINE, the straightforward loop too) and probe.py's feature extraction on the same batches."""
    split, device, fixed = task.train, task.device, len(layout.prefix) + len(layout.suffix)
    real = lambda idx: split.lengths[idx] + fixed
    grouped = lambda idx: len(idx) * layouts.padded_width(int(real(idx).max()))
    flops = lambda idx: batch_flops(shape, real(idx), False, False)
    last = len(task.model.get_decoder().layers)

    @torch.inference_mode()
    def full(idx):  # forward's full pass, which layers asks for
        frozen.forward(task.model, *layouts.assemble(layout, split, idx), layout, primer, layers=(last,))
    rows = [measure("score", lambda idx: scoring.predict_batch(task, layout, primer, idx), batches, real, grouped,
                    flops, task, peak), measure("score, full forward", full, batches, real, grouped, flops, task, peak)]
    if baseline:
        longest = int(split.lengths.max()) + fixed
        with torch.inference_mode():
            rows.append(measure("score, straightforward loop",
                                lambda idx: naive_logits(task, layout, primer, idx, longest), batches, real,
                                lambda idx: len(idx) * longest,
                                lambda idx: batch_flops(shape, real(idx), True, False), task, peak))
    every_layer = tuple(range(activations.layer_count(task.model)))

    @torch.inference_mode()
    def features(idx):  # probe.py's extraction: the scoring pass plus every layer's hidden states, pooled
        ids, lengths = layouts.assemble(layout, split, idx)
        frozen.forward(task.model, ids.to(device), lengths.to(device), layout, primer, layers=every_layer)
    return rows + [measure("probe features, every layer", features, batches, real, grouped, flops, task, peak)]


def print_ratios(cfg, rows: list[dict], task: runs.Task) -> None:
    """The speed-ups the table implies: against the straightforward loop, the suffix primer against the system one,
    the learned vector on kept outputs, and the reference run's projected time."""
    by_name = {r["run"]: r for r in rows}
    if cfg.BASELINE:
        for what in ("train", "score"):
            print(f"{what}: {by_name[what]['samples/s'] / by_name[what + ', straightforward loop']['samples/s']:.1f}x "
                  "the straightforward loop")
    if cfg.GRADIENT_CHECKPOINTING:
        print("primer position suffix not timed: it does not combine with --gradient_checkpointing=True")
    else:
        train_at = {p: by_name["train" if p == cfg.PRIMER_POSITION else f"train, primer position {p}"]["samples/s"]
                    for p in ("system", "suffix")}
        kept = by_name["train, primer position suffix, reviews kept"]["samples/s"]
        print(f"train, primer position suffix: {train_at['suffix'] / train_at['system']:.1f}x primer position system "
              f"in the first epoch, {kept / train_at['system']:.1f}x once its reviews are kept")
    print("what forward runs once (a batch's prefix, or a review's frozen part) against its full pass: train "
          + ", score ".join(f"{by_name[w]['samples/s'] / by_name[w + ', full forward']['samples/s']:.2f}x"
                            for w in ("train", "score")))
    full, kept = (r["samples/s"] for r in rows if r["run"].startswith("train, learned vector"))
    middle = (len(task.model.get_decoder().layers) + 1) // 2
    print(f"train, learned vector: {kept / full:.1f}x the full forward with layer {middle}'s outputs kept")
    minutes = (cfg.REF_TRAIN / by_name["train"]["samples/s"] + cfg.REF_TEST / by_name["score"]["samples/s"]) / 60
    print(f"reference run ({cfg.REF_TRAIN:,} training samples, {cfg.REF_TEST:,} test reviews) projected: "
          f"{minutes:,.1f} minutes on {device_name(task.device)} at batch size {cfg.BATCH_SIZE} / "
          f"{cfg.SCORE_BATCH_SIZE}")


def run(cfg) -> None:
    task, layout = bench_task(cfg)
    split, device, n = task.train, task.device, cfg.WARMUP + cfg.STEPS
    peak = matmul_tflops(device, hub.resolve_dtype(cfg.DTYPE, device))
    print(f"dense {hub.resolve_dtype(cfg.DTYPE, device)} matmul: {peak:.3g} TFLOP/s on {device_name(device)}")
    shape, fixed = model_shape(task.model), len(layout.prefix) + len(layout.suffix)
    primer = primers.init_primer(task.model, cfg.PRIMER_LENGTH, cfg.SEED).requires_grad_(True)
    optimizer = torch.optim.Adam([primer], lr=cfg.RATE)
    train_batches = training.length_grouped_batches(split.lengths, cfg.BATCH_SIZE, cfg.SEED)[:n]
    sample = torch.from_numpy(np.random.default_rng(cfg.SEED).permutation(len(split))[:n * cfg.SCORE_BATCH_SIZE])
    score_batches = list(sample[split.lengths[sample].argsort(descending=True)].split(cfg.SCORE_BATCH_SIZE))
    print(attention_line(task, {"train": train_batches[cfg.WARMUP:], "score": score_batches[cfg.WARMUP:]}, layout),
          flush=True)
    real = lambda idx: split.lengths[idx] + fixed
    longest = int(split.lengths.max()) + fixed
    to_longest = lambda idx: len(idx) * longest

    def naive_train(idx):
        loss = F.cross_entropy(naive_logits(task, layout, primer, idx, longest),
                               task.label_ids[split.labels[idx].to(device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def train_row(name: str, at: layouts.Layout, layers: tuple[int, ...] = ()) -> dict:
        """train_step timed in layout `at` (forward's full pass where `layers` asks for it); FLOPs counted as for a
        full forward and backward pass, whatever it skips."""
        real_at = lambda idx: split.lengths[idx] + len(at.prefix) + len(at.suffix)
        loss = primers.loss_of(task, at, primer, layers=layers)
        return measure(name, lambda idx: training.train_step([primer], optimizer, loss, idx), train_batches, real_at,
                       lambda idx: len(idx) * layouts.padded_width(int(real_at(idx).max())),
                       lambda idx: batch_flops(shape, real_at(idx), False, True), task, peak)

    every = (len(task.model.get_decoder().layers),)  # hidden states asked for: forward's full pass
    rows = [train_row("train", layout), train_row("train, full forward", layout, every)]
    compared = [] if cfg.GRADIENT_CHECKPOINTING else [p for p in ("system", "suffix") if p != cfg.PRIMER_POSITION]
    at = {p: bench_layout(task, p, cfg.PRIMER_LENGTH) for p in compared} | {cfg.PRIMER_POSITION: layout}
    rows += [train_row(f"train, primer position {p}", at[p]) for p in compared]  # the same batches
    if not cfg.GRADIENT_CHECKPOINTING:  # the suffix's reviews run once, then each later epoch's step reuses them
        keep_every(lambda idx: frozen.forward(task.model, *layouts.assemble(at["suffix"], split, idx), at["suffix"],
                                              primer.detach()), train_batches)
        rows.append(train_row("train, primer position suffix, reviews kept", at["suffix"]))
    rows += vector_rows(task, shape, train_batches, peak)
    if cfg.BASELINE:
        rows.append(measure("train, straightforward loop", naive_train, train_batches, real, to_longest,
                            lambda idx: batch_flops(shape, real(idx), True, True), task, peak))
    rows += score_rows(task, layout, primer.detach(), shape, score_batches, peak, cfg.BASELINE)
    print_table(rows)
    if cfg.INVARIANCE:
        print(batch_invariance(task, layout, primer.detach(), cfg.INVARIANCE))
    print_ratios(cfg, rows, task)


if __name__ == "__main__":
    cli.main(run, BENCH)
