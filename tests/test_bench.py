"""bench.py on the tiny model: the figures it prints are those of the batches it timed, by the FLOP formula of its
docstring. Timings are not checked (they vary); what they are divided into is: ratios of two figures of one row cancel
the seconds, and they must equal what the timed batches hold."""
import json
import os
import re

import numpy as np
import pytest
import torch

import bench
from conftest import run_script
from harness import cli, frozen, primers, synthetic, training

# MAX_TOKENS: lengths vary, not all cut to one
STEPS, WARMUP, BATCH, SCORE_BATCH, MAX_TOKENS, PRIMER = 2, 1, 4, 8, 256, 4
ARGS = [f"--steps={STEPS}", f"--warmup={WARMUP}", f"--batch_size={BATCH}", f"--score_batch_size={SCORE_BATCH}",
        f"--max_review_tokens={MAX_TOKENS}", f"--primer_length={PRIMER}"]
ROWS = ("train", "train, primer position suffix", "train, primer position suffix, reviews kept",
        "train, straightforward loop", "score", "score, straightforward loop", "probe features, every layer",
        "train, learned vector, full forward", "train, learned vector, layers below kept", "train, full forward",
        "score, full forward")
NUMBER = r"[\d.e+-]+"


@pytest.fixture(scope="module")
def printed(tiny) -> str:
    result = run_script("bench.py", "--random_init=True", f"--model_id={tiny.model_dir}", "--device=cpu", *ARGS,
                        "--invariance=16")
    assert result.returncode == 0, result.stderr
    return result.stdout


def table(out: str) -> dict[str, dict[str, str]]:
    """The printed table's rows by run name, each a dict of column name to cell (new columns do not break it)."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return {r["Run"]: r for r in rows}


def bounds(cell: str) -> tuple[float, float]:
    """Where a printed figure's unrounded value lies: the figure, give or take half the unit of its last digit (a
    %g figure that dropped trailing zeros gets a wider interval than its rounding, never a narrower one)."""
    text = re.match(NUMBER, cell.replace(",", "")).group()
    mantissa, _, exponent = text.lower().partition("e")
    half = 0.5 * 10.0 ** (int(exponent or 0) - len(mantissa.partition(".")[2]))
    return float(text) - half, float(text) + half


def quotient(top: tuple[float, float], bottom: tuple[float, float], scale: float = 1.0) -> tuple[float, float]:
    """Where scale * top / bottom lies, for positive figures in those intervals."""
    return scale * top[0] / bottom[1], scale * top[1] / bottom[0]


def meet(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two intervals share a value (to float noise): a printed figure could be the one computed from others."""
    slack = 1e-9 * max(map(abs, a + b))
    return a[0] <= b[1] + slack and b[0] <= a[1] + slack


def llama_flops(conf: dict, real: torch.Tensor, head_positions: torch.Tensor, training_: bool) -> float:
    """bench.py's docstring formula, written out from config.json: N counts each Llama weight outside the embedding
    table and LM head (q, k, v, o, gate/up/down, the norms)."""
    d, layers, heads, kv, hd = (conf[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "head_dim"))
    n = layers * (d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * conf["intermediate_size"] + 2 * d) + d
    real = real.double()
    dense = 2 * n * real + 2 * d * conf["vocab_size"] * head_positions
    attention = 2 * layers * heads * hd * real ** 2
    return float((dense * (2 if training_ else 1) + attention * (3 if training_ else 1)).sum())


