"""Candidate prompts screened on a few training reviews in batched forward passes (each row's loss its own), and
the validated ones recorded with the budget spent: the machinery search_prompt.py's three searches share."""
import json
import os
import time

import pandas as pd
import torch
import torch.nn.functional as F

from harness import files, frozen, scoring, training
from harness.layouts import assemble, encode, make_layout
from harness.task import Task


class Search:
    """Every validated candidate with the budget spent so far, the run folder's candidates.csv kept current; the
    budget is `cpu_budget` CPU minutes and `forward_budget` forward-pass reviews, whichever are set (0: none)."""

    def __init__(self, task: Task, run_dir: str, cpu_budget: float, forward_budget: int):
        self.task, self.run_dir, self.rows, self.scored = task, run_dir, [], {}
        self.cpu_budget, self.forward_budget = cpu_budget, forward_budget
        self.forwards, self.backwards = 0, 0  # reviews through forward and backward passes
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.steps = []  # "tokens": each step's reviews, prompt before and after, and their losses on those reviews

    def cpu_minutes(self) -> float:
        return (time.process_time() - self.cpu_start) / 60

    def left(self) -> bool:
        """Whether budget is left, of both CPU minutes and forward-pass reviews (a backward pass counting as two)."""
        return (not self.cpu_budget or self.cpu_minutes() < self.cpu_budget) and \
            (not self.forward_budget or self.forwards + 2 * self.backwards < self.forward_budget)

    def score(self, step: int, text: str, ids: list[int], layout, primer=None,
              user: str = "{review}") -> tuple[int, int]:
        """The candidate's (strict, label-restricted) counts on validation, scored once per distinct prompt."""
        key = json.dumps([text, ids, user])
        if key not in self.scored:
            found = scoring.score(self.task, layout, primer, self.task.val)
            self.forwards += len(self.task.val)
            self.scored[key] = training.validation_key(found)  # the pool and the search compare these
            self.rows.append({"step": step, "text": text, "user": user, "token_ids": json.dumps(ids),
                              "val_correct": found["correct"],
                              "val_score": found["score"], "val_restricted_score": found["restricted_score"],
                              "forwards": self.forwards, "backwards": self.backwards,
                              "cpu_minutes": round(self.cpu_minutes(), 2),
                              "seconds": round(time.perf_counter() - self.start, 1)})
            files.write_atomic(os.path.join(self.run_dir, "candidates.csv"),
                               pd.DataFrame(self.rows).to_csv(index=False))
            print(f"step {step:>3}  {self.cpu_minutes():5.1f} cpu min  validation {found['score']:.1%} "
                  f"({found['restricted_score']:.1%} label-restricted)  {text[:70]!r}", flush=True)
        return self.scored[key]

    def score_text(self, step: int, prompt: tuple[str, str]) -> tuple[int, int]:
        return self.score(step, prompt[0], encode(self.task.tokenizer, prompt[0]), make_layout(self.task, *prompt),
                          user=prompt[1])


def _batch_losses(task: Task, ids: torch.Tensor, lengths: torch.Tensor, layout, targets: torch.Tensor, batch: int,
                  slots=None) -> torch.Tensor:
    """Per-row label cross-entropy over the whole vocabulary, `batch` rows a forward pass (right padding with
    explicit positions keeps each row's loss independent of its batch mates)."""
    out = []
    for rows in torch.arange(len(ids)).split(batch):
        width = int(lengths[rows].max())
        primer = None if slots is None else slots[rows]
        logits = frozen.forward(task.model, ids[rows, :width], lengths[rows], layout, primer).logits
        out.append(F.cross_entropy(logits, targets[rows], reduction="none"))
    return torch.cat(out)


def text_losses(task: Task, candidates: list[tuple[str, str]], reviews: torch.Tensor, batch: int) -> torch.Tensor:
    """The mean label cross-entropy over `reviews` of each (system, user) prompt: every prompt-review pair a row of
    forwards of `batch` rows, whatever the prompts' lengths."""
    rows = []
    for system, user in candidates:
        ids, lengths = assemble(make_layout(task, system, user), task.train, reviews)
        rows += [r[:n] for r, n in zip(ids, lengths)]
    lengths = torch.tensor([len(r) for r in rows])
    order = lengths.argsort(descending=True)  # rows of a length together: less padding
    ids = torch.nn.utils.rnn.pad_sequence([rows[i] for i in order], batch_first=True)
    targets = task.label_ids[task.train.labels[reviews].to(task.device)].repeat(len(candidates))
    with torch.no_grad():
        losses = torch.empty(len(rows), device=task.device)
        losses[order.to(task.device)] = _batch_losses(task, ids, lengths[order], make_layout(task, *candidates[0]),
                                                      targets[order.to(task.device)], batch)
    return losses.view(len(candidates), len(reviews)).mean(1)


def label_losses(task: Task, layout, slots: torch.Tensor, reviews: torch.Tensor, batch: int) -> torch.Tensor:
    """The mean label cross-entropy over `reviews` [R] for each row of candidate slot embeddings [C, k, hidden]: the
    C x R pairs in forwards of `batch` rows, a different prompt in each row."""
    ids, lengths = assemble(layout, task.train, reviews.repeat(len(slots)))
    targets = task.label_ids[task.train.labels[reviews].to(task.device)].repeat(len(slots))
    losses = _batch_losses(task, ids, lengths, layout, targets, batch, slots.repeat_interleave(len(reviews), 0))
    return losses.view(len(slots), len(reviews)).mean(1)
