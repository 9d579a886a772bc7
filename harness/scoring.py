"""Answers to scores: per-review predictions, the strict and label-restricted counts, Wilson intervals, and the
best validation epoch of a run folder (by training.best_validation, the repo's one rule)."""
import math
import os
import time
from typing import Optional

import pandas as pd
import torch

from harness import batches, frozen, parallel, training
from harness.data import Split
from harness.layouts import Layout, assemble
from harness.task import Task


@torch.inference_mode()
def predict_batch(task: Task, layout: Layout, primer: Optional[torch.Tensor], idx: torch.Tensor,
                  split: Optional[Split] = None,
                  steer: Optional[frozen.Steer] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer (argmax token over the whole vocabulary) [B] and the log-probabilities of the two label tokens
    [B, 2] at each of reviews idx of split (the test split unless given)."""
    split = task.test if split is None else split
    ids, lengths = assemble(layout, split, idx)
    logits = frozen.forward(task.model, ids, lengths, layout, primer, steer).logits
    return logits.argmax(-1), logits.log_softmax(-1)[:, task.label_ids]


def predict(task: Task, layout: Layout, primer: Optional[torch.Tensor] = None, split: Optional[Split] = None,
            steer: Optional[frozen.Steer] = None) -> dict:
    """Per review of split (the test split unless given), in its order: "label" (0 negative, 1 positive), "answer"
    (the argmax token over the whole vocabulary), "logprobs" ([n, 2], of the two label tokens); and the "seconds" and
    this process's "cpu_seconds" taken.
    Under accelerate each process predicts its share of the split and the shares are summed into place."""
    split, start, cpu = task.test if split is None else split, time.perf_counter(), time.process_time()
    answers = torch.zeros(len(split), dtype=torch.long, device=task.device)
    logprobs = torch.zeros(len(split), 2, device=task.device)
    for idx in batches.longest_first(task, split, "score"):
        answers[idx], logprobs[idx] = predict_batch(task, layout, primer, idx, split, steer)
    return {"label": split.labels.clone(), "answer": parallel.sum_across(answers).cpu(),
            "logprobs": parallel.sum_across(logprobs).cpu(), "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu}


def right(label_ids: torch.Tensor, predictions: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per review: right by the strict metric (its label token is the argmax over the vocabulary), and right by the
    label-restricted one (the right label's log-probability is the larger)."""
    truth = predictions["label"]
    return predictions["answer"] == label_ids.cpu()[truth], predictions["logprobs"].argmax(-1) == truth


def metrics(label_ids: torch.Tensor, predictions: dict) -> dict:
    """Strict score (the label token is the argmax over the whole vocabulary, the reference's metric), the
    label-restricted score (the right label's log-probability is the larger), their 95% Wilson intervals (_low,
    _high), and how often the answer is a label token at all."""
    strict, restricted = (int(r.sum()) for r in right(label_ids, predictions))
    answered = int(torch.isin(predictions["answer"], label_ids.cpu()).sum())
    total = len(predictions["label"])
    score_low, score_high = wilson_interval(strict, total)
    restricted_low, restricted_high = wilson_interval(restricted, total)
    return {"correct": strict, "total": total, "score": strict / total, "restricted_correct": restricted,
            "restricted_score": restricted / total, "label_answer_share": answered / total, "score_low": score_low,
            "score_high": score_high, "restricted_low": restricted_low, "restricted_high": restricted_high}


def score(task: Task, layout: Layout, primer: Optional[torch.Tensor] = None, split: Optional[Split] = None,
          steer: Optional[frozen.Steer] = None) -> dict:
    """metrics() of predict()."""
    return metrics(task.label_ids, predict(task, layout, primer, split, steer))


def best_epoch(run_dir: str) -> Optional[int]:
    """The best epoch on the validation reviews by run_dir's validation.csv; None when the run validated none."""
    path = os.path.join(run_dir, "validation.csv")
    if not os.path.exists(path):
        return None
    return int(training.best_validation(pd.read_csv(path).to_dict("records"))["epoch"])


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (low, high) of the share correct / total, 95% for z = 1.96: unlike the normal
    approximation it stays inside [0, 1] and is sound for shares near 0 or 1 and for small totals."""
    p, z2 = correct / total, z * z / total
    center = (p + z2 / 2) / (1 + z2)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total)) / (1 + z2)
    return max(0.0, center - half), min(1.0, center + half)

