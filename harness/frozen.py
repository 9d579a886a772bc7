"""The frozen model and its one forward pass: embeddings spliced in, steering added, logits and hidden states out."""
import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from harness.task import Layout

STATE_CACHE_BYTES = 2 * 2**30  # per layout and model: what _per_review keeps of the frozen reviews; past it recomputed


@dataclass
class Steer:
    """A vector added to the residual stream after some decoder layers, at every position or after the review."""
    vector: torch.Tensor  # [hidden], float32
    layers: tuple[int, ...]  # 1-based: added to the output of these decoder layers
    coefficient: float = 1.0
    after_review: bool = False  # only at the positions after the review (the template's answer cue), not at all of them
    # instead of vector: the shift given (layer, its output [B, T, hidden]): LoReFT
    edit: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None


@dataclass
class Output:
    logits: torch.Tensor  # float32 [B, vocab] at each row's last real position ([B, span, vocab] at its last span)
    last: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [B, hidden] at the last position
    # layer -> float32 [B, hidden] over the review's positions
    mean: dict[int, torch.Tensor] = field(default_factory=dict)


def attention_backend(model: torch.nn.Module, device: torch.device) -> str:
    """The SDPA kernel torch picks for this model's attention with forward's boolean padding mask, in its dtype on
    device (e.g. EFFICIENT_ATTENTION on CUDA, FLASH_ATTENTION on the CPU)."""
    from torch.nn.attention import SDPBackend
    conf = model.config.get_text_config()
    heads = conf.num_attention_heads
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // heads
    dtype = model.get_input_embeddings().weight.dtype
    q = torch.zeros(2, heads, 64, head_dim, device=device, dtype=dtype)
    mask = _attention_mask(model, torch.ones(2, 64, dtype=torch.bool, device=device), 64)
    if isinstance(mask, dict) or mask.dim() != 4:
        return "transformers' own masks (sliding-window layers)"
    return SDPBackend(torch._fused_sdp_choice(q, q, q, mask, 0.0, False)).name


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
    what is kept of each review's frozen part (_suffix_logits, steered_logits). The decoder is reached through the
    public accessors, so a peft-wrapped model works too. Inputs (on the host, from layouts.assemble) are moved to the
    model's device without waiting on it, and nothing here reads a value back from the device."""
    steer = None if steer is not None and steer.coefficient == 0 else steer  # adds nothing: the unsteered forward
    if steer is not None and primer is None and not layers and span == 1:
        return Output(steered_logits(model, ids, lengths, layout, steer))
    if layout.in_suffix and primer is not None and primer.dim() == 2 and steer is None and not layers and span == 1:
        return Output(_suffix_logits(model, ids, lengths, layout, primer))
    ids, lengths = to_model(model, ids), to_model(model, lengths)
    embeds = model.get_input_embeddings()(ids)
    if primer is not None:
        embeds = _spliced(embeds, primer, layout, lengths)
    positions = torch.arange(ids.shape[1], device=ids.device)
    mask = _attention_mask(model, positions < lengths[:, None], ids.shape[1])
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
        return Output(_float32_logits(model, hidden[rows, lengths - 1]), last, mean)
    columns = lengths[:, None] - span + torch.arange(span, device=ids.device)
    return Output(_float32_logits(model, hidden[rows[:, None], columns]), last, mean)


def _spliced(embeds: torch.Tensor, primer: torch.Tensor, layout: Layout, lengths: torch.Tensor) -> torch.Tensor:
    """embeds [B, T, hidden] with the primer ([k, hidden], or [B, k, hidden]) in each row's slot: after its review
    in a suffix layout, where the slot moves with the review's length."""
    spliced = primer.to(embeds).expand(len(embeds), -1, -1)
    start = layout.slot.start + (lengths - len(layout.suffix) if layout.in_suffix else torch.zeros_like(lengths))
    columns = start[:, None] + torch.arange(spliced.shape[1], device=embeds.device)
    return embeds.scatter(1, columns[:, :, None].expand(-1, -1, embeds.shape[2]), spliced)


