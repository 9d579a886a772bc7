"""How well can sentiment be read out of the frozen model's activations, layer by layer? Linear probes, and the ceiling
they set for every method that makes the model *say* the label.

    python probe.py                                   # the review alone: every layer, last position and mean-pooled
    python probe.py --condition=long                  # the review inside prompt_long.py's prompt ("short" likewise)
    python probe.py --condition=primer --primer_path=results/<run id>/primer.safetensors
    python probe.py --probe=mlp                       # one hidden layer instead of logistic regression

Features are one forward pass per review, kept in the run folder (features-train/val/test.safetensors) and reused by
any later run of the same model, layout and reviews. The layer, pooling and regularization are chosen on VAL_LIMIT
validation reviews held out of training; the test split is read once, at the chosen layer, to score that probe.
"""
import os
import time

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from harness import activations, cli, data, errors, files, parallel, plots, prompts, rundir, runs, scoring, training

CONDITION = "none"  # the prompt around the review: "none" (the review alone), "short", "long", "primer" (PRIMER_PATH)
POOLING = "both"  # "last" (hidden state where the answer is predicted), "mean" (over the review's tokens) or "both"
PROBE = "linear"  # "linear" (logistic regression) or "mlp" (one hidden layer of PROBE_HIDDEN units)
PROBE_TRAIN = 5600  # reviews the probes fit on: a seeded, label-balanced sample of those left after VAL_LIMIT (or all)
VAL_LIMIT = 1000  # (config.py: 0) held-out reviews choosing C, layer and pooling (a fifth of a split under 5,000)
PROBE_C = [1e-3, 1e-2, 1e-1, 1.0]  # inverse L2 strengths tried at each layer and pooling ("mlp": its alpha is 1/C)
PROBE_HIDDEN = 256  # hidden units of the "mlp" probe
SETTINGS = cli.own_settings(dict(globals()))  # the constants above, as --name=value settings


def check(cfg) -> None:
    """One-line errors for settings that cannot work, before the model loads."""
    prompts.check_name("condition", cfg.CONDITION, cfg.PRIMER_PATH)
    if cfg.POOLING not in ("last", "mean", "both"):
        raise errors.UserError(f"--pooling={cfg.POOLING!r} is not one of last, mean, both")
    if cfg.PROBE not in ("linear", "mlp"):
        raise errors.UserError(f"--probe={cfg.PROBE!r} is not one of linear, mlp")
    if not cfg.VAL_LIMIT:
        raise errors.UserError("a probe's layer and regularization are chosen on validation reviews: set --val_limit "
                               "(e.g. 1000)")
    if min(cfg.PROBE_C) <= 0 or cfg.PROBE_HIDDEN < 1:
        raise errors.UserError(f"--probe_c={cfg.PROBE_C} must all be positive and --probe_hidden={cfg.PROBE_HIDDEN} "
                               f"at least 1")


