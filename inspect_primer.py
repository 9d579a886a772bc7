"""What a trained primer says: each vector's norm and nearest vocabulary tokens, and how much of its score survives
when those tokens replace it as plain text (the "hard primer").

    python inspect_primer.py results/<run id> [--name=value ...]

The run's config.json supplies the config (model, data, labels, ...); overrides after the run folder win. The hard
primer, each vector's nearest token decoded together to text, goes into the system message and is scored like a
text prompt; its result goes to the ledger as script inspect_primer, with the inspected primer as its primer_path.
"""
import os
from types import SimpleNamespace

import torch

from harness import cli, errors, files, layouts, primers, runs, scoring

TOP_K = 5  # nearest tokens shown per vector


def configure(argv: list[str]) -> SimpleNamespace:
    """The saved config of the run folder argv[0] with the overrides after it on top; PRIMER_PATH is its primer."""
    if not argv or argv[0].startswith("--"):
        raise errors.UserError("give a run folder first: python inspect_primer.py results/<run id> [--name=value ...]")
    run_dir, overrides = argv[0], argv[1:]
    files = {name: os.path.join(run_dir, name) for name in ("config.json", "metrics.json", "primer.safetensors")}
    missing = [name for name, path in files.items() if not os.path.isfile(path)]
    if missing:
        raise errors.UserError(f"{run_dir} is not the folder of a run with a primer (no {', '.join(missing)}): "
                               f"give results/<run id> of an experiment.py run")
    if any(arg.startswith("--primer_path=") for arg in overrides):
        raise errors.UserError("the run folder names the primer: drop --primer_path")
    return cli.run_config(run_dir, overrides + [f"--primer_path={files['primer.safetensors']!r}"])


def token_text(tokenizer, token_id: int) -> str:
    """A token as text, or as its vocabulary entry when it is a piece of a multi-byte character that cannot decode
    alone."""
    text = tokenizer.decode([token_id])
    return tokenizer.convert_ids_to_tokens(token_id) if "\ufffd" in text else text


def token_table(task: runs.Task, primer: torch.Tensor, cosine: torch.Tensor, ids: torch.Tensor) -> str:
    norms = task.model.get_input_embeddings().weight.float().norm(dim=1)
    lines = [f"embedding rows: norm {norms.min():.3f} to {norms.max():.3f}, median {norms.median():.3f}",
             "| Vector | Norm | Nearest tokens (cosine) |", "|---|---|---|"]
    for i, (vector, sims, tokens) in enumerate(zip(primer, cosine, ids), 1):
        nearest = "  ".join(f"{token_text(task.tokenizer, t)!r} ({s:.3f})"
                            for s, t in zip(sims.tolist(), tokens.tolist()))
        lines.append(f"| {i} | {vector.norm():.3f} | {nearest} |")
    return "\n".join(lines)


def score_line(name: str, metrics: dict) -> str:
    return (f"{name:<13}: score {100 * metrics['score']:.1f}% "
            f"({int(metrics['correct']):,} / {int(metrics['total']):,}), "
            f"label-restricted {100 * metrics['restricted_score']:.1f}%")


def ratio(hard: float, original: float) -> str:
    return f"{100 * hard / original:.0f}%" if original else "n/a"


def inspect(cfg: SimpleNamespace) -> None:
    original = files.read_json(os.path.join(os.path.dirname(cfg.PRIMER_PATH), "metrics.json"))
    task = runs.setup(cfg, with_train=False)
    primer = primers.load_primer(cfg.PRIMER_PATH, task.model, cfg.PRIMER_POSITION)
    cosine, ids = primers.nearest_tokens(task, primer, TOP_K)
    print(token_table(task, primer, cosine, ids))
    hard = task.tokenizer.decode(ids[:, 0].tolist())
    print(f"hard primer: {hard!r}")
    layout = layouts.make_layout(task, hard, "{review}", position=cfg.PRIMER_POSITION)  # the text where the primer was
    metrics = runs.record(task, "inspect_primer", "hard primer", layout.prompt_tokens, scoring.predict(task, layout))
    print(score_line("primer", original))
    print(score_line("hard primer", metrics))
    print(f"hard / primer: score {ratio(metrics['score'], original['score'])}, "
          f"label-restricted {ratio(metrics['restricted_score'], original['restricted_score'])}")


if __name__ == "__main__":
    cli.main(inspect, parse=configure)
