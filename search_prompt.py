"""Discrete prompt search: a readable system message (or k vocabulary tokens) found by search on validation reviews,
instead of trained vectors.

    python search_prompt.py                          # "edit": word edits of the best prompts so far (GRIPS-like)
    python search_prompt.py --search=propose         # a chat model proposes instructions from the best so far (OPRO, APE)
    python search_prompt.py --search=tokens --tokens=8 --token_init=primer:results/<run id>/primer.safetensors

Text searches start from the two hand-written prompts and change only the system message (each candidate keeps a
user message of theirs around the review, so step 0 scores as the baselines do); every candidate is scored with the
shared scorer on VAL_LIMIT validation reviews held out of training (strict score, ties broken by the label-restricted
one) and written to candidates.csv. The token search (AutoPrompt, GCG) swaps one of TOKENS system-slot tokens per
step along the gradient of the loss on SEARCH_BATCH training reviews, every candidate swap measured in one batched
forward. The test split is scored once, with the best prompt on validation.
"""
import json
import os
import random
import time
from types import SimpleNamespace

import pandas as pd
import torch
import torch.nn.functional as F

from harness import chat, cli, data, errors, frozen, plots, primers, prompts, runs, scoring
from harness.layouts import assemble, encode, make_layout

SEARCH = "edit"  # the method: "edit" (word edits), "propose" (a chat model writes instructions), "tokens" (gradient-guided swaps)
STEPS = 10  # search steps
PATIENCE = 4  # stop after this many steps in a row without a better validation score
CANDIDATES = 4  # new prompts per step ("edit", "propose"), single-token swaps tried per step ("tokens")
POOL = 4  # best prompts kept: the parents of edits and the examples in the proposer's meta-prompt
VAL_LIMIT = 200  # (config.py has 0) reviews held out of training that score every candidate
PROPOSER_ID = None  # chat model (hub id or folder) that proposes ("propose") or paraphrases ("edit") instructions; None: the model under test for "propose", no paraphrases for "edit"
PROPOSER_TEMPERATURE = 1.0  # the proposer's sampling temperature
PROPOSER_TOKENS = 64  # tokens per proposed instruction
EXAMPLES = 3  # labelled training reviews shown in the meta-prompt
EDIT_WORDS = ["review", "sentiment", "positive", "negative", "only", "digit", "answer", "classify"]  # words an insert edit draws from; []: any ordinary token
TOKENS = 8  # "tokens": vocabulary tokens in the system slot
TOKEN_INIT = "random"  # "tokens" start: "random" (ordinary tokens), "text:<words>" or "primer:<path>" (each vector's nearest token)
TOP_K = 16  # "tokens": substitutions per slot taken from the gradient
SEARCH_BATCH = 8  # "tokens": training reviews each step's gradient and swaps are measured on
SETTINGS = cli.own_settings(dict(globals()))  # the constants above, as --name=value settings
SEARCHES = ("edit", "propose", "tokens")
META_PROMPT = """Write an instruction that makes an assistant classify a restaurant review as negative (answer {negative}) or positive (answer {positive}).

Reviews with their answers:
{examples}

Earlier instructions and their accuracy, from worst to best:
{instructions}

Write a new instruction, different from those above, that reaches a higher accuracy. Write only the instruction."""


def check(cfg) -> None:
    if cfg.SEARCH not in SEARCHES:
        raise errors.UserError(f"--search={cfg.SEARCH!r} is not one of {', '.join(SEARCHES)}")
    if not cfg.VAL_LIMIT:
        raise errors.UserError("candidates are scored on validation reviews: set --val_limit (e.g. 200)")
    if min(cfg.STEPS, cfg.CANDIDATES, cfg.POOL, cfg.TOKENS, cfg.TOP_K, cfg.SEARCH_BATCH) < 1:
        raise errors.UserError("--steps, --candidates, --pool, --tokens, --top_k and --search_batch must all be at least 1")
    if not (cfg.TOKEN_INIT in ("random",) or cfg.TOKEN_INIT.startswith(("text:", "primer:"))):
        raise errors.UserError(f"--token_init={cfg.TOKEN_INIT!r} is not one of random, text:<words>, primer:<path>")


