"""steer.py --generate: what a steered model writes. Answers to user messages sampled at each coefficient of a
sentiment vector and for text prompts asking for a positive or a negative answer, each judged as a review by a saved
classifier (a primer or a probe), with its fluency; steer.py gives the settings, as a Generation."""
import csv
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from harness import activations, chat, data, errors, files, plots, primers, rundir, runs, scoring, steering
from harness.frozen import Steer
from harness.layouts import make_layout
from harness.task import Task

SENTIMENTS = ("pair", "reviews")  # the values Generation.sentiment may take


@dataclass(frozen=True)
class Generation:
    """What --generate samples, steered how, and what judges it: steer.py's settings of the same names (upper case),
    checked here when made, before the model loads."""
    judge_path: Optional[str]  # a primer.safetensors or probe.safetensors
    sentiment: str  # one of SENTIMENTS
    sentiment_pair: list[str]
    layer: int  # 1-based; 0: the middle one
    coefficients: list[float]
    prompts: list[str]  # the user messages, unless prompts_file gives them
    prompts_file: Optional[str]
    samples: int
    max_new_tokens: int
    temperature: float
    vector_reviews: int  # training reviews the "reviews" vector and the residual norm are measured over

    def __post_init__(self) -> None:
        if not self.judge_path:
            raise errors.UserError("--generate=True judges each answer with a trained classifier: set --judge_path to "
                                   "a run's primer.safetensors or probe.safetensors")
        if self.sentiment not in SENTIMENTS:
            raise errors.UserError(f"--sentiment={self.sentiment!r} is not one of {', '.join(SENTIMENTS)}")
        if self.prompts_file and not os.path.isfile(self.prompts_file):
            raise errors.UserError(f"--prompts_file={self.prompts_file} does not exist: give a text file, one user "
                                   f"message per line")

    def messages(self) -> list[str]:
        if not self.prompts_file:
            return self.prompts
        with open(self.prompts_file, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]


def _sentiment_steer(task: Task, settings: Generation, layer: int) -> Steer:
    """The sentiment direction at layer, scaled to the mean residual norm there (steering.residual)."""
    if settings.sentiment == "pair":
        difference = steering.pair_difference(task, settings.sentiment_pair, (layer,))[0]
    else:
        reviews = steering.vector_reviews(task, settings.vector_reviews)
        pooled = activations.extract(task, make_layout(task, None), reviews, (layer,), ("mean",),
                                     desc="activations")["mean"][0]
        difference = pooled[reviews.labels == 1].mean(0) - pooled[reviews.labels == 0].mean(0)
    norm = steering.residual(task, (layer,), settings.vector_reviews)[1][0]
    return Steer(difference / difference.norm() * norm, (layer,))


def _sample(task: Task, settings: Generation, messages: list[str],
            steer: Optional[Steer]) -> tuple[list[str], torch.Tensor]:
    """settings.samples answers to each user message, steered, and each answer's mean token log-probability under
    the unsteered model (a fluency proxy). Seeded by SEED alone, so every coefficient draws the same random numbers."""
    answers = chat.sample(task.model, task.tokenizer, [m for m in messages for _ in range(settings.samples)],
                          task.cfg.TEMPLATE_KWARGS, settings.max_new_tokens, settings.temperature, task.cfg.SEED, steer)
    return answers.texts, chat.mean_logprob(task.model, answers)


def _judge_texts(task: Task, texts: list[str], path: str, position: str) -> torch.Tensor:
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


def _rows_of(steering_name: str, coefficient: float, texts: list[str], fluency: torch.Tensor) -> list[dict]:
    return [{"steering": steering_name, "coefficient": coefficient, "text": t, "fluency": float(f)}
            for t, f in zip(texts, fluency)]


def generate(cfg: SimpleNamespace, settings: Generation) -> None:
    """Sampled answers at each of the settings' coefficients of the sentiment vector and for text prompts asking for
    a positive or a negative answer, judged; the share judged positive and the fluency per coefficient, printed and
    drawn, in a new run folder (cfg: the run's config, for the task and the folder)."""
    messages = settings.messages()
    task = runs.setup(cfg)
    layer = steering.decoder_layer(task, settings.layer, "--generate_layer")
    direction, rows = _sentiment_steer(task, settings, layer), []
    run_dir = rundir.new(cfg, "steer")
    for c in settings.coefficients:
        steer = Steer(direction.vector, (layer,), c)
        rows += _rows_of(f"vector at layer {layer}", c, *_sample(task, settings, messages, steer))
    for tone in ("positive", "negative"):
        toned = [f"{m} Make it {tone}." for m in messages]
        rows += _rows_of(f"prompt: make it {tone}", float("nan"), *_sample(task, settings, toned, None))
    table = pd.DataFrame(rows)
    asked = [m for m in messages for _ in range(settings.samples)]
    table["prompt"] = asked * (len(table) // len(asked))
    table["p_positive"] = _judge_texts(task, table["text"].tolist(), settings.judge_path, cfg.PRIMER_POSITION).numpy()
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
