"""Discrete prompt search: a readable system message (or k vocabulary tokens) found by search on validation reviews,
instead of trained vectors, within a budget of CPU minutes (or forward passes).

    python search_prompt.py                          # "edit": word edits of the best prompts so far (GRIPS-like)
    python search_prompt.py --search=tokens          # GCG from the short prompt's tokens, its user message kept
    python search_prompt.py --search=propose --proposer_id=<a larger chat model>   # OPRO, APE
    python search_prompt.py "--curves=['results/<edit run>','results/<tokens run>']"   # their curves in one figure

Each step screens many candidates on SEARCH_BATCH training reviews by the label token's cross-entropy over the whole
vocabulary (low only when the model answers with the right label: it rewards the answer format and the label), all
candidates x reviews in batched forwards; the best are scored on VAL_LIMIT validation reviews held out of training
(strict score, ties broken by the label-restricted one) into candidates.csv. The test split is scored once, with the
best prompt on validation.
"""
import json
import os
import random
import time
from types import SimpleNamespace
from typing import Optional

import pandas as pd
import torch
import torch.nn.functional as F

from harness import chat, cli, errors, files, hub, plots, primers, prompts, rundir, runs, scoring, screening
from harness.layouts import encode, make_layout

SEARCH = "edit"  # "edit" (word edits), "propose" (a chat model writes instructions), "tokens" (gradient-guided swaps)
BUDGET = 25.0  # CPU minutes of this process the search may spend (one core's with --threads=1); test scoring after
FORWARD_BUDGET = 0  # or a budget in reviews through forward passes (a backward counts two), reproducible; 0: none
CANDIDATES = 32  # "edit", "propose": new prompts screened per step on SEARCH_BATCH training reviews
VALIDATE = 1  # "edit", "propose": the best screened prompts of each step scored on validation
POOL = 4  # best prompts kept: the parents of edits and the examples in the proposer's meta-prompt
VAL_LIMIT = 200  # (config.py has 0) reviews held out of training that score every validated candidate
SEARCH_BATCH = 4  # training reviews each step screens its candidates (and takes its gradient) on, drawn anew each step
PROPOSER_ID = None  # chat model proposing ("propose") or paraphrasing ("edit"); None: the tested model, no paraphrases
PROPOSER_TEMPERATURE = 1.0  # the proposer's sampling temperature
PROPOSER_TOKENS = 64  # tokens per proposed instruction
EXAMPLES = 3  # labelled training reviews shown in the meta-prompt
EDIT_WORDS = ["review", "sentiment", "positive", "negative", "only", "digit", "answer", "classify", "text", "output",
              "label", "write", "reply", "single", "number", "one", "two", "rotten", "fresh", "good", "bad", "movie",
              "film", "critic", "opinion", "tone", "judge", "decide", "whether", "respond", "exactly", "nothing",
              "else", "just", "the", "is", "if", "or", "and", "Output:", "Answer:",
              "1", "2", "`1`", "`2`"]  # edits' words; []: any token
