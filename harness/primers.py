"""The primer method's own pieces: its starting vectors, its loss, and its file."""
import os
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from harness import decoder, errors, files, frozen, parallel, training
from harness.layouts import Layout, assemble, encode
from harness.task import Task

STALL_MOVE = 0.1  # a primer that moved less than this many embedding stds per coordinate (RMS) barely trained
STALL_LOSS = 0.9  # as did one whose loss ended above this share of where it started


def init_primer(model: torch.nn.Module, length: int, seed: int) -> torch.Tensor:
    """Float32 [length, hidden] vectors with the embedding table's per-dimension mean and spread,
    rescaled to the norms of random embedding rows (the reference's initialization)."""
    table = model.get_input_embeddings().weight.detach()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(length, table.shape[1], generator=gen).to(table.device)
    rows = torch.randint(len(table), (length,), generator=gen).to(table.device)
    mean, std = table.float().mean(0), table.float().std(0)
    vectors = mean + std * noise
    return vectors / vectors.norm(dim=1, keepdim=True) * table[rows].float().norm(dim=1, keepdim=True)


def initial_primer(task: Task, init: str, length: int, seed: int) -> torch.Tensor:
    """Float32 [length, hidden] starting vectors on the model's device, as PRIMER_INIT says: "random" (init_primer),
    or the embeddings of the tokens of primer_init_tokens."""
    if init == "random":
        return init_primer(task.model, length, seed)
    table = task.model.get_input_embeddings().weight.detach()
    return table[primer_init_tokens(task, init, length, seed).to(table.device)].float()


def primer_init_tokens(task: Task, init: str, length: int, seed: int) -> torch.Tensor:
    """Token ids [length] whose embeddings start the primer, cycled to length: "vocab" seeded random ordinary tokens
    (no special or added ones, which may be untrained), "labels" the label tokens, "text:<words>" that text's tokens."""
    tok = task.tokenizer
    if init == "vocab":
        ordinary = ordinary_tokens(tok)
        ids = ordinary[torch.randperm(len(ordinary), generator=torch.Generator().manual_seed(seed))[:length]].tolist()
    elif init == "labels":
        ids = task.label_ids.tolist()
    elif init.startswith("text:"):
        ids = encode(tok, init[len("text:"):])
        if not ids:
            raise errors.UserError(f"--primer_init={init!r} has no text: write the words after 'text:', e.g. "
                                   f"--primer_init='text:Classify the review'")
    else:
        raise errors.UserError(f"--primer_init={init!r} is not one of 'random', 'vocab', 'labels', 'text:<words>'")
    return torch.tensor(ids).repeat(-(-length // len(ids)))[:length]


def ordinary_tokens(tokenizer) -> torch.Tensor:
    """The ids of the tokenizer's ordinary tokens: no special or added ones, which text cannot hold or may be
    untrained."""
    return torch.tensor(sorted(set(range(len(tokenizer))) - set(tokenizer.added_tokens_decoder)))


@torch.inference_mode()
def nearest_tokens(task: Task, primer: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and ids [length, k] of each vector's nearest tokens in the input embedding table.
    Special tokens are left out, since text in the system message cannot hold them, and so are padding rows past
    the tokenizer's vocabulary."""
    table = task.model.get_input_embeddings().weight.float()
    cosine = F.normalize(primer, dim=1) @ F.normalize(table, dim=1).T
    special = [i for i, token in task.tokenizer.added_tokens_decoder.items() if token.special]
    cosine[:, special] = float("-inf")
    cosine[:, len(task.tokenizer):] = float("-inf")
    return cosine.topk(k, dim=1)


def embedding_std(model: torch.nn.Module) -> float:
    """The std of the input embedding table's entries: the scale of a coordinate the primer's Adam steps move."""
    return model.get_input_embeddings().weight.float().std().item()


def rate_unit(task: Task) -> float:
    """What RATE and RATE_BY_EPOCH are counted in: the embedding table's std ("embedding": Adam moves every coordinate
    by about its rate, whatever the model's scale), or 1 ("absolute", the reference's rates)."""
    return embedding_std(task.model) if task.cfg.RATE_SCALE == "embedding" else 1.0


def note_stall(log: list[dict], moved: torch.Tensor, std: float) -> None:
    """One line when training barely moved the primer or left the loss where it started: the rates are too small."""
    if not log:
        return
    tenth = max(1, len(log) // 10)
    first, last = (sum(r["loss"] for r in part) / len(part) for part in (log[:tenth], log[-tenth:]))
    rms = moved.float().pow(2).mean().sqrt().item() / std
    if rms < STALL_MOVE or last > STALL_LOSS * first:
        print(f"note: training barely changed the primer (it moved {rms:.2f} embedding stds per coordinate; loss "
              f"{first:.3g} over the first and {last:.3g} over the last tenth of the steps): raise --rate",
              flush=True)


def loss_of(task: Task, layout: Layout, primer: Optional[torch.Tensor] = None, steer: Optional[frozen.Steer] = None,
            trained: tuple[torch.Tensor, ...] = (), layers: tuple[int, ...] = ()) -> training.LossOf:
    """training.LossOf: the cross-entropy of the label token at the answer position, with primer in layout's slot
    and steer in the residual stream (steer.py's learned vector trains on it too); `trained` names the tensors trained
    when they are neither (weights of task.model, a LoReFT's: tune.py). `layers` is forward's: asking for hidden
    states runs its full pass, what bench.py times the reused work against."""
    trained = tuple(trained) or (primer if primer is not None else steer.vector,)

    def shard_loss(shard: torch.Tensor, batch_size: int) -> torch.Tensor:
        if not len(shard):  # an empty shard's zero still joins the gradient sum under accelerate
            return sum(t.sum() for t in trained) * 0.0
        ids, lengths = assemble(layout, task.train, shard)
        logits = frozen.forward(task.model, ids, lengths, layout, primer, steer, layers).logits
        targets = task.label_ids[decoder.to_model(task.model, task.train.labels[shard])]
        return F.cross_entropy(logits, targets) * (len(shard) / batch_size)
    return shard_loss


@parallel.main_writes  # every process holds the same primer; two writing one file would race
def save_primer(run_dir: str, primer: torch.Tensor, model_id: str, position: str) -> None:
    with files.atomic_path(os.path.join(run_dir, "primer.safetensors")) as tmp:
        save_file({"primer": primer.detach().float().cpu().contiguous()}, tmp,
                  metadata={"model_id": model_id, "primer_position": position})


def load_primer(path: str, model: torch.nn.Module, position: str) -> torch.Tensor:
    """A saved primer, checked against the model's width; a note when it was trained at another PRIMER_POSITION."""
    if not os.path.isfile(path):
        raise errors.UserError(f"--primer_path={path} does not exist: give the primer.safetensors of a run in results/")
    try:
        with safe_open(path, "pt") as f:
            primer, trained_at = f.get_tensor("primer").float(), (f.metadata() or {}).get("primer_position", position)
    except Exception as e:  # not safetensors, or no "primer" tensor in it
        raise errors.UserError(f"--primer_path={path} is not a primer file ({type(e).__name__}): give the "
                               f"primer.safetensors of a run in results/") from e
    width = model.get_input_embeddings().weight.shape[1]
    if primer.ndim != 2 or primer.shape[1] != width:
        raise errors.UserError(f"--primer_path={path} holds vectors of shape {tuple(primer.shape)}, but this model's "
                               f"embeddings are {width} wide: use a primer trained for --model_id")
    if trained_at != position:
        print(f"note: {path} was trained at --primer_position={trained_at} and is scored at {position}", flush=True)
    return primer.to(model.device)
