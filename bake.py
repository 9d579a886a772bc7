"""Bake a prompt or a trained primer into LoRA weights: train an adapter so that the model *without* the prompt
answers like the frozen model *with* it (prompt baking, context distillation).

    python bake.py                                         # bake prompt_long.py's prompt
    python bake.py --teacher=primer --primer_path=results/<run id>/primer.safetensors
    python bake.py --teacher='text:Classify the review as 1 (negative) or 2 (positive).'
    python bake.py --adapter_path=results/<run id>/adapter  # score a saved adapter, no training
    python bake.py --resume=results/<run id>               # continue an interrupted run

The teacher is the same model with the adapter disabled and the prompt in place; the student has the adapter and no
prompt. The loss is KL(teacher || student) over the whole vocabulary, in float32, at the answer position of each
training review, and with --continuations=k also along k answers the prompted teacher samples to each review. The
test split is scored once, for the student, the teacher, and how much of the teacher's behaviour the student
recovered (argmax agreement, mean KL).
"""
import json
import os
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from harness import (
    adapters,
    batches,
    chat,
    cli,
    errors,
    files,
    frozen,
    parallel,
    prompts,
    rategrid,
    rundir,
    runs,
    scoring,
    training,
)
from harness.data import Split
from harness.layouts import Layout, assemble, make_layout, stop_token_ids
from harness.task import Task

TEACHER = "long"  # the prompt baked in: "long", "short", "text:<words>" (a system message) or "primer" (PRIMER_PATH)
LORA_RANK = 8  # rank of each LoRA update
LORA_ALPHA = 16  # LoRA's scale numerator: updates are scaled by LORA_ALPHA / LORA_RANK
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the modules that get an adapter: the attention projections
RATE = 1e-3  # (config.py's is for primers) Adam's own peak rate for the LoRA weights
RATE_SCALE = "absolute"  # (config.py has "embedding") LoRA weights have no embedding scale: the rates are Adam's own
CONTINUATIONS = 0  # answers the teacher samples per training review, once a run; their positions join the loss
CONTINUATION_TOKENS = 16  # tokens per sampled answer
CONTINUATION_TEMPERATURE = 1.0  # temperature the teacher samples them at
RESCORE_WITH_PROMPT = False  # also score the baked student with the teacher's prompt in place (re-prompting)
ADAPTER_PATH = None  # a saved adapter folder (results/<run id>/adapter): score it, no training
SETTINGS = cli.own_settings(dict(globals()))  # the constants above, as --name=value settings


def check(cfg) -> None:
    """One-line errors for settings that cannot work, before the model loads."""
    prompts.check_name("teacher", cfg.TEACHER, cfg.PRIMER_PATH)
    if cfg.RATE_SCALE != "absolute":
        raise errors.UserError(f"--rate_scale={cfg.RATE_SCALE!r}: a LoRA adapter's rates are Adam's own, "
                               f"--rate_scale=absolute")
    if cfg.LORA_RANK < 1:
        raise errors.UserError(f"--lora_rank={cfg.LORA_RANK} must be at least 1")
    if cfg.CONTINUATIONS and (cfg.CONTINUATION_TOKENS < 1 or cfg.CONTINUATION_TEMPERATURE <= 0):
        raise errors.UserError(f"--continuation_tokens={cfg.CONTINUATION_TOKENS} must be at least 1 and "
                               f"--continuation_temperature={cfg.CONTINUATION_TEMPERATURE} above 0")
    if cfg.CONTINUATIONS and cfg.TEACHER == "primer" and cfg.PRIMER_POSITION == "suffix":
        raise errors.UserError("--continuations needs the teacher's prompt before the review: a primer at "
                               "--primer_position=suffix sits where the answer goes")
    if cfg.ADAPTER_PATH and not os.path.isfile(os.path.join(cfg.ADAPTER_PATH, "adapter_config.json")):
        raise errors.UserError(f"--adapter_path={cfg.ADAPTER_PATH} holds no adapter (no adapter_config.json): give "
                               f"results/<run id>/adapter")