def fitted_sizes(cfg, reviews: int, extra: int = 0) -> tuple[int, int]:
    """VAL_LIMIT and PROBE_TRAIN fitted to a TRAIN_LIMIT sample of `reviews` (and `extra` reviews prep sampled past
    it, for TRAIN_REVIEWS) where they are this script's defaults and the split is too small for them (a fifth held
    out, the rest fit on); one error naming both when given values do not fit."""
    val, fit = cfg.VAL_LIMIT, cfg.PROBE_TRAIN
    if val == VAL_LIMIT and val > reviews // 5:
        val = max(2, reviews // 5)
    if not 0 < val <= reviews - 2:
        raise errors.UserError(f"--val_limit={val} must be between 1 and {reviews - 2:,}: validation reviews are held "
                               f"out of the {reviews:,} training reviews (--train_limit), and --probe_train (at least "
                               "2) of the rest are fit on: lower --val_limit or raise --train_limit")
    left = min(reviews - val + extra, cfg.TRAIN_REVIEWS or reviews - val + extra)  # what training_sets will leave
    if fit == PROBE_TRAIN and fit > left:
        fit = left
    if not 2 <= fit <= left:
        raise errors.UserError(f"--probe_train={fit} must be between 2 and the {left:,} training reviews left "
                               f"after --val_limit={val}: lower it or raise --train_limit")
    fitted = {name: (new, default) for name, new, old, default in (("val_limit", val, cfg.VAL_LIMIT, VAL_LIMIT),
                                                                    ("probe_train", fit, cfg.PROBE_TRAIN, PROBE_TRAIN))
              if new != old}
    if fitted:
        print(f"{reviews:,} training reviews: " + ", ".join(f"--{k}={new} (its default {default} does not fit)"
                                                             for k, (new, default) in fitted.items()), flush=True)
    return val, fit


def probe_sample(task, count: int) -> data.Split:
    """`count` of the training reviews left after the validation ones (seeded, label-balanced)."""
    train = task.train
    return train.subset(torch.from_numpy(data.balanced_sample(train.labels.numpy(), count, task.cfg.SEED)))


def make_probe(cfg, c: float):
    """A fresh probe of kind PROBE at inverse regularization strength c, on standardized features."""
    if cfg.PROBE == "linear":
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    return make_pipeline(StandardScaler(), MLPClassifier((cfg.PROBE_HIDDEN,), alpha=1 / c, max_iter=300,
                                                         early_stopping=False, random_state=cfg.SEED))


def probe_params(cfg, width: int) -> int:
    """Trainable parameters of one probe: a linear one's weights and bias, or the MLP's two layers (one output unit)."""
    return width + 1 if cfg.PROBE == "linear" else width * cfg.PROBE_HIDDEN + 2 * cfg.PROBE_HIDDEN + 1


def fit_layers(cfg, train: dict, val: dict, y_train: np.ndarray, y_val: np.ndarray,
               layers) -> tuple[pd.DataFrame, dict]:
    """Per layer and pooling, the best probe over PROBE_C by validation accuracy: the table of their validation
    scores, and the probes by (layer, pooling)."""
    rows, fitted = [], {}
    for pooling in train:
        for layer in layers:
            x, x_val = train[pooling][layer].numpy(), val[pooling][layer].numpy()
            tries = [(make_probe(cfg, c).fit(x, y_train), c) for c in cfg.PROBE_C]
            found = [{"correct": int((p.predict(x_val) == y_val).sum()), "c": c, "probe": p} for p, c in tries]
            best = training.best_validation(found)
            correct, c, probe = best["correct"], best["c"], best["probe"]
            low, high = scoring.wilson_interval(correct, len(y_val))
            rows.append({"condition": cfg.CONDITION, "probe": cfg.PROBE, "layer": layer, "pooling": pooling, "c": c,
                         "val_correct": correct, "val_total": len(y_val), "val_score": correct / len(y_val),
                         "val_low": low, "val_high": high})
            fitted[layer, pooling] = probe
            print(f"layer {layer:>3} {pooling:<4}  validation {correct / len(y_val):.1%}  (C={c:g})", flush=True)
    return pd.DataFrame(rows), fitted


@parallel.main_writes
def save_linear(run_dir: str, probe, cfg, layer: int, pooling: str) -> None:
    """The chosen linear probe as one direction in the model's activation space: logit = features @ weight + bias."""
    scaler, logistic = probe[0], probe[-1]
    weight = logistic.coef_[0] / scaler.scale_
    bias = logistic.intercept_[0] - float(weight @ scaler.mean_)
    with files.atomic_path(os.path.join(run_dir, "probe.safetensors")) as tmp:
        tensors = {"weight": torch.tensor(weight, dtype=torch.float32),
                   "bias": torch.tensor([bias], dtype=torch.float32)}
        save_file(tensors, tmp, metadata={"layer": str(layer), "pooling": pooling, "condition": cfg.CONDITION,
                                          "model_id": cfg.MODEL_ID})


def run(cfg) -> None:
    check(cfg)
    task = runs.setup(cfg, held_out=False)  # held out below, by the split's size
    base = task.train.meta.get("base", len(task.train))  # the TRAIN_LIMIT sample; the rest, sampled for TRAIN_REVIEWS
    val_limit, probe_train = fitted_sizes(cfg, base, len(task.train) - base)
    task.train, task.val = data.training_sets(task.train, val_limit, cfg.TRAIN_REVIEWS, cfg.SEED)
    layout, primer = prompts.layout_of(task, cfg.CONDITION, cfg.PRIMER_PATH, cfg.PRIMER_POSITION)
    sample = probe_sample(task, probe_train)
    run_dir = rundir.new(cfg, "probe", fitted={"VAL_LIMIT": val_limit, "PROBE_TRAIN": probe_train})
    layers = tuple(range(activations.layer_count(task.model)))
    poolings = activations.POOLINGS if cfg.POOLING == "both" else (cfg.POOLING,)
    cpu = time.process_time()
    train, train_seconds = activations.features(task, layout, sample, layers, poolings, run_dir, "train", primer)
    val, val_seconds = activations.features(task, layout, task.val, layers, poolings, run_dir, "val", primer)
    start = time.perf_counter()
    table, fitted = fit_layers(cfg, train, val, sample.labels.numpy(), task.val.labels.numpy(), layers)
    fit_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    # ties: "last" pooling before "mean", the earliest layer
    best = training.best_validation(table.to_dict("records"), prefix="val_")
    layer, pooling = int(best["layer"]), str(best["pooling"])
    files.write_atomic(os.path.join(run_dir, "probe_layers.csv"), table.to_csv(index=False))
    print(table.to_string(index=False, float_format="{:.3f}".format))
    print(f"chosen on validation: layer {layer}, {pooling} pooling, C={best['c']:g} ({best['val_score']:.1%}); "
          f"features {train_seconds + val_seconds:.0f} s, fits {fit_seconds:.0f} s")

    start, cpu = time.perf_counter(), time.process_time()  # the test split, read once: the chosen layer and pooling
    test, _ = activations.features(task, layout, task.test, (layer,), (pooling,), run_dir, "test", primer)
    probe = fitted[layer, pooling]
    logprobs = torch.tensor(probe.predict_log_proba(test[pooling][0].numpy()), dtype=torch.float32)
    predictions = {"label": task.test.labels.clone(), "answer": task.label_ids.cpu()[logprobs.argmax(-1)],
                   "logprobs": logprobs, "seconds": time.perf_counter() - start,
                   "cpu_seconds": time.process_time() - cpu}
    if cfg.PROBE == "linear":
        save_linear(run_dir, probe, cfg, layer, pooling)
    prompt = "" if cfg.CONDITION == "none" else f", {cfg.CONDITION}"
    runs.record(task, "probe", f"{cfg.PROBE} probe (layer {layer}, {pooling}{prompt})", layout.prompt_tokens,
                predictions, run_dir, trainable_params=probe_params(cfg, train[pooling].shape[-1]), samples=len(sample),
                train_seconds=train_seconds + val_seconds + fit_seconds, train_cpu_seconds=train_cpu)
    print(f"wrote {plots.probe_layers(cfg.RESULTS_DIR, cfg.MODEL_ID, run_dir)}")


if __name__ == "__main__":
    cli.main(run, SETTINGS)