class Search:
    """Every candidate scored on validation, the budget spent, and the run folder's candidates.csv kept current."""

    def __init__(self, task, run_dir: str):
        self.task, self.run_dir, self.rows, self.scored = task, run_dir, [], {}
        self.forwards, self.backwards, self.start = 0, 0, time.perf_counter()
        self.losses = []  # "tokens": each step's batch loss before and after its swap

    def score(self, step: int, text: str, ids: list[int], layout, primer=None, user: str = "{review}") -> tuple[int, int]:
        """The candidate's (strict, label-restricted) counts on validation, scored once per distinct prompt."""
        key = json.dumps([text, ids, user])
        if key not in self.scored:
            found = scoring.score(self.task, layout, primer, self.task.val)
            self.forwards += len(self.task.val)
            self.scored[key] = (found["correct"], found["restricted_correct"])
            self.rows.append({"step": step, "text": text, "user": user, "token_ids": json.dumps(ids), "val_correct": found["correct"],
                              "val_score": found["score"], "val_restricted_score": found["restricted_score"],
                              "forwards": self.forwards, "backwards": self.backwards,
                              "seconds": round(time.perf_counter() - self.start, 1)})
            runs.write_atomic(os.path.join(self.run_dir, "candidates.csv"), pd.DataFrame(self.rows).to_csv(index=False))
            print(f"step {step:>3}  validation {found['score']:.1%} ({found['restricted_score']:.1%} label-restricted)  {text[:70]!r}", flush=True)
        return self.scored[key]

    def score_text(self, step: int, prompt: tuple[str, str]) -> tuple[int, int]:
        system, user = prompt
        layout = make_layout(self.task, system, user)
        return self.score(step, system, encode(self.task.tokenizer, system), layout, user=user)


def search_text(task, search: Search, proposer) -> tuple[str, str]:
    """Edit or propose system messages, keeping the POOL best (system, user) prompts; the best on validation. An
    edit keeps its parent's user message, a proposed instruction takes the best prompt's."""
    cfg, rng = task.cfg, random.Random(task.cfg.SEED)
    starts = [prompts.text_prompt(name) for name in prompts.TEXT_PROMPTS]
    pool = {prompt: search.score_text(0, prompt) for prompt in starts}
    best, stale = max(pool.values()), 0
    for step in range(1, cfg.STEPS + 1):
        parents = sorted(pool, key=pool.get)[-cfg.POOL:]
        if cfg.SEARCH == "propose":
            texts = propose(task, proposer, {system: pool[system, user] for system, user in parents}, rng, step)
            candidates = [(text, parents[-1][1]) for text in texts]
        else:
            candidates = [(edit(task, proposer, system, rng, step), user) for system, user in
                       (rng.choice(parents) for _ in range(cfg.CANDIDATES))]
        for prompt in [p for p in candidates if p[0]]:  # a proposer may write nothing
            pool[prompt] = search.score_text(step, prompt)
        stale = 0 if max(pool.values()) > best else stale + 1
        best = max(pool.values())
        if stale >= cfg.PATIENCE:
            print(f"no better prompt for {stale} steps: stopping", flush=True)
            break
    return max(pool, key=pool.get)


def propose(task, proposer, pool: dict, rng: random.Random, step: int) -> list[str]:
    """CANDIDATES instructions the proposer writes from the meta-prompt (EXAMPLES training reviews, the pool's
    instructions with their validation accuracy, worst to best)."""
    cfg, train = task.cfg, task.train
    picked = rng.sample(range(len(train)), min(cfg.EXAMPLES, len(train)))
    review = lambda i: task.tokenizer.decode(train.tokens[train.offsets[i]:train.offsets[i + 1]].tolist())[:300]
    examples = "\n".join(f"Review: {review(i)}\nAnswer: {cfg.LABELS[int(train.labels[i])]}" for i in picked)
    listed = "\n".join(f"Instruction: {t}\nAccuracy: {100 * c[0] / len(task.val):.0f}%" for t, c in sorted(pool.items(), key=lambda x: x[1]))
    meta = META_PROMPT.format(negative=cfg.LABELS[0], positive=cfg.LABELS[1], examples=examples, instructions=listed)
    return [clean(t) for t in ask(proposer, [meta] * cfg.CANDIDATES, cfg, step)]


