"""Frozen work done once: each review's layers below a steered one, or its key-value cache under a suffix primer,
kept on the layout for later steps, epochs and rates; and the prefix every row of a batch begins with, run once for
the batch. Each gives frozen.forward's logits."""
import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from harness.decoder import Steer, causal_mask, float32_logits, hooks, spliced, to_model, unpadded
from harness.task import Layout

STATE_CACHE_BYTES = 2 * 2**30  # per layout and model: what _per_review keeps of the frozen reviews; past it recomputed


@dataclass
class _Kept:
    """What _per_review keeps on a layout (Layout.cache["kept", id(decoder)]), all kinds within one budget."""
    states: dict = field(default_factory=dict)  # (kind, a review's ids as bytes) -> what was computed from them
    nbytes: int = 0


class _Skipped(torch.nn.Module):
    """A decoder layer below the reused one: hands its input on."""
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class _Replayed(torch.nn.Module):
    """The reused decoder layer: its kept output instead of its work (hooks on it still steer that output)."""
    def __init__(self, states: torch.Tensor):
        super().__init__()
        self.states = states

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.states


@contextlib.contextmanager
def _layers_swapped(decoder: torch.nn.Module, layers: list[torch.nn.Module]) -> Iterator[None]:
    kept = decoder.layers
    decoder.layers = torch.nn.ModuleList(layers)
    try:
        yield
    finally:
        decoder.layers = kept


def _layer_output(model: torch.nn.Module, ids: torch.Tensor, layer: int) -> list[torch.Tensor]:
    """[The output of decoder layer `layer` [T, hidden]] for one unpadded row of ids [1, T], the layers above not
    run."""
    decoder, out = model.get_decoder(), {}
    with torch.no_grad(), hooks(model, None, None, (layer,), out.__setitem__), \
            _layers_swapped(decoder, list(decoder.layers[:layer])):
        decoder(input_ids=ids, use_cache=False, **unpadded(model, ids))
    return [out[layer][0]]