def expected_rows(conf: dict) -> dict[str, dict]:
    """What each row timed: the batches after the warm-up ones, their real and padded tokens and useful FLOPs."""
    split = synthetic.split(bench.SYNTHETIC_REVIEWS, conf["vocab_size"], MAX_TOKENS, 0)
    fixed = sum(synthetic.LLAMA3_TEMPLATE) + PRIMER  # the template's tokens and the primer, at either position
    longest = int(split.lengths.max()) + fixed
    train = training.length_grouped_batches(split.lengths, BATCH, 0)[WARMUP:WARMUP + STEPS]
    sample = torch.from_numpy(np.random.default_rng(0).permutation(len(split))[:(WARMUP + STEPS) * SCORE_BATCH])
    score = list(sample[split.lengths[sample].argsort(descending=True)].split(SCORE_BATCH))[WARMUP:]

    def row(batches, naive: bool, training_: bool, primer: bool = True) -> dict:
        real = [split.lengths[idx] + fixed - (0 if primer else PRIMER) for idx in batches]
        padded = sum(len(r) * (longest if naive else int(r.max())) for r in real)
        flops = sum(llama_flops(conf, r, r if naive else torch.ones_like(r), training_) for r in real)
        samples = sum(len(r) for r in real)
        return {"tokens per sample": sum(int(r.sum()) for r in real) / samples, "flops per sample": flops / samples,
                "padding": 1 - sum(int(r.sum()) for r in real) / padded}
    return {"train": row(train, False, True), "train, primer position suffix": row(train, False, True),
            "train, primer position suffix, reviews kept": row(train, False, True),
            "train, straightforward loop": row(train, True, True), "score": row(score, False, False),
            "score, straightforward loop": row(score, True, False),
            "probe features, every layer": row(score, False, False),
            "train, learned vector, full forward": row(train, False, True, primer=False),
            "train, learned vector, layers below kept": row(train, False, True, primer=False),
            "train, full forward": row(train, False, True), "score, full forward": row(score, False, False)}


# catches: warm-up batches counted but not timed (or the reverse), padding counted as work, the LM head's positions
# or the backward's factors wrong in the FLOPs, the suffix row timed on other batches, a utilization over another peak
def test_bench_figures_are_those_of_the_batches_it_timed(printed, tiny):
    out = printed
    assert "random weights" in out and "synthetic Yelp-length reviews" in out
    peak = bounds(re.search(rf"dense torch.float32 matmul: ({NUMBER}) TFLOP/s", out).group(1))
    with open(os.path.join(tiny.model_dir, "config.json")) as f:
        conf = json.load(f)
    rows, expected = table(out), expected_rows(conf)
    assert set(ROWS) <= set(rows)
    for name in ROWS:
        got, want = rows[name], expected[name]
        samples_s, tokens_s, tflops = (bounds(got[k]) for k in ("Samples/s", "Real tokens/s", "TFLOP/s"))
        # every figure is printed rounded: a ratio of two of them holds within the bounds their rounding leaves
        assert meet(quotient(tokens_s, samples_s), (want["tokens per sample"],) * 2), name
        assert meet(quotient(tflops, samples_s, 1e12), (want["flops per sample"],) * 2), name
        assert meet(bounds(got["Padding"]), (100 * want["padding"],) * 2), name
        assert meet(bounds(got["MFU"]), quotient(tflops, peak, 100)), name
    assert expected["score"]["padding"] > 0.01 and expected["train"]["tokens per sample"] < MAX_TOKENS  # lengths vary

    def speed_up(line: str) -> tuple[float, float]:
        return bounds(re.search(rf"^{re.escape(line)}: ([\d.]+)x", out, re.MULTILINE).group(1))
    sps = {name: bounds(rows[name]["Samples/s"]) for name in ROWS}
    for what in ("train", "score"):  # the speed-ups are those of the table's rows, not inverted or of other rows
        assert meet(speed_up(what), quotient(sps[what], sps[f"{what}, straightforward loop"]))
    assert meet(speed_up("train, primer position suffix"), quotient(sps["train, primer position suffix"], sps["train"]))
    kept = re.search(r"^train, primer position suffix: .* epoch, ([\d.]+)x once its reviews are kept$", out, re.M)
    assert meet(bounds(kept.group(1)), quotient(sps["train, primer position suffix, reviews kept"], sps["train"]))
    once = re.search(r"^what forward runs once .* against its full pass: train ([\d.]+)x, score ([\d.]+)x$", out, re.M)
    for n, what in enumerate(("train", "score"), 1):
        assert meet(bounds(once.group(n)), quotient(sps[what], sps[f"{what}, full forward"]))
    assert meet(speed_up("train, learned vector"), quotient(sps["train, learned vector, layers below kept"],
                                                            sps["train, learned vector, full forward"]))
    projected = re.search(r"^reference run \(290,000 training samples, 38,000 test reviews\) projected: ([\d,.]+) "
                          r"minutes", out, re.MULTILINE)
    slowest, fastest = zip(sps["train"], sps["score"])
    minutes = tuple((290000 / train + 38000 / score) / 60 for train, score in (fastest, slowest))
    assert meet(bounds(projected.group(1)), minutes)
    shapes = re.search(r"^attention: (\w+) \(cuDNN off on CUDA\), batches padded to a multiple of 1; distinct padded "
                       r"shapes: train (\d) in 2 batches, score (\d) in 2 batches; a training epoch meets about "
                       r"(\d+) padded lengths in 5,000 batches$", out, re.M)
    assert shapes and shapes.group(1) in ("FLASH_ATTENTION", "MATH") and 1 <= int(shapes.group(2)) <= 2, out
    assert 10 < int(shapes.group(4)) <= MAX_TOKENS  # lengths vary in a fixed template: a new length nearly every batch
    moved = re.search(r"^batch size 1 vs 8: 0 of 16 answers over the vocabulary and 0 between the labels change; "
                      rf"logits move by at most ({NUMBER}) ", out, re.MULTILINE)
    assert moved and float(moved.group(1)) < 1e-5


