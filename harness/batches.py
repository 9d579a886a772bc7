"""The one way a split goes through the frozen model without gradients: this process's share, longest first."""
from typing import Iterator

import torch
from tqdm import tqdm

from harness import parallel
from harness.data import Split
from harness.task import Task


def longest_first(task: Task, split: Split, desc: str) -> Iterator[torch.Tensor]:
    """Review indices of split in batches of SCORE_BATCH_SIZE, longest first (a batch too big for memory fails at
    once, not at the end), this process's share under accelerate (parallel.sum_across puts the shares together),
    with a progress bar on the main process."""
    order = parallel.shard(split.lengths.argsort(descending=True))
    yield from tqdm(order.split(task.cfg.SCORE_BATCH_SIZE), desc=desc, unit="batch", disable=not parallel.is_main())