def ask(proposer, messages: list[str], cfg, step: int) -> list[str]:
    return chat.sample(proposer.model, proposer.tokenizer, messages, cfg.TEMPLATE_KWARGS, cfg.PROPOSER_TOKENS,
                       cfg.PROPOSER_TEMPERATURE, cfg.SEED + step).texts


def clean(text: str) -> str:
    """A proposed instruction as a system message: stripped of quotes and a leading label like "Instruction:"."""
    text = text.strip().removeprefix("Instruction:").strip().strip('"').strip()
    return text[:500]


def edit(task, proposer, text: str, rng: random.Random, step: int) -> str:
    """One random edit of text's space-separated words: delete, swap, repeat, insert (an EDIT_WORDS word or any
    ordinary token), or with a proposer paraphrase."""
    words = text.split(" ")
    kind = rng.choice(["delete", "swap", "repeat", "insert"] + (["paraphrase"] if proposer else []))
    i, j = rng.randrange(len(words)), rng.randrange(len(words))
    if kind == "delete" and len(words) > 1:
        del words[i]
    elif kind == "swap":
        words[i], words[j] = words[j], words[i]
    elif kind == "repeat":
        words.insert(i, words[i])
    elif kind == "insert":
        ordinary = primers.ordinary_tokens(task.tokenizer)
        new = rng.choice(task.cfg.EDIT_WORDS) if task.cfg.EDIT_WORDS else task.tokenizer.decode([int(rng.choice(ordinary))]).strip()
        words.insert(i, new)
    elif kind == "paraphrase":
        request = f"Rewrite this instruction in other words, keeping its meaning:\n{text}\nWrite only the new instruction."
        return clean(ask(proposer, [request], task.cfg, step)[0])
    return " ".join(words)


def label_losses(task, layout, slots: torch.Tensor, reviews: torch.Tensor) -> torch.Tensor:
    """The mean label cross-entropy over `reviews` [R] for each row of candidate slot embeddings [C, k, hidden]: the
    C x R pairs in one batched forward, a different prompt in each row."""
    ids, lengths = assemble(layout, task.train, reviews.repeat(len(slots)))
    logits = frozen.forward(task.model, ids.to(task.device), lengths.to(task.device), layout, slots.repeat_interleave(len(reviews), 0)).logits
    targets = task.label_ids[task.train.labels[reviews].to(task.device)].repeat(len(slots))
    return F.cross_entropy(logits, targets, reduction="none").view(len(slots), len(reviews)).mean(1)


