"""Steering vectors: a vector added to the frozen model's residual stream after one decoder layer, instead of a prompt.

    python steer.py                                      # "mean": what the short prompt does to the residual stream
    python steer.py --vector=pair "--pair=['Love', 'Hate']"    # ActAdd: one contrast pair of system messages
    python steer.py --vector=learned --learned_layer=8   # one vector trained by Adam, like a one-token primer
    python steer.py --vector_path=results/<run id>/steering.safetensors      # score a saved vector, no sweep
    python steer.py --generate=True --judge_path=results/<run id>/primer.safetensors   # steer what the model writes

The review is in the user turn with no prompt; the vector is added after layer L at every position (or, with
--after_review=True, only after the review) with coefficient c. "pair" and "mean" vectors are swept over
STEER_LAYERS x COEFFICIENTS on VAL_LIMIT validation reviews held out of training, scaled so that c is a multiple of the
mean residual norm at L; the best is scored once on the test split. A "learned" vector trains at one layer through
the shared loop (checkpoints, --resume, validation after each epoch) and is added as trained (c = 1). Every residual
norm and "mean" vector is measured over the first VECTOR_REVIEWS training reviews (harness/steering.py). With
--generate=True the script samples what the steered model writes instead (harness/generation.py).
"""
import os
import time

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from harness import (
    cli,
    errors,
    files,
    generation,
    parallel,
    plots,
    primers,
    prompts,
    rategrid,
    rundir,
    runs,
    scoring,
    steering,
    training,
)
from harness.frozen import Steer
from harness.layouts import Layout, make_layout
from harness.task import Task

VECTOR = "mean"  # the vector's source: "pair" (ActAdd), "mean" (prompted minus unprompted states), "learned" (Adam)
PAIR = [prompts.text_prompt("short")[0], ""]  # "pair": two system messages; the vector: the first's minus the second's
PROMPT = "short"  # "mean": the prompt the vector stands in for: "short", "long" or "text:<words>" (a system message)
VECTOR_REVIEWS = 200  # training reviews that "mean" averages over and that measure each layer's residual norm
STEER_LAYERS = []  # decoder layers (1-based) swept by "pair" and "mean"; []: every other layer, the last included
COEFFICIENTS = [0.0, 0.25, 0.5, 1.0, 2.0]  # swept: the added vector's norm in mean residual norms at its layer
LEARNED_LAYER = 0  # "learned": the decoder layer (1-based) it trains at; 0: the middle one
AFTER_REVIEW = False  # add the vector only at the positions after the review (the answer cue), not at every position
VAL_LIMIT = 200  # (config.py has 0) reviews held out of training, on which layer and coefficient are chosen
VECTOR_PATH = None  # a saved steering.safetensors: score it on the test split, no sweep and no training
GENERATE = False  # steer what the model writes instead: answers to GENERATE_PROMPTS at each GENERATE_COEFFICIENTS
GENERATE_PROMPTS = ["Write a short review of a restaurant.", "Tell me about a meal you had at a cafe.",
                    "Describe your last visit to a pizza place."]  # user messages the model answers
PROMPTS_FILE = None  # a text file of user messages, one per line, instead of GENERATE_PROMPTS
SENTIMENT = "pair"  # the sentiment vector: "pair" (SENTIMENT_PAIR) or "reviews" (positive minus negative reviews)
SENTIMENT_PAIR = ["Love", "Hate"]  # "pair": ActAdd's contrast pair for generation
GENERATE_LAYER = 0  # the decoder layer (1-based) the sentiment vector is added after; 0: the middle one
GENERATE_COEFFICIENTS = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]  # multiples of the mean residual norm at that layer
SAMPLES = 4  # answers sampled per prompt and coefficient
MAX_NEW_TOKENS = 48  # tokens sampled per answer
TEMPERATURE = 0.8  # sampling temperature
JUDGE_PATH = None  # judges each answer as a review: a run's primer.safetensors or probe.safetensors (probe.py)
SETTINGS = cli.own_settings(dict(globals()))  # the constants above, as --name=value settings
VECTORS = ("pair", "mean", "learned")


def check(cfg) -> None:
    """One-line errors for settings that cannot work, before the model loads."""
    if cfg.VECTOR not in VECTORS:
        raise errors.UserError(f"--vector={cfg.VECTOR!r} is not one of {', '.join(VECTORS)}")
    if len(cfg.PAIR) != 2 or not all(isinstance(text, str) for text in cfg.PAIR) or cfg.PAIR[0] == cfg.PAIR[1]:
        raise errors.UserError(f"--pair={cfg.PAIR!r} must be two different texts, e.g. --pair=\"['Love', 'Hate']\"")
    if cfg.PROMPT not in ("short", "long") and not cfg.PROMPT.startswith("text:"):
        raise errors.UserError(f"--prompt={cfg.PROMPT!r} is not one of short, long, text:<words>")
    if not cfg.VAL_LIMIT and not cfg.VECTOR_PATH:
        raise errors.UserError("layer and coefficient are chosen on validation reviews: set --val_limit (e.g. 200)")
    if cfg.VECTOR_PATH and not os.path.isfile(cfg.VECTOR_PATH):
        raise errors.UserError(f"--vector_path={cfg.VECTOR_PATH} does not exist: give the steering.safetensors of a "
                               f"steer.py run")
    if cfg.VECTOR_REVIEWS < 1:
        raise errors.UserError(f"--vector_reviews={cfg.VECTOR_REVIEWS} must be at least 1")


