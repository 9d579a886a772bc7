"""What every method's functions take: the Task (config, frozen model and tokenizer, label tokens, data) and a Layout
(the token ids around a review: layouts builds it, frozen runs it)."""
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Optional

import torch

from harness.data import Split


@dataclass
class Task:
    """Everything a run needs (runs.setup makes it): the config, the frozen model and tokenizer, the label tokens
    and the data."""
    cfg: SimpleNamespace
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    label_ids: torch.Tensor  # token id of LABELS[0] and LABELS[1], on device
    train: Optional[Split]
    test: Split
    val: Optional[Split] = None  # VAL_LIMIT reviews held out of the training sample, scored after each epoch


@dataclass
class Layout:
    """Token ids around the review: prefix (primer slot included, as placeholder ids), review, suffix."""
    prefix: torch.Tensor
    suffix: torch.Tensor
    slot: slice  # the primer's positions in the prefix (in the suffix when in_suffix); empty for a text prompt
    prompt_tokens: int  # tokens the prompt adds to the review: primer length, or the text prompt's own tokens
    in_suffix: bool = False  # the slot indexes the suffix: the primer follows the review (PRIMER_POSITION "suffix")
    joins: tuple[str, str] = ("", "")  # prompt text glued to the review on each side, tokenized together with it
    tokenizer: object = None  # needed only when joins are not empty
    # id(split) -> joined review ids (assemble); ("kept", id(decoder)) -> frozen work per review (reuse._per_review)
    cache: dict = field(default_factory=dict, repr=False, compare=False)
