"""Answers sampled from a chat model: user messages in, the answers' tokens and texts out (steer.py's generations,
search_prompt.py's proposed instructions)."""
import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from harness import decoder
from harness.layouts import encode, prompt_text, stop_token_ids


@dataclass
class Answers:
    ids: torch.Tensor  # [B, width + new tokens]: each prompt, left-padded to `width`, then its sampled answer
    mask: torch.Tensor  # [B, width + new tokens]: 1 at the prompt's tokens and the answer's before its end of turn
    width: int  # the padded prompts' width: the answers start there
    texts: list[str]  # the answers' text, up to their end of turn


def draw(scores: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each row's token [B] sampled from softmax(scores / temperature) by inverse CDF at the row's uniform in [0, 1)
    [B]: a row's draw depends on its own scores and uniform alone."""
    cdf = (scores.cpu().double() / temperature).softmax(-1).cumsum(-1)
    return torch.searchsorted(cdf, uniforms.reshape(-1, 1).double() * cdf[:, -1:]).clamp(max=cdf.shape[1] - 1)[:, 0]


class _DrawPerRow(LogitsProcessor):
    """Scores whose argmax is `draw`'s sample, each row's uniforms from a generator of its own."""

    def __init__(self, generators: list[torch.Generator], temperature: float):
        self.generators, self.temperature = generators, temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in self.generators])
        drawn = draw(scores, uniforms, self.temperature).to(scores.device)
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn[:, None], 0.0)


def _row_generators(messages: list[str], seed: int) -> list[torch.Generator]:
    """A generator per message seeded by (seed, the message, how often it came before): a message's k-th answer is
    the same whatever else is asked beside it."""
    seen, generators = {}, []
    for message in messages:
        seen[message] = seen.get(message, -1) + 1
        key = hashlib.sha256(f"{seed}\0{seen[message]}\0{message}".encode()).digest()
        generators.append(torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1))
    return generators


@torch.inference_mode()
def sample(model: torch.nn.Module, tokenizer, messages: list[str], template_kwargs: dict, max_new_tokens: int,
           temperature: float, seed: int, steer: Optional[decoder.Steer] = None) -> Answers:
    """One answer per user message, sampled at `temperature` from the whole vocabulary (_row_generators: the same
    answer whatever the batch), with `steer` added at every position."""
    prompts = [encode(tokenizer, prompt_text(tokenizer, None, m, template_kwargs)) for m in messages]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # left-padded for generate
    starts = width - torch.tensor([len(p) for p in prompts], device=device)[:, None]  # where each prompt begins
    mask = (torch.arange(width, device=device) >= starts).long()
    noise = LogitsProcessorList([_DrawPerRow(_row_generators(messages, seed), temperature)])
    with decoder.hooks(model, steer):  # greedy over _DrawPerRow's scores: sampling, row by row
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, logits_processor=noise,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
    answer = out[:, width:]
    kept = (torch.isin(answer, stop_token_ids(tokenizer, model).to(device)).long().cumsum(1) == 0).long()
    texts = tokenizer.batch_decode(answer * kept + pad * (1 - kept), skip_special_tokens=True)
    return Answers(out, torch.cat([mask, kept], 1), width, texts)


@torch.inference_mode()
def mean_logprob(model: torch.nn.Module, answers: Answers) -> torch.Tensor:
    """Each answer's mean token log-probability [B] under `model` given its prompt (with no steering)."""
    mask = answers.mask
    logits = model(input_ids=answers.ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    tokens, kept = answers.ids[:, answers.width:], mask[:, answers.width:]
    logprobs = logits[:, answers.width - 1:-1].float().log_softmax(-1).gather(-1, tokens[:, :, None])[..., 0]
    return ((logprobs * kept).sum(1) / kept.sum(1).clamp(min=1)).cpu()
