"""Answers sampled from a chat model: user messages in, the answers' tokens and texts out (steer.py's generations,
search_prompt.py's proposed instructions)."""
from dataclasses import dataclass
from typing import Optional

import torch

import frozen
from layouts import encode, prompt_text, stop_token_ids


@dataclass
class Answers:
    ids: torch.Tensor  # [B, width + new tokens]: each prompt, left-padded to `width`, then its sampled answer
    mask: torch.Tensor  # [B, width + new tokens]: 1 at the prompt's tokens and the answer's before its end of turn
    width: int  # the padded prompts' width: the answers start there
    texts: list[str]  # the answers' text, up to their end of turn


@torch.inference_mode()
def sample(model: torch.nn.Module, tokenizer, messages: list[str], template_kwargs: dict, max_new_tokens: int,
           temperature: float, seed: int, steer: Optional[frozen.Steer] = None) -> Answers:
    """One answer per user message, sampled at `temperature` (top-k and top-p off) after torch.manual_seed(seed),
    with `steer` added at every position."""
    prompts = [encode(tokenizer, prompt_text(tokenizer, None, m, template_kwargs)) for m in messages]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)  # left-padded for generate
    mask = (torch.arange(width, device=device) >= width - torch.tensor([len(p) for p in prompts], device=device)[:, None]).long()
    torch.manual_seed(seed)
    with frozen.hooks(model, steer):
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                             top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad)
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
