"""The frozen model and its one forward pass: embeddings spliced in, steering added, logits and hidden states out."""
from dataclasses import dataclass, field
from typing import Optional

import torch

from harness import reuse
from harness.decoder import Steer, causal_mask, float32_logits, hooks, spliced, to_model
from harness.task import Layout


@dataclass
class Output:
    logits: torch.Tensor  # float32 [B, vocab] at each row's last real position ([B, span, vocab] at its last span)
    last: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [B, hidden] at the last position
    # layer -> float32 [B, hidden] over the review's positions
    mean: dict[int, torch.Tensor] = field(default_factory=dict)


def forward(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, layout: Layout,
            primer: Optional[torch.Tensor] = None, steer: Optional[Steer] = None, layers: tuple[int, ...] = (),
            span: int = 1, joins: Optional[torch.Tensor] = None) -> Output:
    """Float32 next-token logits at each row's last real position (at its last `span` ones, [B, span, vocab], when
    span > 1), with primer ([k, hidden] for every row, or [B, k, hidden] one per row) spliced into the layout's slot
    and `steer` added; with `layers` (0 the embeddings, l the output of decoder layer l) also their hidden states at
    the last position and averaged over the review (its own tokens, less the `joins` [B, 2] of assemble's
    with_joins: the prompt text tokenized with the review at its start and end).

    Right padding with an attention mask and explicit positions keeps every row independent of its batch mates; the
    LM head runs only at the last real positions. A primer after the review, or a steer without a primer, runs on
    what is kept of each review's frozen part (suffix_logits, steered_logits); otherwise the prefix that every row
    begins with runs once for the batch (shared_prefix_logits), and `layers` asks for the full forward. The decoder
    is reached through the public accessors, so a peft-wrapped model works too. Inputs (on the host, from
    layouts.assemble) are moved to the model's device without waiting on it, and nothing here reads a value back
    from the device."""
    steer = None if steer is not None and steer.coefficient == 0 else steer  # adds nothing: the unsteered forward
    if steer is not None and primer is None and not layers and span == 1:
        return Output(reuse.steered_logits(model, ids, lengths, layout, steer))
    if layout.in_suffix and primer is not None and primer.dim() == 2 and steer is None and not layers and span == 1:
        return Output(reuse.suffix_logits(model, ids, lengths, layout, primer))
    if reuse.shares_prefix(model, ids, layout, primer, steer, layers):
        logits = reuse.shared_prefix_logits(model, ids, lengths, layout, primer, span)
        return Output(logits[:, 0] if span == 1 else logits)
    ids, lengths = to_model(model, ids), to_model(model, lengths)
    embeds = model.get_input_embeddings()(ids)
    if primer is not None:
        embeds = spliced(embeds, primer, layout, lengths)
    positions = torch.arange(ids.shape[1], device=ids.device)
    mask = causal_mask(model, positions < lengths[:, None], ids.shape[1])
    rows = torch.arange(len(ids), device=ids.device)
    joins = torch.zeros(len(ids), 2, dtype=torch.long, device=ids.device) if joins is None else to_model(model, joins)
    weights = _review_weights(positions, lengths, layout, joins)
    last, mean = {}, {}

    def keep(layer: int, hidden: torch.Tensor) -> None:  # pooled as the layer runs: no [B, T, hidden] kept per layer
        last[layer] = hidden[rows, lengths - 1].float()
        mean[layer] = torch.einsum("bt,bth->bh", weights, hidden.float())
    if 0 in layers:
        keep(0, embeds)
    with hooks(model, steer, positions >= (lengths - len(layout.suffix))[:, None], layers, keep):
        hidden = model.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=positions.expand_as(ids),
                                     use_cache=False).last_hidden_state
    if span == 1:
        return Output(float32_logits(model, hidden[rows, lengths - 1]), last, mean)
    columns = lengths[:, None] - span + torch.arange(span, device=ids.device)
    return Output(float32_logits(model, hidden[rows[:, None], columns]), last, mean)


def _review_weights(positions: torch.Tensor, lengths: torch.Tensor, layout: Layout,
                    joins: torch.Tensor) -> torch.Tensor:
    """[B, T] weights that average over each row's own review tokens (less its `joins`); an empty review (steer.py's
    pair) pools to 0."""
    start, stop = len(layout.prefix) + joins[:, 0], lengths - len(layout.suffix) - joins[:, 1]
    review = (positions >= start[:, None]) & (positions < stop[:, None])
    return review.float() / review.sum(1, keepdim=True).clamp(min=1)