def positions_with_gradient(model: torch.nn.Module, run) -> int:
    """Batch rows times positions that the first decoder layer runs with autograd recording, during run()."""
    counted = []

    def hook(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_grad_enabled():
            counted.append(hidden.shape[0] * hidden.shape[1])
    handle = model.get_decoder().layers[0].register_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return sum(counted)


# catches: the suffix row running the whole prompt with gradients (the cache built under autograd, or the full
# forward taken instead of the cached one), which would leave its speed-up a timing accident
def test_the_suffix_row_runs_only_the_suffix_with_gradients(tiny):
    cfg = cli.configure(["--random_init=True", f"--model_id={tiny.model_dir}", "--device=cpu", *ARGS], bench.BENCH)
    task, _ = bench.bench_task(cfg)
    idx = training.length_grouped_batches(task.train.lengths, BATCH, 0)[0]
    primer = primers.init_primer(task.model, PRIMER, 0).requires_grad_(True)
    layouts = {position: bench.bench_layout(task, position, PRIMER) for position in ("system", "suffix")}
    counts = {position: positions_with_gradient(
                  task.model, lambda at=at: primers.loss_of(task, at, primer)(idx, len(idx)).backward())
              for position, at in layouts.items()}
    assert counts["suffix"] == len(idx) * len(layouts["suffix"].suffix)  # the primer and the answer cue alone
    system = layouts["system"]
    # the prefix once for the batch, then each row's review and answer cue
    assert counts["system"] == len(system.prefix) + len(idx) * (int(task.train.lengths[idx].max()) + len(system.suffix))
    assert counts["suffix"] * 5 < counts["system"]


# catches: frozen work done again after the first step: the layers below a steered one, or a suffix primer's review
# (a later step's forward should start at what the first one kept), which would leave the kept rows' speed-up a
# timing accident
def test_the_frozen_part_of_a_step_runs_once_per_review(tiny):
    cfg = cli.configure(["--random_init=True", f"--model_id={tiny.model_dir}", "--device=cpu", *ARGS], bench.BENCH)
    task, _ = bench.bench_task(cfg)
    idx = training.length_grouped_batches(task.train.lengths, BATCH, 0)[0]
    reviews = task.train.lengths[idx].tolist()
    count = len(task.model.get_decoder().layers)
    steer = frozen.Steer(torch.zeros(task.model.config.hidden_size, requires_grad=True), (count,))
    plain, suffix = bench.bench_layout(task, "system", 0), bench.bench_layout(task, "suffix", PRIMER)
    primer = primers.init_primer(task.model, PRIMER, 0).requires_grad_(True)
    # (gradients on, rows x positions) of each run of the first decoder layer over two steps
    want = {"steer": sorted((False, len(plain.prefix) + n + len(plain.suffix)) for n in reviews),  # each row, once
            "suffix": sorted([(False, len(suffix.prefix) + n) for n in reviews]  # each review, once
                             + [(True, len(idx) * len(suffix.suffix))] * 2)}  # the suffix block, at every step
    for name, loss_of in (("steer", primers.loss_of(task, plain, steer=steer)),
                          ("suffix", primers.loss_of(task, suffix, primer))):
        calls = []
        handle = task.model.get_decoder().layers[0].register_forward_hook(
            lambda module, inputs, output: calls.append((torch.is_grad_enabled(), output.shape[0] * output.shape[1])))
        try:
            for _ in range(2):
                loss_of(idx, len(idx)).backward()
        finally:
            handle.remove()
        assert sorted(calls) == want[name], name
    assert steer.vector.grad.abs().sum() > 0 and primer.grad.abs().sum() > 0
