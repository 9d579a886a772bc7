"""The prompt around a review, built from the model's own chat template: text, or a slot for embeddings."""
import functools
import re
import weakref
from typing import Optional

import torch
from jinja2.exceptions import TemplateError

from harness import data, errors
from harness.task import Layout, Task  # layouts.Layout: what make_layout returns

PRIMER_SLOT = "\x00PRIMER\x00"  # stands for the primer while the chat template is rendered
REVIEW_SLOT = "\x00REVIEW\x00"  # stands for the review likewise
PRIMER_POSITIONS = ("system", "prefix", "suffix")  # the values PRIMER_POSITION may take (see make_layout)
PLAIN_ANSWER_CUE = "\nAnswer:"  # ends the prompt of a model with no chat template; the label token follows it
# assemble pads a batch to a multiple of this many tokens (1: to its longest row; bench.py measures others)
PAD_MULTIPLE = 1
# between system content and the user message when both share the user turn (as Gemma's template does)
SYSTEM_SEPARATOR = "\n\n"


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def label_token_ids(tokenizer, labels: list[str], context: str = "") -> list[int]:
    """Each label's token id where it follows `context` (the prompt's end): the tokens of context + label after those
    of context alone, so a tokenizer that spells a text's first word differently (a leading space) gets the id the
    model answers with."""
    before = encode(tokenizer, context)
    ids = []
    for label in labels:
        whole = encode(tokenizer, context + label)
        if whole[:len(before)] != before:
            raise errors.UserError(f"label {label!r} merges with the prompt's last token {context[-12:]!r} "
                                   f"for {tokenizer.name_or_path}: "
                                   f"set --labels to strings that tokenize apart from it")
        ids.append(whole[len(before):])
    for label, tokens in zip(labels, ids):
        if len(tokens) != 1:
            raise errors.UserError(f"label {label!r} is {len(tokens)} tokens for {tokenizer.name_or_path}, not one: "
                                   f"set --labels to single-token strings")
    if ids[0] == ids[1]:
        raise errors.UserError(f"labels {labels} are the same token: set --labels to two different strings")
    return [t[0] for t in ids]


def stop_token_ids(tokenizer, model) -> torch.Tensor:
    """The tokens that end the model's answer: the tokenizer's eos and the model's generation config's eos ids."""
    configured = torch.tensor(model.generation_config.eos_token_id or []).view(-1).tolist()
    return torch.tensor(sorted({tokenizer.eos_token_id, *configured} - {None}))


@functools.cache
def say_once(message: str) -> None:
    print(message, flush=True)


def prompt_text(tokenizer, system: Optional[str], user: str, template_kwargs: dict,
                turns: tuple[tuple[str, str], ...] = ()) -> str:
    """The prompt as text up to the answer: the chat template with `system` as its system message, or at the start of
    the user turn when the template refuses or drops one; with no chat template, bos + system + user + PLAIN_ANSWER_CUE.
    `turns` (user text, assistant answer) come first as earlier turns of the chat (in-context examples)."""
    if tokenizer.chat_template is None:
        say_once(f"{tokenizer.name_or_path} has no chat template: the prompt is bos, the system content or primer, "
                 f"the review and {PLAIN_ANSWER_CUE!r}")
        examples = "".join(u + PLAIN_ANSWER_CUE + a + SYSTEM_SEPARATOR for u, a in turns)
        return ((tokenizer.bos_token or "") + (system + SYSTEM_SEPARATOR if system else "") + examples + user
                + PLAIN_ANSWER_CUE)
    render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                            **template_kwargs)
    chat = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    chat.append({"role": "user", "content": user})
    if system is None:
        return render(chat)
    try:
        text = render([{"role": "system", "content": system}, *chat])
        if system.strip() in text:
            return text
    except TemplateError:
        pass
    say_once(f"the chat template of {tokenizer.name_or_path} takes no system message: the system content or primer "
             f"goes at the start of the user turn")
    return render([{**chat[0], "content": system + SYSTEM_SEPARATOR + chat[0]["content"]}, *chat[1:]])


