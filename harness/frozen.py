"""The frozen model and its one forward pass: embeddings spliced in, steering added, logits and hidden states out."""
import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from harness import errors, hub, parallel
from harness.layouts import Layout


@dataclass
class Steer:
    """A vector added to the residual stream after some decoder layers, at every position or after the review."""
    vector: torch.Tensor  # [hidden], float32
    layers: tuple[int, ...]  # 1-based: added to the output of these decoder layers
    coefficient: float = 1.0
    after_review: bool = False  # only at the positions after the review (the template's answer cue), not at all of them
    edit: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None  # instead of vector: the shift as a function of (layer, its output [B, T, hidden]), e.g. LoReFT's


@dataclass
class Output:
    logits: torch.Tensor  # float32 [B, vocab] at each row's last real position ([B, span, vocab] at its last span)
    last: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [B, hidden] at the last position
    mean: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [B, hidden] over the review's positions


def resolve_device(name: str) -> torch.device:
    if parallel.started():  # each process has a device of its own, which DEVICE may name only by its type
        mine = parallel.device()
        if name not in ("auto", mine.type):
            raise errors.UserError(f"--device={name}, but under accelerate launch this process runs on {mine}: "
                                f"use --device=auto (each process then takes its own GPU) or --device={mine.type}")
        return mine
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise errors.UserError(f"--device={name} but torch sees no CUDA GPU: use --device=cpu or --device=auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("bfloat16", "float16", "float32"):
        raise errors.UserError(f"--dtype={name} is not one of auto, bfloat16, float16, float32")
    return getattr(torch, name)


def load_model(cfg: SimpleNamespace, device: torch.device) -> torch.nn.Module:
    """The frozen model: eval mode, no parameter ever requires a gradient."""
    from transformers import AutoModelForCausalLM
    dtype = resolve_dtype(cfg.DTYPE, device)
    model = hub.from_hub(AutoModelForCausalLM.from_pretrained, cfg.MODEL_ID, cfg.GGUF_FILE, dtype=dtype,
                         attn_implementation="sdpa")
    return freeze(model.to(device), cfg.GRADIENT_CHECKPOINTING)


def freeze(model: torch.nn.Module, checkpointing: bool) -> torch.nn.Module:
    """The model in eval mode with no parameter requiring a gradient, optionally checkpointing its layers."""
    model.requires_grad_(False).eval()
    if checkpointing:
        from transformers.modeling_layers import GradientCheckpointingLayer
        model.activation_checkpointing_enable()
        for layer in model.modules():  # HF checkpoints only layers in training mode: flag those alone, dropout stays off
            if isinstance(layer, GradientCheckpointingLayer):
                layer.training = True
    return model


def forward(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, layout: Layout,
            primer: Optional[torch.Tensor] = None, steer: Optional[Steer] = None, layers: tuple[int, ...] = (),
            span: int = 1) -> Output:
    """Float32 next-token logits at each row's last real position (at its last `span` ones, [B, span, vocab], when
    span > 1), with primer ([k, hidden] for every row, or [B, k, hidden] one per row) spliced into the layout's slot
    and `steer` added; with `layers` (0 the embeddings, l the output of decoder layer l) also their hidden states at
    the last position and averaged over the review.

    Right padding with an attention mask and explicit positions keeps every row independent of its batch mates; the
    LM head runs only at the last real positions. A primer after the review runs on a cache of the rest
    (suffix_logits). The decoder is reached through the public accessors, so a peft-wrapped model works too."""
    if layout.in_suffix and primer is not None and primer.dim() == 2 and steer is None and not layers and span == 1:
        return Output(suffix_logits(model, ids, lengths, layout, primer))
    embeds = model.get_input_embeddings()(ids)
    if primer is not None:
        spliced = primer.to(embeds.dtype).expand(len(ids), -1, -1)
        start = layout.slot.start + (lengths - len(layout.suffix) if layout.in_suffix else torch.zeros_like(lengths))
        columns = start[:, None] + torch.arange(spliced.shape[1], device=ids.device)
        embeds = embeds.scatter(1, columns[:, :, None].expand(-1, -1, embeds.shape[2]), spliced)
    positions = torch.arange(ids.shape[1], device=ids.device)
    mask = (positions < lengths[:, None]).long()
    rows = torch.arange(len(ids), device=ids.device)
    review = (positions >= len(layout.prefix)) & (positions < (lengths - len(layout.suffix))[:, None])
    weights = review.float() / review.sum(1, keepdim=True).clamp(min=1)  # an empty review (steer.py's pair) pools to 0
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
                shift = steer.coefficient * (steer.vector.to(hidden.dtype) if steer.edit is None else steer.edit(number, hidden))
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


def suffix_logits(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, layout: Layout,
                  primer: torch.Tensor) -> torch.Tensor:
    """forward's logits for a primer after the review: prefix and review run once without gradients into a
    key-value cache, then only the primer and the tokens after it run on that cache, so backward covers those few
    tokens alone. The cached part is left-padded so every row ends at the same column and the suffix block is one
    dense block for all rows; the mask hides the left padding and explicit positions keep rows independent."""
    decoder, suffix = model.get_decoder(), layout.suffix.to(ids.device)
    context = lengths - len(suffix)  # each row's prefix and review tokens
    width = int(context.max())
    positions = torch.arange(width, device=ids.device) - (width - context)[:, None]  # negative in the left padding
    mask = (positions >= 0).long()
    with torch.no_grad():
        cache = decoder(input_ids=ids.gather(1, positions.clamp(min=0)), attention_mask=mask,
                        position_ids=positions.clamp(min=0), use_cache=True).cache
    embeds = model.get_input_embeddings()(suffix)
    embeds = torch.cat([embeds[:layout.slot.start], primer.to(embeds.dtype), embeds[layout.slot.stop:]])
    hidden = decoder(inputs_embeds=embeds.expand(len(ids), -1, -1), cache=cache, use_cache=True,
                     attention_mask=torch.cat([mask, mask.new_ones(len(ids), len(suffix))], dim=1),
                     position_ids=context[:, None] + torch.arange(len(suffix), device=ids.device)).last_hidden_state
    return float32_logits(model, hidden[:, -1])


def float32_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head in float32 on hidden states [..., hidden]: in bfloat16 logits step by about 0.1 at Llama's
    magnitudes, so close label logits would tie and argmax would take the first."""
    head = model.get_output_embeddings()
    bias = None if head.bias is None else head.bias.float()
    return F.linear(hidden.float(), head.weight.float(), bias)


def unpadded_embeds(model: torch.nn.Module, layout: Layout, review: torch.Tensor, primer: Optional[torch.Tensor]) -> torch.Tensor:
    """One review's input embeddings [T, hidden] in its layout, primer in its slot, no batch and no padding: the
    straightforward way (bench.py's baseline loop, and the reference the tests hold the batched paths to)."""
    embed = model.get_input_embeddings()
    review = torch.tensor(layout.review_ids([review.tolist()])[0], dtype=torch.long)
    rows = embed(torch.cat([layout.prefix, review, layout.suffix]).to(embed.weight.device))
    if primer is None:
        return rows
    start = layout.slot.start + (len(layout.prefix) + len(review) if layout.in_suffix else 0)
    return torch.cat([rows[:start], primer.to(rows.dtype), rows[start + len(primer):]])