TOKENS = 0  # "tokens": vocabulary tokens in the system slot; 0: as many as the start's text (8 for random and primer)
TOKEN_INIT = "short"  # "tokens" start: "short", "long" (that prompt), "text:<words>", "random" or "primer:<path>"
SWAPS = 128  # "tokens": single-token swaps scored per step, each a slot and one of its TOP_K gradient tokens
TOP_K = 64  # "tokens": substitutions per slot taken from the gradient
VAL_EVERY = 3  # "tokens": steps between validations of the current prompt
FORWARD_BATCH = 64  # prompt-review pairs per screening forward pass
CURVES = []  # run folders of earlier searches: draw their validation curves in one figure and search nothing
SETTINGS = cli.own_settings(dict(globals()))  # the constants above, as --name=value settings
SEARCHES = ("edit", "propose", "tokens")
META_PROMPT = """Write an instruction that makes an assistant classify a review as negative (answer {negative}) \
or positive (answer {positive}).

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
    sizes = (cfg.CANDIDATES, cfg.VALIDATE, cfg.POOL, cfg.TOKENS or 1, cfg.SWAPS, cfg.TOP_K, cfg.SEARCH_BATCH,
             cfg.VAL_EVERY, cfg.FORWARD_BATCH)
    if min(sizes) < 1:
        raise errors.UserError("--candidates, --validate, --pool, --tokens, --swaps, --top_k, --search_batch, "
                               "--val_every and --forward_batch must all be at least 1")
    if not (cfg.BUDGET or 0) > 0 and not (cfg.FORWARD_BUDGET or 0) > 0:
        raise errors.UserError("the search needs a budget: set --budget (CPU minutes) or --forward_budget "
                               "(reviews through forward passes) above 0")
    if not (cfg.TOKEN_INIT in ("random", *prompts.TEXT_PROMPTS) or cfg.TOKEN_INIT.startswith(("text:", "primer:"))):
        raise errors.UserError(f"--token_init={cfg.TOKEN_INIT!r} is not one of short, long, text:<words>, random, "
                               "primer:<path>")


def search_text(task, search: screening.Search, proposer) -> tuple[str, str]:
    """Edit or propose system messages, screen them on a batch of training reviews, validate the VALIDATE best of
    each step, and keep the POOL best (system, user) prompts; the best on validation. An edit keeps its parent's
    user message, a proposed instruction takes the best prompt's."""
    cfg, rng = task.cfg, random.Random(task.cfg.SEED)
    starts = [prompts.text_prompt(name) for name in prompts.TEXT_PROMPTS]
    pool = {prompt: search.score_text(0, prompt) for prompt in starts}
    words = sorted(set(cfg.EDIT_WORDS) | {w for system, _ in starts for w in system.split()}) if cfg.EDIT_WORDS else []
    step, order, idle = 0, torch.Generator().manual_seed(cfg.SEED), 0
    while search.left() and idle < 10:  # a proposer that writes nothing new would spend no forward budget
        step += 1
        parents = sorted(pool, key=pool.get)[-cfg.POOL:]
        if cfg.SEARCH == "propose":
            texts = propose(task, proposer, {system: pool[system, user] for system, user in parents}, rng, step)
            made = [(text, parents[-1][1]) for text in texts]
        else:
            made = [(edit(task, proposer, system, words, rng, step), user) for system, user in
                    (rng.choice(parents) for _ in range(cfg.CANDIDATES))]
        candidates = list(dict.fromkeys(p for p in made if p[0] and p not in pool))  # a proposer may write nothing
        idle = 0 if candidates else idle + 1
        if not candidates:
            continue
        reviews = torch.randperm(len(task.train), generator=order)[:cfg.SEARCH_BATCH]
        losses = screening.text_losses(task, candidates, reviews, cfg.FORWARD_BATCH)
        search.forwards += len(candidates) * len(reviews)
        for i in losses.argsort()[:cfg.VALIDATE].tolist():
            pool[candidates[i]] = search.score_text(step, candidates[i])
    return max(pool, key=pool.get)


def propose(task, proposer, pool: dict, rng: random.Random, step: int) -> list[str]:
    """CANDIDATES instructions the proposer writes from the meta-prompt (EXAMPLES training reviews, the pool's
    instructions with their validation accuracy, worst to best)."""
    cfg, train = task.cfg, task.train
    picked = rng.sample(range(len(train)), min(cfg.EXAMPLES, len(train)))
    review = lambda i: task.tokenizer.decode(train.tokens[train.offsets[i]:train.offsets[i + 1]].tolist())[:300]
    examples = "\n".join(f"Review: {review(i)}\nAnswer: {cfg.LABELS[int(train.labels[i])]}" for i in picked)
    listed = "\n".join(f"Instruction: {t}\nAccuracy: {100 * c[0] / len(task.val):.0f}%"
                       for t, c in sorted(pool.items(), key=lambda x: x[1]))
    meta = META_PROMPT.format(negative=cfg.LABELS[0], positive=cfg.LABELS[1], examples=examples, instructions=listed)
    return [clean(t) for t in ask(proposer, [meta] * cfg.CANDIDATES, cfg, step)]


def ask(proposer, messages: list[str], cfg, step: int) -> list[str]:
    return chat.sample(proposer.model, proposer.tokenizer, messages, cfg.TEMPLATE_KWARGS, cfg.PROPOSER_TOKENS,
                       cfg.PROPOSER_TEMPERATURE, cfg.SEED + step).texts


def clean(text: str) -> str:
    """A proposed instruction as a system message: stripped of quotes and a leading label like "Instruction:"."""
    text = text.strip().removeprefix("Instruction:").strip().strip('"').strip()
    return text[:500]