def answer_context(tokenizer, template_kwargs: dict) -> str:
    """The prompt's text after the review, which the answer follows (the same for every PRIMER_POSITION)."""
    return prompt_text(tokenizer, None, REVIEW_SLOT, template_kwargs).split(REVIEW_SLOT)[1]


def check_primer_position(position: str, checkpointing: bool) -> None:
    if position not in PRIMER_POSITIONS:
        raise errors.UserError(f"--primer_position={position!r} is not one of {', '.join(PRIMER_POSITIONS)}")
    if position == "suffix" and checkpointing:  # HF's checkpointed layers drop the review cache that suffix runs on
        raise errors.UserError("--primer_position=suffix does not combine with --gradient_checkpointing=True "
                               "(its backward pass covers only the primer and the answer cue, so it needs little "
                               "memory): set it to False")


def make_layout(task: Task, system: Optional[str], user: str = "{review}", primer_length: int = 0,
                position: str = "system", turns: tuple[tuple[str, str], ...] = ()) -> Layout:
    """The prompt (prompt_text) with `system` text, or a slot of primer_length embeddings, at `position`: "system" in
    the system message, "prefix" before everything (bos included), "suffix" right after the review at the end of the
    user turn; `user` around {review}, after the chat `turns` (in-context examples, counted in prompt_tokens). The
    ids equal the tokenizer's own ids of the whole prompt text, but for the slot's placeholder ids."""
    check_primer_position(position, task.cfg.GRADIENT_CHECKPOINTING)
    tok, kwargs = task.tokenizer, task.cfg.TEMPLATE_KWARGS
    content, user_text = PRIMER_SLOT if primer_length else system, user.replace("{review}", REVIEW_SLOT)
    if position == "system":
        text = prompt_text(tok, content, user_text, kwargs, turns)
    elif position == "prefix":
        text = content + prompt_text(tok, None, user_text, kwargs, turns)
    else:
        text = prompt_text(tok, None, user_text + content, kwargs, turns)
    head, tail = text.split(REVIEW_SLOT)
    seams = [re.escape(t) for t in (PRIMER_SLOT, *tok.added_tokens_encoder)]  # text is tokenized apart across these
    seam = re.compile("|".join(sorted(seams, key=len, reverse=True)))
    head_end = max((m.end() for m in seam.finditer(head)), default=0)
    tail_start = next((m.start() for m in seam.finditer(tail)), len(tail))
    prefix, head_slot = _encode_around_slot(tok, head[:head_end], primer_length)
    suffix, tail_slot = _encode_around_slot(tok, tail[tail_start:], primer_length)
    in_suffix = tail_slot is not None
    if system is not None:
        prompt_tokens = len(encode(tok, system)) + sum(len(encode(tok, part)) for part in user.split("{review}"))
    else:
        prompt_tokens = primer_length
    prompt_tokens += sum(len(encode(tok, u)) + len(encode(tok, a)) for u, a in turns)
    return Layout(prefix, suffix, (tail_slot if in_suffix else head_slot) or slice(0, 0), prompt_tokens, in_suffix,
                  (head[head_end:], tail[:tail_start]), tok)


def _encode_around_slot(tokenizer, text: str, primer_length: int) -> tuple[torch.Tensor, Optional[slice]]:
    """The ids of text with primer_length placeholder ids where the primer slot is, and the slot (None if absent)."""
    if PRIMER_SLOT not in text:
        return torch.tensor(encode(tokenizer, text), dtype=torch.long), None
    before, after = (encode(tokenizer, part) for part in text.split(PRIMER_SLOT))
    return torch.tensor(before + [0] * primer_length + after), slice(len(before), len(before) + primer_length)


def assemble(layout: Layout, split: data.Split, idx: torch.Tensor,
             with_joins: bool = False) -> tuple[torch.Tensor, ...]:
    """Right-padded input ids [B, L] of reviews idx in their layout, and each row's real length [B]; L is the
    longest row rounded up to a multiple of PAD_MULTIPLE. With with_joins, also each row's count of joined prompt
    ids before and after its review's own [B, 2] (joined_ids)."""
    reviews, joins = _review_rows(layout, split, idx)
    rows = [torch.cat([layout.prefix, review, layout.suffix]) for review in reviews]
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    ids = torch.nn.functional.pad(ids, (0, padded_width(ids.shape[1]) - ids.shape[1]))
    return (ids, lengths, joins) if with_joins else (ids, lengths)