def initial_tokens(task) -> torch.Tensor:
    """The token search's starting ids [TOKENS], as TOKEN_INIT says."""
    cfg = task.cfg
    if cfg.TOKEN_INIT.startswith("primer:"):  # "discretize a primer": each vector's nearest token, cycled to TOKENS
        primer = primers.load_primer(cfg.TOKEN_INIT[len("primer:"):], task.model, "system")
        nearest = primers.nearest_tokens(task, primer, 1)[1][:, 0]
        return nearest.repeat(-(-cfg.TOKENS // len(nearest)))[:cfg.TOKENS]
    return primers.primer_init_tokens(task, "vocab" if cfg.TOKEN_INIT == "random" else cfg.TOKEN_INIT, cfg.TOKENS, cfg.SEED).to(task.device)


def search_tokens(task, search: Search) -> torch.Tensor:
    """TOKENS ids in the system slot, greedy coordinate search along the gradient (GCG); the best on validation."""
    cfg, table = task.cfg, task.model.get_input_embeddings().weight
    layout, rng = make_layout(task, None, primer_length=cfg.TOKENS), torch.Generator().manual_seed(cfg.SEED)
    allowed = torch.full((len(table),), float("inf"), device=task.device)
    allowed[primers.ordinary_tokens(task.tokenizer).to(task.device)] = 0.0
    current = initial_tokens(task).to(task.device)
    score = lambda step, ids: search.score(step, task.tokenizer.decode(ids.tolist()), ids.tolist(), layout, table[ids].float())
    best, best_ids, stale = score(0, current), current, 0
    for step in range(1, cfg.STEPS + 1):
        reviews = torch.randperm(len(task.train), generator=rng)[:cfg.SEARCH_BATCH]
        onehot = F.one_hot(current, len(table)).float().requires_grad_(True)
        loss = label_losses(task, layout, (onehot @ table.float())[None], reviews)[0]
        loss.backward()
        search.forwards, search.backwards = search.forwards + len(reviews), search.backwards + len(reviews)
        top = (onehot.grad + allowed).topk(cfg.TOP_K, dim=1, largest=False).indices  # [TOKENS, TOP_K]: most loss-lowering swaps
        slots = torch.randint(cfg.TOKENS, (cfg.CANDIDATES,), generator=rng)
        swaps = top[slots, torch.randint(cfg.TOP_K, (cfg.CANDIDATES,), generator=rng)]
        candidates = current.repeat(cfg.CANDIDATES, 1)
        candidates[torch.arange(cfg.CANDIDATES), slots] = swaps
        with torch.no_grad():
            losses = label_losses(task, layout, table[candidates].float(), reviews)
        search.forwards += cfg.CANDIDATES * len(reviews)
        search.losses.append((loss.item(), min(loss.item(), losses.min().item())))
        if losses.min() < loss:
            current = candidates[losses.argmin()]
        found = score(step, current)
        stale = 0 if found > best else stale + 1
        best, best_ids = (found, current) if found > best else (best, best_ids)
        if stale >= cfg.PATIENCE:
            print(f"no better prompt for {stale} steps: stopping", flush=True)
            break
    return best_ids


def load_proposer(task):
    """The chat model that writes instructions: PROPOSER_ID, or the model under test ("propose" only)."""
    cfg = task.cfg
    if cfg.PROPOSER_ID is None:
        return SimpleNamespace(model=task.model, tokenizer=task.tokenizer) if cfg.SEARCH == "propose" else None
    other = SimpleNamespace(**{**vars(cfg), "MODEL_ID": cfg.PROPOSER_ID, "GGUF_FILE": None})
    return SimpleNamespace(model=frozen.load_model(other, task.device), tokenizer=data.load_tokenizer(cfg.PROPOSER_ID))


def run(cfg) -> None:
    check(cfg)
    task = runs.setup(cfg)
    run_dir = runs.start_run(cfg, "search_prompt")
    search = Search(task, run_dir)
    if cfg.SEARCH == "tokens":
        ids = search_tokens(task, search)
        text, user = task.tokenizer.decode(ids.tolist()), "{review}"
    else:
        text, user = search_text(task, search, load_proposer(task))
    print(f"budget: {search.forwards:,} reviews through forward passes, {search.backwards:,} through backward passes, "
          f"{time.perf_counter() - search.start:.0f} s")
    token_ids = ids.tolist() if cfg.SEARCH == "tokens" else encode(task.tokenizer, text)
    saved = {"text": text, "user": user, "token_ids": token_ids}
    runs.write_atomic(os.path.join(run_dir, "prompt.json"), json.dumps(saved, indent=2))
    print(f"saved {plots.search_curve(pd.DataFrame(search.rows), os.path.join(run_dir, 'search.png'))}")
    seconds = time.perf_counter() - search.start
    if cfg.SEARCH == "tokens":  # the exact ids, then the text they decode to, tokenized again
        layout = make_layout(task, None, primer_length=cfg.TOKENS)
        table = task.model.get_input_embeddings().weight
        runs.record(task, "search_prompt", f"token search, exact ids: {text[:40]!r}", cfg.TOKENS,
                    scoring.predict(task, layout, table[ids].float()), run_dir, samples=len(task.train), train_seconds=seconds)
    layout = make_layout(task, text, user)
    method = f"prompt search ({cfg.SEARCH}{', decoded text' if cfg.SEARCH == 'tokens' else ''}): {text[:40]!r}"
    runs.record(task, "search_prompt", method, layout.prompt_tokens, scoring.predict(task, layout),
                runs.start_run(cfg, "search_prompt") if cfg.SEARCH == "tokens" else run_dir,
                samples=len(task.train), train_seconds=seconds)


if __name__ == "__main__":
    cli.main(run, SETTINGS)