def _review_weights(positions: torch.Tensor, lengths: torch.Tensor, layout: Layout,
                    joins: torch.Tensor) -> torch.Tensor:
    """[B, T] weights that average over each row's own review tokens (less its `joins`); an empty review (steer.py's
    pair) pools to 0."""
    start, stop = len(layout.prefix) + joins[:, 0], lengths - len(layout.suffix) - joins[:, 1]
    review = (positions >= start[:, None]) & (positions < stop[:, None])
    return review.float() / review.sum(1, keepdim=True).clamp(min=1)


@contextlib.contextmanager
def hooks(model: torch.nn.Module, steer: Optional[Steer], after_review: Optional[torch.Tensor] = None,
          layers: tuple[int, ...] = (), keep: Optional[Callable[[int, torch.Tensor], None]] = None) -> Iterator[None]:
    """Forward hooks on the decoder layers that add `steer` to their outputs (at the [B, T] positions after_review
    when steer.after_review, else everywhere: generation steers this way) and hand the outputs of `layers` to keep."""
    blocks = model.get_decoder().layers
    handles = []
    for number in range(1, len(blocks) + 1):
        add = steer is not None and number in steer.layers
        if not add and number not in layers:
            continue

        def hook(module, inputs, output, number=number, add=add):
            hidden = output[0] if isinstance(output, tuple) else output
            if add:
                shift = steer.coefficient * (steer.vector.to(hidden) if steer.edit is None
                                             else steer.edit(number, hidden))
                hidden = hidden + (after_review[:, :, None] * shift if steer.after_review else shift)
            if number in layers:
                keep(number, hidden)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        handles.append(blocks[number - 1].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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
        decoder(input_ids=ids, use_cache=False, **_unpadded(model, ids))
    return [out[layer][0]]


def _review_cache(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's keys then values [1, heads, T, head_dim] for one unpadded row of ids [1, T]."""
    with torch.no_grad():
        cache = model.get_decoder()(input_ids=ids, use_cache=True, **_unpadded(model, ids)).cache
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def _unpadded(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    """The mask and positions forward gives a row without padding (the same attention kernel as a batch's)."""
    width = ids.shape[1]
    return {"attention_mask": _attention_mask(model, torch.ones_like(ids, dtype=torch.bool), width),
            "position_ids": torch.arange(width, device=ids.device)[None]}


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
        hidden = decoder(inputs_embeds=states, attention_mask=_attention_mask(model, positions < lengths[:, None],
                                                                             ids.shape[1]),
                         position_ids=positions.expand_as(ids), use_cache=False).last_hidden_state
    return _float32_logits(model, hidden[torch.arange(len(ids), device=ids.device), lengths - 1])


def _suffix_logits(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, layout: Layout,
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
                                 attention_mask=_attention_mask(model, keys, len(suffix)),
                                 position_ids=context[:, None] + torch.arange(len(suffix), device=ids.device))
    return _float32_logits(model, hidden.last_hidden_state[:, -1])


def _float32_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head in float32 on hidden states [..., hidden]: in bfloat16 logits step by about 0.1 at Llama's
    magnitudes, so close label logits would tie and argmax would take the first."""
    head = model.get_output_embeddings()
    bias = None if head.bias is None else head.bias.float()
    return F.linear(hidden.float(), head.weight.float(), bias)


def to_model(model: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """tensor on the model's device; from the CPU to a GPU through pinned memory, so the host does not wait."""
    device = model.get_input_embeddings().weight.device
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _attention_mask(model: torch.nn.Module, keys: torch.Tensor, queries: int) -> torch.Tensor:
    """The decoder's attention mask for keys [B, K] (True at real tokens), the queries being the last `queries` of
    those K positions: the boolean [B, 1, queries, K] mask transformers would build (each query sees the real keys at
    or before it), built here because transformers' own check whether it may skip the mask reads the padding back
    from the GPU at every forward. A model with sliding-window layers gets the 2D mask, and transformers' masks."""
    conf = model.config.get_text_config()
    if (getattr(conf, "sliding_window", None) is not None
            or set(getattr(conf, "layer_types", None) or ["full_attention"]) != {"full_attention"}):
        return keys.long()
    width = keys.shape[1]
    causal = (torch.arange(width, device=keys.device)
              <= torch.arange(width - queries, width, device=keys.device)[:, None])
    return keys[:, None, None, :] & causal
