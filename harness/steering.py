"""Steering vectors' shared measurements: a decoder layer checked against the model, the residual stream's hidden
states and norm over the first training reviews, and ActAdd's contrast-pair difference (steer.py's sweep and its
--generate)."""
import torch

from harness import activations, errors
from harness.data import Split
from harness.layouts import Layout, make_layout
from harness.task import Task


def decoder_layer(task: Task, layer: int, setting: str) -> int:
    """The decoder layer (1-based) `layer` names, the middle one for 0; checked against the model, a one-line error
    naming `setting` (the flag that gave it)."""
    count = len(task.model.get_decoder().layers)
    layer = layer or (count + 1) // 2
    if not 1 <= layer <= count:
        raise errors.UserError(f"{setting}={layer} must be a decoder layer 1 to {count} of this model")
    return layer


def last_states(task: Task, layout: Layout, split: Split, layers: tuple[int, ...]) -> torch.Tensor:
    """Hidden states at the last position [len(layers), len(split), hidden] in layout."""
    return activations.extract(task, layout, split, layers, ("last",), desc="activations")["last"]


def vector_reviews(task: Task, count: int) -> Split:
    """The first `count` training reviews (the training split is already a seeded sample), which every vector and
    residual norm is measured over (steer.py's VECTOR_REVIEWS); a count the training split cannot give is refused
    (steer.py fits its default to a small split)."""
    if not 1 <= count <= len(task.train):
        raise errors.UserError(f"--vector_reviews={count} must be between 1 and the {len(task.train):,} training "
                               f"reviews (--train_limit less --val_limit)")
    return task.train.subset(torch.arange(count))


def residual(task: Task, layers: tuple[int, ...], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states at the last position [len(layers), count, hidden] of the first `count` training reviews
    (vector_reviews) alone in the user turn, and their mean norm at each layer [len(layers)]: the scale a steering
    coefficient counts in."""
    states = last_states(task, make_layout(task, None), vector_reviews(task, count), layers)
    return states, states.norm(dim=-1).mean(1)


def pair_difference(task: Task, pair: list[str], layers: tuple[int, ...]) -> torch.Tensor:
    """ActAdd [len(layers), hidden]: the last position's hidden state with the first system message minus with the
    second, the user turn empty."""
    empty = Split(torch.zeros(0, dtype=torch.int32), torch.zeros(2, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                  {})
    first, second = (last_states(task, make_layout(task, text), empty, layers)[:, 0] for text in pair)
    return first - second
