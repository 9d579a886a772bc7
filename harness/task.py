"""What every method's functions take first: the config, the frozen model and tokenizer, the label tokens, the data."""
from dataclasses import dataclass
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
