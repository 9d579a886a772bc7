"""Scores from answers: the strict and label-restricted counts against the model's own forward, Wilson intervals."""
import pytest
import torch

import prompt_short
from harness import layouts, scoring


def test_wilson_interval_known_values():
    low, high = scoring.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert scoring.wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert scoring.wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    low, high = scoring.wilson_interval(36442, 38000)  # the reference's best row: 95.9% ±0.2
    assert high - low == pytest.approx(0.004, abs=1e-4)
    assert scoring.wilson_interval(81, 90, z=2.576)[0] < scoring.wilson_interval(81, 90)[0]  # 99% is wider than 95%


def test_score_matches_a_plain_full_forward(task):
    """score() against the model's own forward pass over each unpadded sequence, full logits, one review at a time."""
    layout = layouts.make_layout(task, prompt_short.SYSTEM, prompt_short.USER)
    metrics = scoring.score(task, layout, None)
    strict = restricted = answered = 0
    for i in range(len(task.test)):
        ids, _ = layouts.assemble(layout, task.test, torch.tensor([i]))
        logits = task.model(input_ids=ids).logits[0, -1]
        label = int(task.test.labels[i])
        strict += int(logits.argmax() == task.label_ids[label])
        restricted += int(logits[task.label_ids].argmax() == label)
        answered += int(logits.argmax() in task.label_ids.tolist())
    assert (metrics["correct"], metrics["restricted_correct"]) == (strict, restricted)
    assert metrics["label_answer_share"] == answered / len(task.test) and metrics["total"] == len(task.test)