def edit(task, proposer, text: str, words: list[str], rng: random.Random, step: int) -> str:
    """One random edit of text's space-separated words: delete, swap, repeat, insert or replace (with one of `words`,
    or any ordinary token when it is empty), or with a proposer paraphrase."""
    parts = text.split(" ")
    kind = rng.choice(["delete", "swap", "repeat", "insert", "replace"] + (["paraphrase"] if proposer else []))
    i, j = rng.randrange(len(parts)), rng.randrange(len(parts))
    if kind == "delete" and len(parts) > 1:
        del parts[i]
    elif kind == "swap":
        parts[i], parts[j] = parts[j], parts[i]
    elif kind == "repeat":
        parts.insert(i, parts[i])
    elif kind in ("insert", "replace"):
        new = (rng.choice(words) if words
               else task.tokenizer.decode([int(rng.choice(primers.ordinary_tokens(task.tokenizer)))]).strip())
        parts[i:i + (kind == "replace")] = [new]
    elif kind == "paraphrase":
        request = (f"Rewrite this instruction in other words, keeping its meaning:\n{text}\n"
                   "Write only the new instruction.")
        return clean(ask(proposer, [request], task.cfg, step)[0])
    return " ".join(parts)


def token_start(task) -> tuple[torch.Tensor, str]:
    """The token search's starting ids [k] and the user message around the review, as TOKEN_INIT says."""
    cfg = task.cfg
    if cfg.TOKEN_INIT.startswith("primer:"):  # "discretize a primer": each vector's nearest token, cycled to TOKENS
        primer = primers.load_primer(cfg.TOKEN_INIT[len("primer:"):], task.model, "system")
        nearest = primers.nearest_tokens(task, primer, 1)[1][:, 0]
        return nearest.repeat(-(-(cfg.TOKENS or 8) // len(nearest)))[:cfg.TOKENS or 8], "{review}"
    if cfg.TOKEN_INIT in prompts.TEXT_PROMPTS:
        system, user = prompts.text_prompt(cfg.TOKEN_INIT)
        init = f"text:{system}"
    else:
        init, user = ("vocab" if cfg.TOKEN_INIT == "random" else cfg.TOKEN_INIT), "{review}"
    length = cfg.TOKENS or (len(encode(task.tokenizer, init[len("text:"):])) if init.startswith("text:") else 8)
    return primers.primer_init_tokens(task, init, length, cfg.SEED).to(task.device), user


def search_tokens(task, search: screening.Search) -> tuple[torch.Tensor, str]:
    """Greedy coordinate gradient (GCG): each step the gradient of the batch loss at each slot's one-hot token gives
    its TOP_K most loss-lowering tokens; SWAPS random single-token swaps among them are scored on the same reviews
    and the best replaces the prompt when it lowers the loss there. Every VAL_EVERY steps the prompt is validated;
    the best ids on validation, and the user message."""
    cfg, table = task.cfg, task.model.get_input_embeddings().weight
    current, user = token_start(task)
    layout, rng = make_layout(task, None, user, primer_length=len(current)), torch.Generator().manual_seed(cfg.SEED)
    allowed = torch.full((len(table),), float("inf"), device=task.device)
    allowed[primers.ordinary_tokens(task.tokenizer).to(task.device)] = 0.0
    score = lambda step, ids: search.score(step, task.tokenizer.decode(ids.tolist()), ids.tolist(), layout,
                                           table[ids].float(), user)
    best, best_ids, step = score(0, current), current, 0
    while search.left():
        step += 1
        reviews = torch.randperm(len(task.train), generator=rng)[:cfg.SEARCH_BATCH]
        onehot = F.one_hot(current, len(table)).float().requires_grad_(True)
        loss = screening.label_losses(task, layout, (onehot @ table.float())[None], reviews, cfg.FORWARD_BATCH)[0]
        loss.backward()
        search.forwards, search.backwards = search.forwards + len(reviews), search.backwards + len(reviews)
        # [k, TOP_K]: most loss-lowering swaps
        top = (onehot.grad + allowed).topk(cfg.TOP_K, dim=1, largest=False).indices
        slots = torch.randint(len(current), (cfg.SWAPS,), generator=rng).to(task.device)
        candidates = current.repeat(cfg.SWAPS, 1)
        candidates[torch.arange(cfg.SWAPS), slots] = top[
            slots, torch.randint(cfg.TOP_K, (cfg.SWAPS,), generator=rng).to(task.device)]
        candidates = candidates.unique(dim=0)
        with torch.no_grad():
            losses = screening.label_losses(task, layout, table[candidates].float(), reviews, cfg.FORWARD_BATCH)
        search.forwards += len(candidates) * len(reviews)
        before = current
        if losses.min() < loss:
            current = candidates[losses.argmin()]
        search.steps.append({"reviews": reviews, "before": before, "after": current, "loss_before": loss.item(),
                             "loss_after": min(loss.item(), losses.min().item())})
        if step % cfg.VAL_EVERY == 0 or not search.left():
            found = score(step, current)
            best, best_ids = (found, current) if found > best else (best, best_ids)
    return best_ids, user


def load_proposer(task):
    """The chat model that writes instructions: PROPOSER_ID, or the model under test ("propose" only)."""
    cfg = task.cfg
    if cfg.PROPOSER_ID is None:
        return SimpleNamespace(model=task.model, tokenizer=task.tokenizer) if cfg.SEARCH == "propose" else None
    model = hub.load_model(cfg.PROPOSER_ID, None, task.device, cfg.DTYPE, cfg.GRADIENT_CHECKPOINTING)
    return SimpleNamespace(model=model, tokenizer=hub.load_tokenizer(cfg.PROPOSER_ID))


def curves(run_dirs: list[str], path: str) -> str:
    """The best validation score so far against CPU minutes spent, one line per search run (its SEARCH), in one
    figure."""
    runs = [(files.read_json(os.path.join(run_dir, "config.json"))["search"],
             pd.read_csv(os.path.join(run_dir, "candidates.csv"), keep_default_na=False)) for run_dir in run_dirs]
    return plots.search_curves(runs, path)


def run(cfg) -> None:
    if cfg.CURVES:
        os.makedirs(cfg.RESULTS_DIR, exist_ok=True)
        print(f"saved {curves(cfg.CURVES, os.path.join(cfg.RESULTS_DIR, 'search_curves.png'))}")
        return
    check(cfg)
    task = runs.setup(cfg)
    run_dir = rundir.new(cfg, "search_prompt")
    search = screening.Search(task, run_dir, cfg.BUDGET, cfg.FORWARD_BUDGET)
    if cfg.SEARCH == "tokens":
        ids, user = search_tokens(task, search)
        text = task.tokenizer.decode(ids.tolist())
    else:
        (text, user), ids = search_text(task, search, load_proposer(task)), None
    seconds, cpu = time.perf_counter() - search.start, search.cpu_minutes() * 60
    print(f"budget: {search.cpu_minutes():.1f} CPU minutes, {search.forwards:,} reviews through forward passes, "
          f"{search.backwards:,} through backward passes, {seconds:.0f} s")
    print(f"best prompt on validation: system {text!r}, user {user!r}")
    save_prompt(run_dir, text, user, ids.tolist() if ids is not None else encode(task.tokenizer, text))
    print(f"saved {plots.search_curve(pd.DataFrame(search.rows), os.path.join(run_dir, 'search.png'))}")
    budget = f"{search.cpu_minutes():.1f} CPU min, {search.forwards:,} fwd + {search.backwards:,} bwd reviews"
    if ids is not None:  # the exact ids, then the text they decode to, tokenized again
        layout = make_layout(task, None, user, primer_length=len(ids))
        table = task.model.get_input_embeddings().weight
        runs.record(task, "search_prompt", f"token search, exact ids ({budget}): {text[:40]!r}", layout.prompt_tokens,
                    scoring.predict(task, layout, table[ids].float()), run_dir, samples=len(task.train),
                    train_seconds=seconds, train_cpu_seconds=cpu)
    layout, text_dir = make_layout(task, text, user), run_dir
    if ids is not None:  # the decoded text's own folder names the search that paid for it (table.py's cost)
        text_dir = rundir.new(cfg, "search_prompt")
        save_prompt(text_dir, text, user, encode(task.tokenizer, text), search_run=os.path.basename(run_dir))
    method = f"prompt search ({cfg.SEARCH}{', decoded text' if ids is not None else ''}; {budget}): {text[:40]!r}"
    runs.record(task, "search_prompt", method, layout.prompt_tokens, scoring.predict(task, layout), text_dir,
                samples=len(task.train), train_seconds=seconds, train_cpu_seconds=cpu)


def save_prompt(run_dir: str, text: str, user: str, token_ids: list[int], search_run: Optional[str] = None) -> None:
    """prompt.json: the prompt a search found; search_run names the run whose search found it, where that is another."""
    found = {"text": text, "user": user, "token_ids": token_ids, **({"search_run": search_run} if search_run else {})}
    files.write_atomic(os.path.join(run_dir, "prompt.json"), json.dumps(found, indent=2))


if __name__ == "__main__":
    cli.main(run, SETTINGS)
