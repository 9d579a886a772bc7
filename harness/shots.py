"""In-context examples and contextual calibration for the text prompts (Zhao et al. 2021, "Calibrate before use").

Examples are training reviews with their label strings as earlier user and assistant turns of the chat, the same for
every review scored; calibration divides the two label probabilities by those the same prompt gives content-free
inputs, which cancels the prompt's bias towards one label."""
import numpy as np
import torch

from harness import data, errors, scoring
from harness.layouts import Layout
from harness.task import Task

# the content-free "reviews" of Zhao et al. 2021, each scored in the prompt's layout
CONTENT_FREE = ("N/A", "", "[MASK]")


def examples(task: Task, k: int) -> tuple[tuple[str, str], ...]:
    """k (review text, label string) turns from the training split (never the test or validation reviews): a seeded,
    label-balanced sample, in a seeded order (the order of examples moves few-shot scores, so it is fixed by SEED)."""
    if k < 0:
        raise errors.UserError(f"--shots={k} must be 0 or more")
    if k == 0:
        return ()
    train = task.train
    if k > len(train):
        raise errors.UserError(f"--shots={k} needs {k} training reviews, but there are {len(train):,}: "
                               f"lower --shots or raise --train_limit")
    picked = data.balanced_sample(train.labels.numpy(), k, task.cfg.SEED)
    picked = picked[np.random.default_rng(task.cfg.SEED).permutation(k)]
    texts = task.tokenizer.batch_decode([train.tokens[train.offsets[i]:train.offsets[i + 1]].tolist() for i in picked],
                                        clean_up_tokenization_spaces=False)
    return tuple((text, task.cfg.LABELS[int(train.labels[i])]) for text, i in zip(texts, picked))


def content_free_split(task: Task) -> data.Split:
    tokens, offsets, _ = data.tokenize(task.tokenizer, list(CONTENT_FREE), task.cfg.MAX_REVIEW_TOKENS)
    return data.Split(tokens, offsets, torch.zeros(len(CONTENT_FREE), dtype=torch.long), {})


def label_bias(task: Task, layout: Layout) -> torch.Tensor:
    """The log of the mean probability [2] of each label, normalized over the two, that layout gives CONTENT_FREE."""
    logprobs = scoring.predict(task, layout, split=content_free_split(task))["logprobs"]
    return logprobs.log_softmax(-1).exp().mean(0).log()


def calibrate(predictions: dict, bias: torch.Tensor) -> dict:
    """predictions with "logprobs" replaced by the calibrated label log-probabilities (normalized over the two labels,
    divided by the content-free probabilities bias, renormalized) and the raw ones kept as "raw_logprobs": the
    label-restricted score becomes the calibrated one; the strict answer, an argmax over the vocabulary, is
    unchanged."""
    calibrated = (predictions["logprobs"].log_softmax(-1) - bias).log_softmax(-1)
    return {**predictions, "logprobs": calibrated, "raw_logprobs": predictions["logprobs"]}
