"""steer.py --generate: what a steered model writes. Answers to user messages sampled at each coefficient of a
sentiment vector and for text prompts asking for a positive or a negative answer, each judged as a review by a saved
classifier (a primer or a probe), with its fluency; the settings are steer.py's."""
import csv
import os
from types import SimpleNamespace
from typing import Optional

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from harness import activations, chat, data, errors, files, plots, primers, runs, scoring, steering
from harness.frozen import Steer
from harness.layouts import make_layout
from harness.task import Task

SENTIMENTS = ("pair", "reviews")  # the values SENTIMENT may take


def check(cfg: SimpleNamespace) -> None:
    """One-line errors for generation settings that cannot work, before the model loads."""
    if not cfg.JUDGE_PATH:
        raise errors.UserError("--generate=True judges each answer with a trained classifier: set --judge_path to a "
                               "run's primer.safetensors or probe.safetensors")
    if cfg.SENTIMENT not in SENTIMENTS:
        raise errors.UserError(f"--sentiment={cfg.SENTIMENT!r} is not one of {', '.join(SENTIMENTS)}")
    if cfg.PROMPTS_FILE and not os.path.isfile(cfg.PROMPTS_FILE):
        raise errors.UserError(f"--prompts_file={cfg.PROMPTS_FILE} does not exist: give a text file, one user "
                               f"message per line")


def user_messages(cfg: SimpleNamespace) -> list[str]:
    if not cfg.PROMPTS_FILE:
        return cfg.GENERATE_PROMPTS
    with open(cfg.PROMPTS_FILE, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def sentiment_steer(task: Task, layer: int) -> Steer:
    """SENTIMENT's direction at layer, scaled to the mean residual norm there (steering.residual)."""
    cfg = task.cfg
    if cfg.SENTIMENT == "pair":
        difference = steering.pair_difference(task, cfg.SENTIMENT_PAIR, (layer,))[0]
    else:
        reviews = steering.vector_reviews(task)
        pooled = activations.extract(task, make_layout(task, None), reviews, (layer,), ("mean",),
                                     desc="activations")["mean"][0]
        difference = pooled[reviews.labels == 1].mean(0) - pooled[reviews.labels == 0].mean(0)
    norm = steering.residual(task, (layer,))[1][0]
    return Steer(difference / difference.norm() * norm, (layer,))


def sample(task: Task, messages: list[str], steer: Optional[Steer]) -> tuple[list[str], torch.Tensor]:
    """SAMPLES answers to each user message, steered, and each answer's mean token log-probability under the
    unsteered model (a fluency proxy). Seeded by SEED alone, so every coefficient draws the same random numbers."""
    cfg = task.cfg
    answers = chat.sample(task.model, task.tokenizer, [m for m in messages for _ in range(cfg.SAMPLES)],
                          cfg.TEMPLATE_KWARGS, cfg.MAX_NEW_TOKENS, cfg.TEMPERATURE, cfg.SEED, steer)
    return answers.texts, chat.mean_logprob(task.model, answers)


def judge_texts(task: Task, texts: list[str], path: str, position: str) -> torch.Tensor:
    """Each free text's probability of being positive, read as a review alone in the user turn: between the two
    labels under the primer saved at path (trained at `position`), or by the linear probe of probe.py saved there."""
    tokens, offsets, _ = data.tokenize(task.tokenizer, texts, task.cfg.MAX_REVIEW_TOKENS)
    split = data.Split(tokens, offsets, torch.zeros(len(texts), dtype=torch.long), {})
    with safe_open(path, "pt") as f:
        probe = "weight" in f.keys() and f.metadata()
    if probe:
        if probe.get("condition") != "none":  # the answers are judged as reviews alone in the user turn
            raise errors.UserError(f"--judge_path={path} is a probe of condition {probe.get('condition')}: give the "
                                   f"probe.safetensors of a probe.py run with --condition=none")
        tensors = load_file(path)
        layer, pooling = int(probe["layer"]), probe["pooling"]
        features = activations.extract(task, make_layout(task, None), split, (layer,), (pooling,), desc="judge")
        return torch.sigmoid(features[pooling][0] @ tensors["weight"] + tensors["bias"])
    primer = primers.load_primer(path, task.model, position)
    layout = make_layout(task, None, primer_length=len(primer), position=position)
    logprobs = scoring.predict(task, layout, primer, split)["logprobs"]
    return (logprobs[:, 1] - logprobs.logsumexp(-1)).exp()


def rows_of(steering_name: str, coefficient: float, texts: list[str], fluency: torch.Tensor) -> list[dict]:
    return [{"steering": steering_name, "coefficient": coefficient, "text": t, "fluency": float(f)}
            for t, f in zip(texts, fluency)]


def generate(cfg: SimpleNamespace) -> None:
    """Sampled answers at each GENERATE_COEFFICIENTS of the sentiment vector and for text prompts asking for a
    positive or a negative answer, judged; the share judged positive and the fluency per coefficient, printed and
    drawn, in a new run folder."""
    check(cfg)
    messages = user_messages(cfg)
    task = runs.setup(cfg)
    layer = steering.decoder_layer(task, "GENERATE_LAYER")
    direction, rows = sentiment_steer(task, layer), []
    run_dir = runs.new_run_dir(cfg, "steer")
    for c in cfg.GENERATE_COEFFICIENTS:
        rows += rows_of(f"vector at layer {layer}", c, *sample(task, messages, Steer(direction.vector, (layer,), c)))
    for tone in ("positive", "negative"):
        toned = [f"{m} Make it {tone}." for m in messages]
        rows += rows_of(f"prompt: make it {tone}", float("nan"), *sample(task, toned, None))
    table = pd.DataFrame(rows)
    table["prompt"] = [m for m in messages for _ in range(cfg.SAMPLES)] * (len(table) // (len(messages) * cfg.SAMPLES))
    table["p_positive"] = judge_texts(task, table["text"].tolist(), cfg.JUDGE_PATH, cfg.PRIMER_POSITION).numpy()
    generations = table.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)  # quoted, so that a \r in a text reads back
    files.write_atomic(os.path.join(run_dir, "generations.csv"), generations)
    summary = table.groupby(["steering", "coefficient"], sort=False, dropna=False).agg(
        answers=("text", "size"), judged_positive=("p_positive", lambda p: int((p > 0.5).sum())),
        fluency=("fluency", "mean")).reset_index()
    summary["share_positive"] = summary["judged_positive"] / summary["answers"]
    files.write_atomic(os.path.join(run_dir, "generation_summary.csv"), summary.to_csv(index=False))
    print(summary.to_string(index=False, float_format="{:.3f}".format))
    print(f"saved {run_dir}: generations.csv (every answer, its judgement and fluency) and "
          f"{plots.generation_curve(summary, run_dir)}")