def padded_width(longest: int) -> int:
    """The width of a batch whose longest row has `longest` tokens."""
    return -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE


def _review_rows(layout: Layout, split: data.Split, idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The ids of reviews idx with the layout's joins, and their joined-id counts [B, 2] (joined_ids). Joined
    ids are tokenized once per layout and split and kept on the layout, so later epochs and validations assemble a
    batch without the tokenizer."""
    bounds = zip(split.offsets[idx].tolist(), split.offsets[idx + 1].tolist())
    if layout.joins == ("", ""):
        return [split.tokens[start:end].long() for start, end in bounds], torch.zeros(len(idx), 2, dtype=torch.long)
    kept = _joined_cache(layout, split)
    missing = [i for i in dict.fromkeys(idx.tolist()) if i not in kept]
    if missing:
        reviews, counts = joined_ids(layout, [split.tokens[split.offsets[i]:split.offsets[i + 1]].tolist()
                                              for i in missing])
        kept.update((i, (torch.tensor(r, dtype=torch.long), c)) for i, r, c in zip(missing, reviews, counts))
    rows = [kept[i] for i in idx.tolist()]
    return [ids for ids, _ in rows], torch.stack([c for _, c in rows]) if rows else torch.zeros(0, 2, dtype=torch.long)


def joined_ids(layout: Layout, reviews: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """The ids of each review with the prompt text joined to it, and [n, 2]: how many of each one's first and last ids
    are that text alone (a token across the seam counts as the review's), so that pooling "over the review" takes its
    own tokens. Where a prompt's text runs into the review with no special token between them, a BPE tokenizer
    merges across the seam ("!" + "\\n" is one token "!\\n"), so that text is tokenized with the review, as the
    tokenizer would tokenize the whole prompt."""
    if layout.joins == ("", ""):
        return reviews, torch.zeros(len(reviews), 2, dtype=torch.long)
    texts = layout.tokenizer.batch_decode(reviews, clean_up_tokenization_spaces=False)
    head, tail = layout.joins
    encoded = layout.tokenizer([head + t + tail for t in texts], add_special_tokens=False, return_offsets_mapping=True)
    counts = [[sum(end <= len(head) for _, end in spans), sum(start >= len(head) + len(text) for start, _ in spans)]
              for text, spans in zip(texts, encoded["offset_mapping"])]
    return encoded["input_ids"], torch.tensor(counts, dtype=torch.long).view(-1, 2)


def unpadded_embeds(model: torch.nn.Module, layout: Layout, review: torch.Tensor,
                    primer: Optional[torch.Tensor]) -> torch.Tensor:
    """One review's input embeddings [T, hidden] in its layout, primer in its slot, no batch and no padding: the
    straightforward way (bench.py's baseline loop, and the reference the tests hold the batched paths to)."""
    embed = model.get_input_embeddings()
    review = torch.tensor(joined_ids(layout, [review.tolist()])[0][0], dtype=torch.long)
    rows = embed(torch.cat([layout.prefix, review, layout.suffix]).to(embed.weight.device))
    if primer is None:
        return rows
    start = layout.slot.start + (len(layout.prefix) + len(review) if layout.in_suffix else 0)
    return torch.cat([rows[:start], primer.to(rows), rows[start + len(primer):]])


def _joined_cache(layout: Layout, split: data.Split) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The layout's joined ids (and counts) of split's reviews made so far, by review index; dropped when the split
    is."""
    key = id(split)
    entry = layout.cache.get(key)
    if entry is None or entry[0]() is not split:
        entry = layout.cache[key] = (weakref.ref(split), {})
        weakref.finalize(split, _forget, weakref.ref(layout), key)  # neither keeps the other alive
    return entry[1]


def _forget(layout_ref: weakref.ref, key: int) -> None:
    layout = layout_ref()
    if layout is not None:
        layout.cache.pop(key, None)