def with_adapter(task: Task) -> torch.nn.Module:
    """The frozen model wrapped with a LoRA adapter whose B matrices start at zero: at first the student is exactly
    the model without the prompt."""
    cfg = task.cfg
    config = adapters.Lora(cfg.LORA_RANK, cfg.LORA_ALPHA, cfg.LORA_TARGETS).config()
    return adapters.with_peft(task, config, f"--lora_targets={cfg.LORA_TARGETS}")


def answer_logits(task: Task, layout: Layout, split: Split, idx: torch.Tensor,
                  primer: Optional[torch.Tensor] = None, answers: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Logits [B, vocab] at the answer position of reviews idx; with answer tokens [B, T] appended after the prompt,
    at the answer position and after each of them, [B, T + 1, vocab]."""
    ids, lengths = assemble(layout, split, idx)
    if answers is not None:
        ids = F.pad(ids, (0, answers.shape[1]))
        ids.scatter_(1, lengths[:, None] + torch.arange(answers.shape[1]), answers.cpu())
        lengths = lengths + answers.shape[1]
    span = 1 if answers is None else answers.shape[1] + 1
    return frozen.forward(task.model, ids, lengths, layout, primer, span=span).logits


@torch.inference_mode()
def sample_continuations(task: Task, teacher: Layout, primer: Optional[torch.Tensor]) -> torch.Tensor:
    """CONTINUATIONS answers [n, CONTINUATIONS, CONTINUATION_TOKENS] the prompted teacher samples to each training
    review (adapter disabled), token by token, each token drawn at a uniform of its own made up front: a review's
    answers depend on the seed alone, not on its batch mates or the number of processes."""
    cfg, train = task.cfg, task.train
    shape = (len(train), cfg.CONTINUATIONS, cfg.CONTINUATION_TOKENS)
    uniforms = torch.rand(shape, generator=torch.Generator().manual_seed(cfg.SEED), dtype=torch.float64)
    found = torch.zeros(shape, dtype=torch.long, device=task.device)
    for idx in batches.longest_first(task, train, "teacher answers"):
        rows = idx.repeat_interleave(cfg.CONTINUATIONS)
        answers = torch.zeros(len(rows), 0, dtype=torch.long)
        for t in range(cfg.CONTINUATION_TOKENS):
            with task.model.disable_adapter():
                logits = answer_logits(task, teacher, train, rows, primer, answers)
            logits = logits if answers.shape[1] == 0 else logits[:, -1]
            drawn = chat.draw(logits, uniforms[idx, :, t], cfg.CONTINUATION_TEMPERATURE)
            answers = torch.cat([answers, drawn[:, None]], 1)
        found[idx.to(task.device)] = answers.view(len(idx), cfg.CONTINUATIONS, -1).to(task.device)
    return parallel.sum_across(found).cpu()


def continuations(task: Task, teacher: Layout, primer: Optional[torch.Tensor],
                  run_dir: str) -> Optional[torch.Tensor]:
    """The teacher's sampled answers of this run: made once and kept in the run folder, so that a resume trains on
    the same."""
    if not task.cfg.CONTINUATIONS:
        return None
    path = os.path.join(run_dir, "continuations.safetensors")
    if os.path.exists(path):
        return load_file(path)["answers"]
    answers = sample_continuations(task, teacher, primer)
    if parallel.is_main():
        with files.atomic_path(path) as tmp:
            save_file({"answers": answers}, tmp)
    return answers


def kl_divergence(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row, over the whole vocabulary, from float32 logits."""
    teacher, student = teacher.log_softmax(-1), student.log_softmax(-1)
    return (teacher.exp() * (teacher - student)).sum(-1)


def loss_of(task: Task, student: Layout, teacher: Layout, primer: Optional[torch.Tensor],
            answers: Optional[torch.Tensor]) -> training.LossOf:
    """training.LossOf: the KL from the prompted, adapter-disabled teacher to the unprompted student at the answer
    position, and with `answers` [n, k, T] also after each token of the review's k sampled answers (up to the end of
    the turn), averaged over positions and answers."""
    weights = [p for p in task.model.parameters() if p.requires_grad]
    stops = stop_token_ids(task.tokenizer, task.model)

    def shard_loss(shard: torch.Tensor, batch_size: int) -> torch.Tensor:
        if not len(shard):  # an empty shard's zero still joins the gradient sum under accelerate
            return sum(w.sum() for w in weights) * 0.0
        rows, tokens = shard, None
        if answers is not None:
            rows, tokens = shard.repeat_interleave(answers.shape[1]), answers[shard].flatten(0, 1)
        with torch.no_grad(), task.model.disable_adapter():
            target = answer_logits(task, teacher, task.train, rows, primer, tokens)
        kl = kl_divergence(target, answer_logits(task, student, task.train, rows, answers=tokens))
        if tokens is None:
            return kl.sum() / batch_size
        after_end = torch.isin(tokens, stops).long().cumsum(1) > 0  # positions that follow the end of the turn
        kept = torch.cat([torch.ones_like(after_end[:, :1]), ~after_end], 1).to(kl.device)
        return ((kl * kept).sum(1) / kept.sum(1)).sum() / (batch_size * answers.shape[1])
    return shard_loss


@torch.inference_mode()
def agreement(task: Task, student: Layout, teacher: Layout, primer: Optional[torch.Tensor], split: Split) -> dict:
    """Over split: the mean KL(teacher || student) at the answer position, and the share of reviews whose argmax
    answers over the vocabulary are the same."""
    kl, same = torch.zeros(len(split), device=task.device), torch.zeros(len(split), device=task.device)
    for idx in batches.longest_first(task, split, "agreement"):
        with task.model.disable_adapter():
            target = answer_logits(task, teacher, split, idx, primer)
        logits = answer_logits(task, student, split, idx)
        kl[idx], same[idx] = kl_divergence(target, logits), (target.argmax(-1) == logits.argmax(-1)).float()
    return {"kl": parallel.sum_across(kl).mean().item(), "agreement": parallel.sum_across(same).mean().item()}


def run(cfg) -> None:
    check(cfg)
    task = runs.setup(cfg, with_train=not cfg.ADAPTER_PATH)
    teacher, primer = prompts.layout_of(task, task.cfg.TEACHER, task.cfg.PRIMER_PATH, task.cfg.PRIMER_POSITION)
    student = make_layout(task, None)
    if cfg.ADAPTER_PATH:
        task.model = adapters.load_peft(task, cfg.ADAPTER_PATH)
        runs.record(task, "bake", f"saved baked adapter ({cfg.ADAPTER_PATH})", 0, scoring.predict(task, student))
        return
    task.model = with_adapter(task)
    weights = {name: p for name, p in task.model.named_parameters() if p.requires_grad}
    run_dir = rundir.new_or_resumed(cfg, "bake")
    evaluate = None
    if task.val is not None:
        evaluate = lambda: {**scoring.score(task, student, split=task.val),
                            **agreement(task, student, teacher, primer, task.val)}
    answers = continuations(task, teacher, primer, run_dir)
    loss = loss_of(task, student, teacher, primer, answers)
    log, status, seconds = rategrid.train_grid(task, weights, loss, run_dir, training.Schedule.of(cfg), cfg.RATE_GRID,
                                               evaluate, f"baked {cfg.TEACHER}", "bake.py",
                                               transfer=rategrid.transfer_of(cfg))
    if parallel.is_main():
        task.model.save_pretrained(os.path.join(run_dir, "adapter"))  # safetensors; its folder is the ADAPTER_PATH
    with task.model.disable_adapter():
        prompted = scoring.score(task, teacher, primer)
    recovered = {"teacher_score": prompted["score"], "teacher_restricted_score": prompted["restricted_score"],
                 **agreement(task, student, teacher, primer, task.test)}
    if cfg.RESCORE_WITH_PROMPT:
        recovered["student_with_prompt_score"] = scoring.score(task, teacher, primer)["score"]
    files.write_atomic(os.path.join(run_dir, "bake.json"), json.dumps(recovered, indent=2))
    print("on the test split: " + ", ".join(f"{k} {v:.3f}" for k, v in recovered.items()))
    trainable = sum(w.numel() for w in weights.values())
    runs.record(task, "bake", f"baked {cfg.TEACHER} (LoRA r{cfg.LORA_RANK}, {', '.join(cfg.LORA_TARGETS)})", 0,
                scoring.predict(task, student), run_dir, log, trainable, status, train_seconds=seconds)


if __name__ == "__main__":
    cli.main(run, SETTINGS)