def _review_cache(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's keys then values [1, heads, T, head_dim] for one unpadded row of ids [1, T]."""
    with torch.no_grad():
        cache = model.get_decoder()(input_ids=ids, use_cache=True, **unpadded(model, ids)).cache
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _per_review(model: torch.nn.Module, layout: Layout, kind: str, ids: torch.Tensor, sizes: list[int],
                compute: Callable[[torch.nn.Module, torch.Tensor], list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """compute(model, ids [1, n]) for the first n ids of each row (n in sizes): each review alone and unpadded, so
    bitwise the same in every batch and on resume, and kept on the layout (up to STATE_CACHE_BYTES) for later steps,
    epochs, rates and coefficients."""
    kept = layout.cache.setdefault(("kept", id(model.get_decoder())), _Kept())  # a layout on two models keeps both
    found = []
    for row, n in zip(ids.cpu(), sizes):
        key = kind, row[:n].numpy().tobytes()
        value = kept.states.get(key)
        if value is None:
            value = compute(model, to_model(model, row[None, :n]))
            if kept.nbytes < STATE_CACHE_BYTES:
                kept.states[key] = value
                kept.nbytes += sum(t.nbytes for t in value)
        found.append(value)
    return found


def steered_logits(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, layout: Layout,
                   steer: Steer) -> torch.Tensor:
    """forward's logits with `steer` and no primer: nothing below the first steered layer L changes, so each
    review's output of layer L is computed once (_per_review) and the forward runs only the layers above L on it."""
    layer, decoder = min(steer.layers), model.get_decoder()
    states = _per_review(model, layout, f"layer {layer}", ids, lengths.tolist(),
                         lambda model, row: _layer_output(model, row, layer))
    ids, lengths = to_model(model, ids), to_model(model, lengths)
    states = torch.nn.utils.rnn.pad_sequence([state for state, in states], batch_first=True)
    states = F.pad(states, (0, 0, 0, ids.shape[1] - states.shape[1]))
    positions = torch.arange(ids.shape[1], device=ids.device)
    blocks = [_Skipped()] * (layer - 1) + [_Replayed(states)] + list(decoder.layers[layer:])
    with _layers_swapped(decoder, blocks), hooks(model, steer, positions >= (lengths - len(layout.suffix))[:, None]):
        hidden = decoder(inputs_embeds=states, attention_mask=causal_mask(model, positions < lengths[:, None],
                                                                             ids.shape[1]),
                         position_ids=positions.expand_as(ids), use_cache=False).last_hidden_state
    return float32_logits(model, hidden[torch.arange(len(ids), device=ids.device), lengths - 1])


def suffix_logits(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, layout: Layout,
                  primer: torch.Tensor) -> torch.Tensor:
    """forward's logits for a primer after the review: each review's prefix and review run once into a key-value
    cache (_per_review), then only the primer and the tokens after it run on the batch's caches, so backward covers
    those few tokens alone. The caches are left-padded so every row ends at the same column and the suffix block is
    one dense block for all rows; the mask hides the left padding and explicit positions keep rows independent."""
    from transformers import DynamicCache
    sizes = (lengths - len(layout.suffix)).tolist()  # each row's prefix and review tokens
    caches = _per_review(model, layout, "review cache", ids, sizes, _review_cache)
    width = max(sizes)
    left = lambda tensors: torch.cat([F.pad(t, (0, 0, width - n, 0)) for t, n in zip(tensors, sizes)])
    cache = DynamicCache(ddp_cache_data=[(left([c[i] for c in caches]), left([c[i + 1] for c in caches]))
                                         for i in range(0, len(caches[0]), 2)], config=model.config)
    ids, context = to_model(model, ids), to_model(model, torch.tensor(sizes))
    suffix = layout.suffix.to(ids.device)
    real = torch.arange(width, device=ids.device) >= (width - context)[:, None]
    embeds = model.get_input_embeddings()(suffix)
    embeds = torch.cat([embeds[:layout.slot.start], primer.to(embeds), embeds[layout.slot.stop:]])
    keys = torch.cat([real, real.new_ones(len(ids), len(suffix))], dim=1)
    hidden = model.get_decoder()(inputs_embeds=embeds.expand(len(ids), -1, -1), cache=cache, use_cache=True,
                                 attention_mask=causal_mask(model, keys, len(suffix)),
                                 position_ids=context[:, None] + torch.arange(len(suffix), device=ids.device))
    return float32_logits(model, hidden.last_hidden_state[:, -1])


def shares_prefix(model: torch.nn.Module, ids: torch.Tensor, layout: Layout, primer: Optional[torch.Tensor],
                  steer: Optional[Steer], layers: tuple[int, ...]) -> bool:
    """Whether forward runs the layout's prefix once for the whole batch: every row of ids (on the host, where they
    are read without waiting on a device) begins with it (a prompt search batches rows of many prompts), the same
    in each (no primer per row), nothing asks for its hidden states or steers it, the decoder takes a cache (a
    prefix-tuned one brings its own) and no checkpointed layer would drop that cache in a pass that keeps the
    gradient."""
    width, decoder = len(layout.prefix), model.get_decoder()
    checkpointed = torch.is_grad_enabled() and any(getattr(layer, "gradient_checkpointing", False) and layer.training
                                                   for layer in decoder.layers)
    return (width > 0 and (primer is None or primer.dim() == 2) and steer is None and not layers
            and isinstance(decoder, torch.nn.Module) and not checkpointed and ids.device.type == "cpu"
            and bool((ids[:, :width] == layout.prefix).all()))


def shared_prefix_logits(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, layout: Layout,
                          primer: Optional[torch.Tensor], span: int) -> torch.Tensor:
    """forward's logits [B, span, vocab] at each row's last `span` real positions, the layout's prefix (the system
    message with its primer or a text prompt, which every row begins with) run once for the batch into a key-value
    cache and each row's review and the tokens after it on that cache: the prefix's work is not repeated per row,
    and its gradient (a primer's, an adapter's) is the sum of the rows' as in the full forward."""
    from transformers import DynamicCache
    width, decoder, embed = len(layout.prefix), model.get_decoder(), model.get_input_embeddings()
    ids, lengths = to_model(model, ids), to_model(model, lengths)
    head = embed(ids[:1, :width])
    if primer is not None:
        head = spliced(head, primer, layout, lengths[:1])
    head = decoder(inputs_embeds=head, use_cache=True, **unpadded(model, ids[:1, :width])).cache
    rows = torch.arange(len(ids), device=ids.device)
    cache = DynamicCache(ddp_cache_data=[(layer.keys.expand(len(ids), -1, -1, -1),
                                          layer.values.expand(len(ids), -1, -1, -1)) for layer in head.layers],
                         config=model.config)
    positions = torch.arange(ids.shape[1], device=ids.device)
    hidden = decoder(inputs_embeds=embed(ids[:, width:]), cache=cache, use_cache=True,
                     attention_mask=causal_mask(model, positions < lengths[:, None], ids.shape[1] - width),
                     position_ids=positions[width:].expand(len(ids), -1)).last_hidden_state
    columns = lengths[:, None] - width - span + torch.arange(span, device=ids.device)
    return float32_logits(model, hidden[rows[:, None], columns])
