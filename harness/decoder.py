"""Calling the frozen decoder: inputs on its device, the attention mask, a primer spliced into its slot, steering
hooks on its layers, float32 logits. frozen.forward and the reused paths (reuse) are built from these."""
import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from harness.task import Layout


@dataclass
class Steer:
    """A vector added to the residual stream after some decoder layers, at every position or after the review."""
    vector: torch.Tensor  # [hidden], float32
    layers: tuple[int, ...]  # 1-based: added to the output of these decoder layers
    coefficient: float = 1.0
    after_review: bool = False  # only at the positions after the review (the template's answer cue), not at all of them
    # instead of vector: the shift given (layer, its output [B, T, hidden]): LoReFT
    edit: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None


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


def spliced(embeds: torch.Tensor, primer: torch.Tensor, layout: Layout, lengths: torch.Tensor) -> torch.Tensor:
    """embeds [B, T, hidden] with the primer ([k, hidden], or [B, k, hidden]) in each row's slot: after its review
    in a suffix layout, where the slot moves with the review's length."""
    spliced = primer.to(embeds).expand(len(embeds), -1, -1)
    start = layout.slot.start + (lengths - len(layout.suffix) if layout.in_suffix else torch.zeros_like(lengths))
    columns = start[:, None] + torch.arange(spliced.shape[1], device=embeds.device)
    return embeds.scatter(1, columns[:, :, None].expand(-1, -1, embeds.shape[2]), spliced)


def unpadded(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    """The mask and positions forward gives a row without padding (the same attention kernel as a batch's)."""
    width = ids.shape[1]
    return {"attention_mask": causal_mask(model, torch.ones_like(ids, dtype=torch.bool), width),
            "position_ids": torch.arange(width, device=ids.device)[None]}


def causal_mask(model: torch.nn.Module, keys: torch.Tensor, queries: int) -> torch.Tensor:
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


def float32_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
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


def attention_backend(model: torch.nn.Module, device: torch.device) -> str:
    """The SDPA kernel torch picks for this model's attention with forward's boolean padding mask, in its dtype on
    device (e.g. EFFICIENT_ATTENTION on CUDA, FLASH_ATTENTION on the CPU)."""
    from torch.nn.attention import SDPBackend
    conf = model.config.get_text_config()
    heads = conf.num_attention_heads
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // heads
    dtype = model.get_input_embeddings().weight.dtype
    q = torch.zeros(2, heads, 64, head_dim, device=device, dtype=dtype)
    mask = causal_mask(model, torch.ones(2, 64, dtype=torch.bool, device=device), 64)
    if isinstance(mask, dict) or mask.dim() != 4:
        return "transformers' own masks (sliding-window layers)"
    return SDPBackend(torch._fused_sdp_choice(q, q, q, mask, 0.0, False)).name