def generation_of(cfg) -> generation.Generation:
    """--generate's settings, checked."""
    return generation.Generation(cfg.JUDGE_PATH, cfg.SENTIMENT, cfg.SENTIMENT_PAIR, cfg.GENERATE_LAYER,
                                 cfg.GENERATE_COEFFICIENTS, cfg.GENERATE_PROMPTS, cfg.PROMPTS_FILE, cfg.SAMPLES,
                                 cfg.MAX_NEW_TOKENS, cfg.TEMPERATURE, cfg.VECTOR_REVIEWS)


def vector_review_count(cfg, train_reviews: int) -> int:
    """VECTOR_REVIEWS, or all the training reviews where it is the default and the split has fewer."""
    if cfg.VECTOR_REVIEWS == VECTOR_REVIEWS > train_reviews:
        print(f"--vector_reviews: all {train_reviews} training reviews (the default, {VECTOR_REVIEWS}, is more than "
              f"the split has)")
        return train_reviews
    return cfg.VECTOR_REVIEWS


def sweep_layers(cfg, count: int) -> tuple[int, ...]:
    layers = tuple(cfg.STEER_LAYERS or range(count % 2 or 2, count + 1, 2))
    if not all(1 <= layer <= count for layer in layers):
        raise errors.UserError(f"--steer_layers={cfg.STEER_LAYERS} must be decoder layers 1 to {count} of this model")
    return layers


def directions(task: Task, layers: tuple[int, ...], reviews: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit steering directions [len(layers), hidden] of VECTOR ("pair" or "mean"), and the mean residual norm at
    each layer [len(layers)] (steering.residual), both over the first `reviews` training reviews."""
    cfg = task.cfg
    unprompted, norm = steering.residual(task, layers, reviews)
    if cfg.VECTOR == "mean":
        prompt = prompts.layout_of(task, cfg.PROMPT)[0]
        prompted = steering.last_states(task, prompt, steering.vector_reviews(task, reviews), layers)
        difference = (prompted - unprompted).mean(1)
    else:
        difference = steering.pair_difference(task, cfg.PAIR, layers)
    return difference / difference.norm(dim=-1, keepdim=True), norm


def sweep(task: Task, plain: Layout, layers: tuple[int, ...], unit: torch.Tensor,
          norm: torch.Tensor) -> tuple[pd.DataFrame, dict]:
    """Validation scores of every layer and coefficient (coefficient 0, no steering, scored once), and the Steer
    of each (layer, coefficient)."""
    rows, steers, unsteered = [], {}, None
    for i, layer in enumerate(layers):
        for c in task.cfg.COEFFICIENTS:
            steers[layer, c] = Steer(unit[i] * norm[i], (layer,), c, task.cfg.AFTER_REVIEW)
            if c == 0 and unsteered is not None:
                found = unsteered
            else:
                found = scoring.score(task, plain, None, task.val, steers[layer, c])
                unsteered = found if c == 0 else unsteered
            rows.append({"layer": layer, "coefficient": c, "residual_norm": float(norm[i]),
                         **validation_columns(found)})
            print(f"layer {layer:>3}  x{c:<5g} validation {found['score']:.1%} "
                  f"(label-restricted {found['restricted_score']:.1%})", flush=True)
    return pd.DataFrame(rows), steers


def validation_columns(found: dict) -> dict:
    keys = ("correct", "total", "score", "score_low", "score_high", "restricted_correct", "restricted_score")
    return {"val_" + k: found[k] for k in keys}


def learned(task: Task, plain: Layout, run_dir: str, reviews: int) -> tuple[pd.DataFrame, dict, list[dict], str]:
    """A vector trained at LEARNED_LAYER on the label token's cross-entropy, in units of one residual coordinate's
    RMS at that layer over the first `reviews` training reviews (RATE_SCALE "embedding") like a primer's rates; its
    validation row, steer, loss log and status."""
    cfg, layer = task.cfg, steering.decoder_layer(task, task.cfg.LEARNED_LAYER, "--learned_layer")
    norm = float(steering.residual(task, (layer,), reviews)[1][0])
    vector = torch.zeros(task.model.get_input_embeddings().weight.shape[1], device=task.device)
    steer = Steer(vector, (layer,), 1.0, cfg.AFTER_REVIEW)
    unit = norm / vector.numel() ** 0.5 if cfg.RATE_SCALE == "embedding" else 1.0
    evaluate = lambda: scoring.score(task, plain, None, task.val, steer)
    log, status, _ = rategrid.train_grid(task, {"vector": vector}, primers.loss_of(task, plain, steer=steer), run_dir,
                                         training.Schedule.of(cfg, unit), cfg.RATE_GRID, evaluate,
                                         f"learned steering vector (layer {layer})", "steer.py", unit,
                                         rategrid.transfer_of(cfg))
    vector.requires_grad_(False)
    row = {"layer": layer, "coefficient": 1.0, "residual_norm": norm, **validation_columns(evaluate())}
    return pd.DataFrame([row]), {(layer, 1.0): steer}, log, status


@parallel.main_writes
def save_steer(run_dir: str, steer: Steer, model_id: str, source: str) -> None:
    with files.atomic_path(os.path.join(run_dir, "steering.safetensors")) as tmp:
        save_file({"vector": (steer.coefficient * steer.vector).detach().float().cpu().contiguous()}, tmp,
                  metadata={"layer": str(steer.layers[0]), "after_review": str(steer.after_review),
                            "model_id": model_id, "source": source})


def load_steer(path: str, width: int) -> tuple[Steer, str]:
    """A saved steering vector, checked against the model's width, and its source."""
    try:
        with safe_open(path, "pt") as f:
            vector, meta = f.get_tensor("vector"), f.metadata()
        steer = Steer(vector, (int(meta["layer"]),), 1.0, meta["after_review"] == "True")
    except Exception as e:  # not safetensors, or not a steering file
        raise errors.UserError(f"--vector_path={path} is not a steering vector ({type(e).__name__}): give the "
                               f"steering.safetensors of a steer.py run") from e
    if vector.shape != (width,):
        raise errors.UserError(f"--vector_path={path} holds a vector of shape {tuple(vector.shape)}, but this model is "
                               f"{width} wide: use a vector made for --model_id")
    return steer, meta["source"]


def describe(source: str, steer: Steer, saved: bool = False) -> str:
    where = "after the review" if steer.after_review else "every position"
    scale = "" if saved or source == "learned" else f", x{steer.coefficient:g} residual norm"
    return f"{'saved ' if saved else ''}steering vector ({source}, layer {steer.layers[0]}{scale}, {where})"


def run(cfg) -> None:
    check(cfg)
    if cfg.GENERATE:
        return generation.generate(cfg, generation_of(cfg))
    task = runs.setup(cfg, with_train=not cfg.VECTOR_PATH)
    plain = make_layout(task, None)
    if cfg.VECTOR_PATH:
        steer, source = load_steer(cfg.VECTOR_PATH, task.model.get_input_embeddings().weight.shape[1])
        steer.vector = steer.vector.to(task.device)
        runs.record(task, "steer", describe(source, steer, saved=True), 0, scoring.predict(task, plain, steer=steer))
        return
    reviews = vector_review_count(cfg, len(task.train))
    run_dir = rundir.new_or_resumed(cfg, "steer", fitted={"VECTOR_REVIEWS": reviews})
    source = f"mean of {cfg.PROMPT}" if cfg.VECTOR == "mean" else "pair" if cfg.VECTOR == "pair" else "learned"
    log, status, start, cpu = None, "finished", time.perf_counter(), time.process_time()
    if cfg.VECTOR == "learned":
        table, steers, log, status = learned(task, plain, run_dir, reviews)
    else:
        layers = sweep_layers(cfg, len(task.model.get_decoder().layers))
        unit, norm = directions(task, layers, reviews)
        table, steers = sweep(task, plain, layers, unit, norm)
    best = training.best_validation(table.to_dict("records"), prefix="val_")
    steer = steers[int(best["layer"]), float(best["coefficient"])]
    files.write_atomic(os.path.join(run_dir, "steer_sweep.csv"), table.to_csv(index=False))
    print(table.to_string(index=False, float_format="{:.3f}".format))
    print(f"chosen on validation: layer {int(best['layer'])}, coefficient {best['coefficient']:g} "
          f"({best['val_score']:.1%})")
    plots.steer_heatmap(table, os.path.join(run_dir, "steer_sweep.png"))
    save_steer(run_dir, steer, cfg.MODEL_ID, source)
    trainable, samples = (steer.vector.numel(), len(task.train)) if log is not None else (0, reviews)
    runs.record(task, "steer", describe(source, steer), 0, scoring.predict(task, plain, steer=steer), run_dir, log,
                trainable, status, samples=samples, train_seconds=time.perf_counter() - start,
                train_cpu_seconds=None if log is not None else time.process_time() - cpu)  # learned: its loss logs'


if __name__ == "__main__":
    cli.main(run, SETTINGS)
